"""Checkpoints: round trips in upstream's layout (pytorch_model.bin, model.safetensors) and in the
transformers layout, loading what transformers' own MambaForCausalLM writes (same logits as
transformers), dtype/device on load, and the hub path's errors. Never touches the network."""
from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from ssmkit.models import MambaConfig, MambaLMHeadModel  # noqa: E402
from ssmkit.models import checkpoints  # noqa: E402

from compare import assert_close  # noqa: E402


def tiny(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = MambaConfig(**{"d_model": 32, "n_layer": 2, "vocab_size": 61, "ssm_cfg": {"d_state": 8}, **kw})
    return MambaLMHeadModel(cfg, dtype=dtype)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


IDS = torch.tensor([[1, 5, 9, 60, 2, 33, 7]])


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_upstream_layout(tmp_path, safe, tie):
    m = tiny(tie_embeddings=tie)
    m.save_pretrained(tmp_path, safe_serialization=safe)
    assert os.path.exists(tmp_path / ("model.safetensors" if safe else "pytorch_model.bin"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert set(cfg) <= set(checkpoints.UPSTREAM_FIELDS)      # loadable by upstream's MambaConfig(**cfg)
    m2 = MambaLMHeadModel.from_pretrained(str(tmp_path))
    same_state(m, m2)
    assert (m2.lm_head.weight is m2.backbone.embedding.weight) == tie
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, m2(IDS).logits)


def test_round_trip_transformers_layout(tmp_path):
    m = tiny(vocab_size=64, pad_vocab_size_multiple=8)
    m.save_pretrained(tmp_path, layout="transformers")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mamba" and cfg["hidden_size"] == 32 and cfg["state_size"] == 8
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "backbone.embeddings.weight" in keys and "backbone.layers.1.mixer.A_log" in keys
    m2 = MambaLMHeadModel.from_pretrained(str(tmp_path))
    same_state(m, m2)


def test_load_dtype_and_sharded(tmp_path):
    m = tiny()
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    half = len(names) // 2
    from safetensors.torch import save_file

    save_file({k: sd[k] for k in names[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    m2 = MambaLMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float64, device="cpu")
    assert m2.backbone.embedding.weight.dtype == torch.float64
    assert torch.equal(m2.backbone.embedding.weight, m.backbone.embedding.weight.double())


def test_transformers_checkpoint_gives_transformers_logits(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = tr.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                            conv_kernel=4, use_conv_bias=True, use_bias=False, residual_in_fp32=True)
    hf = tr.MambaForCausalLM(hf_cfg).eval()
    with torch.no_grad():    # random A_log/D/norms: the test would not see a swapped or skipped weight
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight")):
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = MambaLMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert ours.config.d_model == 32 and ours.config.padded_vocab_size == 64
    ids = torch.tensor([[1, 5, 9, 60, 2, 33, 7, 7, 7, 0]])
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    assert_close("logits", got, want.double(), "float32")
    # and back: ssmkit writes the transformers layout, transformers loads it
    out = tmp_path / "back"
    ours.save_pretrained(out, layout="transformers")
    hf2 = tr.MambaForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert_close("logits back", hf2(ids).logits, want.double(), "float32")


def test_config_dicts():
    with pytest.raises(ValueError, match="unknown keys"):
        MambaConfig.from_dict({"d_model": 8, "hidden_size": 3})
    d = MambaConfig(d_model=8).to_dict()
    assert "norm_epsilon" not in d and MambaConfig.from_dict(d) == MambaConfig(d_model=8)
    assert MambaConfig(norm_epsilon=1e-6).to_dict()["norm_epsilon"] == 1e-6
    assert MambaConfig(vocab_size=50277).padded_vocab_size == 50280
    with pytest.raises(ValueError, match="hidden_act"):
        checkpoints.config_from_transformers({"model_type": "mamba", "hidden_size": 8, "hidden_act": "gelu"})


def test_missing_and_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no weights"):
        (tmp_path / "config.json").write_text(json.dumps(MambaConfig(d_model=8).to_dict()))
        MambaLMHeadModel.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no directory"):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(NotADirectoryError):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "config.json"))
    # a hub name without huggingface_hub: says what to install
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *a, **k):
        if name == "huggingface_hub":
            raise ImportError("no huggingface_hub")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(FileNotFoundError, match=r"ssmkit\[hub\]"):
        MambaLMHeadModel.from_pretrained("state-spaces/mamba-130m")
    monkeypatch.setattr(builtins, "__import__", real_import)
    # with huggingface_hub but offline and not cached: one message that says what to do
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"), raising=False)
    with pytest.raises(OSError, match="Offline"):
        MambaLMHeadModel.from_pretrained("state-spaces/mamba-130m-nonexistent")

"""ssmkit.integrations.transformers: transformers' MambaForCausalLM on ssmkit's kernels.

CPU tests build a tiny random MambaForCausalLM (no downloads). They check the patching itself
(what is replaced, what disable() puts back, errors), that CPU models are untouched by default,
and, with ``devices=("cpu",)`` (ssmkit's float64 reference), that every call the mixer makes in
prefill, decode and training reaches ssmkit.torch with arguments it takes, giving transformers'
numbers. GPU tests compare the same tiny model on CUDA with and without ssmkit.
"""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from compare import assert_close as _assert_close

torch = pytest.importorskip("torch")

import ssmkit.integrations.transformers as hf  # noqa: E402  (imports neither transformers nor torch)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture
def tf():
    """The installed transformers' modeling_mamba (skips without transformers), left disabled."""
    pytest.importorskip("transformers")
    from transformers.models.mamba import modeling_mamba
    hf.disable()
    yield modeling_mamba
    hf.disable()


def tiny_model(dtype=torch.float32, device="cpu", seed=0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM
    kw = dict(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
              time_step_rank=4, use_conv_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(**kw)).to(device=device, dtype=dtype).eval()


def token_ids(batch=2, length=11, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, length), generator=g).to(device)


SPIED = ("causal_conv1d_fn", "causal_conv1d_update", "selective_scan_fn", "selective_state_update",
         "mamba_inner_fn")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach ssmkit.torch's functions (the routers look them up per call)."""
    import ssmkit.torch as st
    counts = dict.fromkeys(SPIED, 0)

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in SPIED:
        monkeypatch.setattr(st, name, spy(name, getattr(st, name)))
    return counts


def assert_close(name, got, want, dtype, **kw):
    return _assert_close(name, got.detach().float().cpu(), want.detach().float().cpu(), dtype, **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def generate(model, ids, n=6):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1).float()


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return out.loss.detach().float(), grads


# ---- no transformers needed ------------------------------------------------------------------

def test_import_does_not_import_transformers():
    code = ("import sys, ssmkit, ssmkit.integrations, ssmkit.integrations.transformers\n"
            "bad = [m for m in ('transformers', 'torch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_raises_import_error(monkeypatch):
    hf.disable()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="'transformers' package"):
        hf.enable()
    with pytest.raises(ImportError, match="pip install"):
        hf.mechanism()
    assert not hf.is_enabled()


def _fake_modeling(**funcs):
    mm = types.ModuleType("fake_modeling_mamba")
    mm.MambaMixer = type("MambaMixer", (), {})
    for name, fn in funcs.items():
        setattr(mm, name, fn)
    return mm


def _kf_fakes():
    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs): ...
    def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None): ...
    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, **kwargs): ...
    def mamba_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                                     z=None, **kwargs): ...
    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True): ...
    return {f.__name__: f for f in (causal_conv1d_fn, causal_conv1d_update, mamba_selective_scan,
                                     mamba_selective_state_update, mamba_inner_fn)}


def test_mechanism_recognition_on_fake_modules():
    assert hf._detect(_fake_modeling(**_kf_fakes())) == hf.KERNEL_FUNCTIONS
    with pytest.raises(hf.UnrecognisedTransformersError, match="no MambaMixer"):
        hf._detect(types.ModuleType("empty"))
    fakes = _kf_fakes()
    del fakes["mamba_selective_scan"]
    with pytest.raises(hf.UnrecognisedTransformersError, match="mamba_selective_scan"):
        hf._detect(_fake_modeling(**fakes))

    # the decode step with upstream's argument order (z before dt_bias) must not be taken for 5.x's
    def mamba_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False): ...
    fakes = dict(_kf_fakes(), mamba_selective_state_update=mamba_selective_state_update)
    with pytest.raises(hf.UnrecognisedTransformersError, match="expected \\(state, hidden_states"):
        hf._detect(_fake_modeling(**fakes))

    legacy = _fake_modeling(is_fast_path_available=False, **dict.fromkeys(hf._FAST_PATH_NAMES))
    legacy.MambaMixer.cuda_kernels_forward = lambda self: None
    assert hf._detect(legacy) == hf.FAST_PATH_GLOBALS
    del legacy.is_fast_path_available
    with pytest.raises(hf.UnrecognisedTransformersError, match="neither"):
        hf._detect(legacy)


def test_unrecognised_version_patches_nothing(monkeypatch):
    hf.disable()
    fakes = _kf_fakes()
    del fakes["causal_conv1d_update"]
    fake = _fake_modeling(**fakes)
    before = dict(vars(fake))
    monkeypatch.setattr(hf, "_modeling", lambda: fake)
    with pytest.raises(hf.UnrecognisedTransformersError, match="does not recognise"):
        hf.enable()
    assert not hf.is_enabled() and vars(fake) == before


def test_bad_devices_rejected():
    with pytest.raises(ValueError, match="devices"):
        hf.enable(devices=("xpu",))
    with pytest.raises(ValueError, match="devices"):
        hf.enable(devices=())
    assert not hf.is_enabled()


# ---- the installed transformers: patching -----------------------------------------------------------

def routed_names(mm):
    mech = hf.mechanism()
    return mech, tuple(hf._ROUTES[mech])


def test_enable_disable_restore(tf):
    mech, names = routed_names(tf)
    before = {n: getattr(tf, n, None) for n in names}
    flag = getattr(tf, "is_fast_path_available", None)
    assert hf.enable() == mech and hf.is_enabled()
    for n in names:
        r = getattr(tf, n)
        assert hf._is_router(r) and r.transformers_original is before[n], n
        assert r.ssmkit_adapter is hf._ROUTES[mech][n][0]
    first = {n: getattr(tf, n) for n in names}
    hf.enable(devices=("cuda", "cpu"))            # idempotent: originals kept, devices updated
    assert hf._devices == {"cuda", "cpu"}
    assert all(getattr(tf, n).transformers_original is before[n] for n in names)
    hf.disable()
    assert not hf.is_enabled()
    assert all(getattr(tf, n, None) is before[n] for n in names)
    assert getattr(tf, "is_fast_path_available", None) is flag
    hf.disable()                                    # a no-op
    assert first  # routers were built


def test_use_ssmkit_context_restores(tf):
    mech, names = routed_names(tf)
    before = {n: getattr(tf, n, None) for n in names}
    with hf.use_ssmkit(devices=("cpu", "cuda")):
        assert hf.is_enabled() and hf._devices == {"cpu", "cuda"}
        assert all(hf._is_router(getattr(tf, n)) for n in names)
    assert not hf.is_enabled() and all(getattr(tf, n, None) is before[n] for n in names)
    hf.enable()
    with hf.use_ssmkit(devices=("cpu", "cuda")):
        assert hf._devices == {"cpu", "cuda"}
    assert hf.is_enabled() and hf._devices == {"cuda"}
    hf.disable()
    with pytest.raises(RuntimeError, match="boom"):
        with hf.use_ssmkit():
            raise RuntimeError("boom")
    assert not hf.is_enabled() and all(getattr(tf, n, None) is before[n] for n in names)


def test_cpu_model_untouched_by_default(tf, calls):
    model = tiny_model()
    ids = token_ids()
    want = logits(model, ids)
    want_seq, _ = generate(model, ids)
    hf.enable()
    got = logits(model, ids)
    got_seq, _ = generate(model, ids)
    assert torch.equal(got, want) and torch.equal(got_seq, want_seq)
    assert sum(calls.values()) == 0, calls


# ---- CPU through ssmkit's reference ("kernel-functions": the mixer's one forward) -----------------

def kernel_functions_only():
    if hf.mechanism() != hf.KERNEL_FUNCTIONS:
        pytest.skip(f"transformers' mechanism is {hf.mechanism()}, this test is for {hf.KERNEL_FUNCTIONS}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_routed_prefill_and_decode(tf, calls, dtype):
    kernel_functions_only()
    model = tiny_model(DTYPES[dtype])
    ids = token_ids()
    want = logits(model, ids)
    want_seq, want_steps = generate(model, ids)
    layers = model.config.num_hidden_layers
    with hf.use_ssmkit(devices=("cpu",)):
        got = logits(model, ids)
        assert calls["causal_conv1d_fn"] == layers and calls["selective_scan_fn"] == layers, calls
        assert calls["causal_conv1d_update"] == calls["selective_state_update"] == 0, calls
        got_seq, got_steps = generate(model, ids)
    steps = got_seq.shape[1] - ids.shape[1] - 1     # decode forwards after the prefill
    assert calls["causal_conv1d_update"] == calls["selective_state_update"] == layers * steps, calls
    assert_close("logits", got, want, dtype)
    check_generate(model, ids, got_seq, got_steps, want_seq, want_steps, dtype)


def check_generate(model, ids, got_seq, got_steps, want_seq, want_steps, dtype):
    """fp32: the same greedy tokens and step logits. bf16: greedy tokens may part on near ties,
    so ssmkit's decode logits are checked against transformers' (unpatched) full forward over
    ssmkit's own tokens."""
    if dtype == "float32":
        assert torch.equal(got_seq, want_seq)
        assert_close("generate logits", got_steps, want_steps, dtype)
    else:
        assert not hf.is_enabled()
        ref = logits(model, got_seq[:, :-1])[:, ids.shape[1] - 1:]
        assert_close("decode logits vs full forward", got_steps, ref, dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_routed_training(tf, calls, fused):
    kernel_functions_only()
    model = tiny_model()
    ids = token_ids()
    want_loss, want = loss_and_grads(model, ids)
    with hf.use_ssmkit(devices=("cpu",), fused_training=fused):
        got_loss, got = loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    if fused:
        assert calls["mamba_inner_fn"] == layers, calls
    else:
        assert calls["mamba_inner_fn"] == 0 and calls["selective_scan_fn"] == layers, calls
        assert calls["causal_conv1d_fn"] == layers, calls
    assert_close("loss", got_loss, want_loss, "float32")
    assert want.keys() == got.keys() and len(want) >= 10
    for n in want:
        assert_close(f"grad {n}", got[n], want[n], "float32", grad=True)


def test_cpu_routed_other_activation_falls_back(tf, calls):
    kernel_functions_only()
    model = tiny_model(hidden_act="gelu")
    ids = token_ids()
    want = logits(model, ids)
    with hf.use_ssmkit(devices=("cpu",)):
        got = logits(model, ids)
    assert calls["causal_conv1d_fn"] == 0 and calls["selective_scan_fn"] == model.config.num_hidden_layers
    assert_close("logits", got, want, "float32")


# ---- "fast-path-globals" (transformers 4.46-5.0): cuda_kernels_forward forced on CPU ---------------

@pytest.fixture
def legacy(tf, monkeypatch):
    if hf.mechanism() != hf.FAST_PATH_GLOBALS:
        pytest.skip(f"transformers' mechanism is {hf.mechanism()}, these tests are for {hf.FAST_PATH_GLOBALS}")
    return tf


def force_kernel_forward(mm, monkeypatch):
    monkeypatch.setattr(mm.MambaMixer, "forward", lambda self, *a, **k: self.cuda_kernels_forward(*a, **k))


def test_legacy_globals_and_loader(legacy):
    mm = legacy
    mapping = hf._loader_mapping(mm)
    saved = dict(mapping) if mapping is not None else None
    hf.enable()
    tiny_model()                                    # 5.0: MambaMixer.__init__ re-reads the loader
    assert all(hf._is_router(getattr(mm, n)) for n in hf._FAST_PATH_NAMES)
    if isinstance(getattr(mm, "is_fast_path_available", None), bool):
        assert mm.is_fast_path_available is True
    hf.disable()
    if mapping is not None:
        assert mapping == saved
        tiny_model()
        assert not any(hf._is_router(getattr(mm, n)) for n in hf._FAST_PATH_NAMES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_legacy_kernel_forward_on_cpu(legacy, calls, monkeypatch, dtype):
    mm = legacy
    model = tiny_model(DTYPES[dtype])
    ids = token_ids()
    want = logits(model, ids)                       # slow_forward on CPU
    want_seq, want_steps = generate(model, ids)
    if dtype == "float32":
        want_loss, want_grads = loss_and_grads(model, ids)
    with hf.use_ssmkit(devices=("cuda", "cpu")):
        force_kernel_forward(mm, monkeypatch)
        got = logits(model, ids)
        got_seq, got_steps = generate(model, ids)
        if dtype == "float32":
            got_loss, got_grads = loss_and_grads(model, ids)
    monkeypatch.undo()
    assert calls["selective_scan_fn"] > 0 and calls["selective_state_update"] > 0
    assert_close("logits", got, want, dtype)
    check_generate(model, ids, got_seq, got_steps, want_seq, want_steps, dtype)
    if dtype == "float32":
        assert calls["mamba_inner_fn"] > 0
        assert_close("loss", got_loss, want_loss, "float32")
        for n in want_grads:
            assert_close(f"grad {n}", got_grads[n], want_grads[n], "float32", grad=True)


# ---- GPU: the same tiny model with and without ssmkit -----------------------------------------------

def gpu_model(dtype):
    return tiny_model(DTYPES[dtype], device="cuda", vocab_size=128, hidden_size=64, state_size=16)


def gpu_ids(batch=3, length=37):
    return token_ids(batch, length, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_logits(tf, calls, dtype):
    model = gpu_model(dtype)
    ids = gpu_ids()
    want = logits(model, ids)                       # transformers' own path
    with hf.use_ssmkit():
        got = logits(model, ids)
    assert calls["selective_scan_fn"] == model.config.num_hidden_layers, calls
    assert torch.isfinite(got).all()
    assert_close("logits", got, want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_generate(tf, calls, dtype):
    model = gpu_model(dtype)
    ids = gpu_ids(length=13)
    want_seq, want_steps = generate(model, ids, n=12)
    with hf.use_ssmkit():
        got_seq, got_steps = generate(model, ids, n=12)
    assert calls["selective_state_update"] > 0 and calls["causal_conv1d_update"] > 0, calls
    check_generate(model, ids, got_seq, got_steps, want_seq, want_steps, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_training_grads(tf, calls, dtype, fused):
    if not fused and hf.mechanism() != hf.KERNEL_FUNCTIONS:
        pytest.skip("fused_training=False needs the kernel-functions mechanism")
    model = gpu_model(dtype)
    ids = gpu_ids()
    want_loss, want = loss_and_grads(model, ids)
    with hf.use_ssmkit(fused_training=fused):
        got_loss, got = loss_and_grads(model, ids)
    assert calls["selective_scan_fn"] > 0 or calls["mamba_inner_fn"] > 0, calls
    assert_close("loss", got_loss, want_loss, dtype)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.isfinite(got[n]).all(), n
        assert_close(f"grad {n}", got[n], want[n], dtype, grad=True)

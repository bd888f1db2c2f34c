"""Checkpoints: load and save MambaLMHeadModel weights in two layouts.

* mamba_ssm's (upstream): ``config.json`` with MambaConfig's fields, weights in
  ``pytorch_model.bin`` or ``model.safetensors`` (or sharded, with an ``*.index.json``), keys as
  the modules name them (``backbone.embedding.weight``, ``backbone.layers.N.mixer.A_log``, ...).
* transformers' MambaForCausalLM: ``config.json`` with ``model_type: "mamba"`` (hidden_size,
  state_size, num_hidden_layers, ...), keys ``backbone.embeddings.weight``,
  ``backbone.layers.N.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight``; mapped on load.

A name that is not a local directory is fetched from the Hugging Face hub when
``huggingface_hub`` is installed (``pip install "ssmkit[hub]"``); offline or missing, the error
says what to do.
"""
from __future__ import annotations

import json
import os

import torch

from .config import UPSTREAM_FIELDS, MambaConfig

CONFIG = "config.json"
BIN, SAFE = "pytorch_model.bin", "model.safetensors"
# Weight files in the order they are looked for (single file, then a shard index).
WEIGHT_FILES = (SAFE, BIN, SAFE + ".index.json", BIN + ".index.json")

# transformers MambaConfig -> (MambaConfig or ssm_cfg key); ssm_cfg keys marked by a "ssm." prefix.
_HF_CONFIG = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
    "residual_in_fp32": "residual_in_fp32", "layer_norm_epsilon": "norm_epsilon",
    "tie_word_embeddings": "tie_embeddings",
    "state_size": "ssm.d_state", "conv_kernel": "ssm.d_conv", "expand": "ssm.expand", "time_step_rank": "ssm.dt_rank",
    "use_bias": "ssm.bias", "use_conv_bias": "ssm.conv_bias", "time_step_min": "ssm.dt_min",
    "time_step_max": "ssm.dt_max", "time_step_init_scheme": "ssm.dt_init", "time_step_scale": "ssm.dt_scale",
    "time_step_floor": "ssm.dt_init_floor",
}
# Key renames between the layouts (transformers name, ssmkit/upstream name).
_HF_KEYS = (("backbone.embeddings.", "backbone.embedding."),)


# ---- layouts ------------------------------------------------------------------------------------

def is_transformers_config(cfg: dict) -> bool:
    return cfg.get("model_type") == "mamba" or "hidden_size" in cfg


def config_from_transformers(cfg: dict) -> MambaConfig:
    """MambaConfig from a transformers MambaForCausalLM config.json dict."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"transformers Mamba config: hidden_act {act!r} is not supported (ssmkit's mixer uses silu)")
    top, ssm = {}, {}
    for hf, ours in _HF_CONFIG.items():
        if hf in cfg and cfg[hf] is not None:
            if ours.startswith("ssm."):
                ssm[ours[4:]] = cfg[hf]
            else:
                top[ours] = cfg[hf]
    # transformers' vocab_size is the embedding's row count: keep it exactly.
    return MambaConfig(ssm_cfg=ssm, rms_norm=True, fused_add_norm=True, pad_vocab_size_multiple=1, **top)


def config_to_transformers(config: MambaConfig) -> dict:
    """A transformers MambaForCausalLM config.json dict for ``config`` (Mamba-1, RMSNorm, no MLP)."""
    if not config.rms_norm or config.d_intermediate:
        raise ValueError("the transformers Mamba layout has RMSNorm and no MLP: this config "
                         f"(rms_norm={config.rms_norm}, d_intermediate={config.d_intermediate}) cannot be written in it")
    from .mamba import Mamba

    import inspect

    defaults = {k: v.default for k, v in inspect.signature(Mamba.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    ssm = {**defaults, **config.ssm_cfg}
    ours = {"d_model": config.d_model, "n_layer": config.n_layer, "vocab_size": config.padded_vocab_size,
            "residual_in_fp32": config.residual_in_fp32, "norm_epsilon": config.norm_epsilon,
            "tie_embeddings": config.tie_embeddings}
    out = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_act": "silu",
           "intermediate_size": int(ssm["expand"] * config.d_model)}
    for hf, key in _HF_CONFIG.items():
        out[hf] = ssm[key[4:]] if key.startswith("ssm.") else ours[key]
    return out


def state_dict_from_transformers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for hf, ours in _HF_KEYS:
            if k.startswith(hf):
                k = ours + k[len(hf):]
        out[k] = v
    return out


def state_dict_to_transformers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for hf, ours in _HF_KEYS:
            if k.startswith(ours):
                k = hf + k[len(ours):]
        out[k] = v
    return out


# ---- files --------------------------------------------------------------------------------------

def _load_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"{path} is a safetensors file: pip install safetensors (or \"ssmkit[hub]\")") from exc
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(directory: str) -> dict:
    """The state dict in ``directory`` (single file or shards), on the CPU."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return _load_file(path)
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_load_file(os.path.join(directory, shard)))
        return sd
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def resolve(name_or_path: str) -> str:
    """A local directory holding the checkpoint: the path itself, or a hub download."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise NotADirectoryError(f"from_pretrained: {name_or_path} is a file; pass the checkpoint's directory "
                                 f"(with {CONFIG} and the weights)")
    if name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"from_pretrained: no directory {name_or_path}")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"from_pretrained: {name_or_path!r} is not a local directory, and fetching it from the Hugging Face hub "
            "needs huggingface_hub: pip install \"ssmkit[hub]\", or download the checkpoint elsewhere and pass its "
            "directory") from None
    last = None
    for patterns in ((CONFIG, "*.safetensors", "*.safetensors.index.json"), (CONFIG, "*.bin", "*.bin.index.json")):
        try:
            path = huggingface_hub.snapshot_download(name_or_path, allow_patterns=list(patterns))
        except Exception as exc:  # network, auth, missing repo: one message that says what to do
            last = exc
            break
        if any(os.path.exists(os.path.join(path, w)) for w in WEIGHT_FILES):
            return path
    if last is None:
        raise FileNotFoundError(f"from_pretrained: the hub repo {name_or_path!r} has no {CONFIG} with weights "
                                f"({', '.join(WEIGHT_FILES)})")
    raise OSError(f"from_pretrained: could not fetch {name_or_path!r} from the Hugging Face hub "
                  f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}). Offline? Download it "
                  f"where there is a network (`hf download {name_or_path}`) and pass the directory, or set "
                  "HF_HUB_OFFLINE=1 to use a copy already in the hub cache") from None


def load_pretrained(name_or_path: str, device=None, dtype=None):
    """(MambaConfig, state dict in ssmkit's key names, floating tensors cast to ``dtype`` and
    moved to ``device``)."""
    directory = resolve(name_or_path)
    cfg_path = os.path.join(directory, CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"from_pretrained: no {CONFIG} in {directory}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    sd = load_weights(directory)
    if is_transformers_config(cfg):
        config = config_from_transformers(cfg)
        sd = state_dict_from_transformers(sd)
    else:
        config = MambaConfig.from_dict(cfg)
    out = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.to(device) if device is not None else v
    return config, out


def save_pretrained(model, directory: str, layout: str = "mamba_ssm", safe_serialization: bool = False):
    """Write ``model`` (a MambaLMHeadModel) to ``directory`` in ``layout`` ("mamba_ssm" or
    "transformers"); see the module docstring."""
    if layout not in ("mamba_ssm", "transformers"):
        raise ValueError(f"save_pretrained: layout must be 'mamba_ssm' or 'transformers', got {layout!r}")
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "transformers":
        cfg = config_to_transformers(model.config)
        sd = state_dict_to_transformers(sd)
        safe_serialization = True
    else:
        cfg = {k: v for k, v in model.config.to_dict().items() if k in UPSTREAM_FIELDS or k == "norm_epsilon"}
    if safe_serialization:
        from safetensors.torch import save_file

        if model.config.tie_embeddings:      # safetensors refuses shared tensors: keep the embedding
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(directory, SAFE), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(directory, BIN))
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=4)

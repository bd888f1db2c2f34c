"""MambaConfig: the language model's hyperparameters, with mamba_ssm's field names and defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# Fields of mamba_ssm.models.config_mamba.MambaConfig; a config.json written with only these
# loads in upstream too.
UPSTREAM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                   "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")


@dataclass
class MambaConfig:
    """Hyperparameters of :class:`MambaLMHeadModel` (upstream's names and defaults).

    ssm_cfg: keyword arguments of the mixer :class:`Mamba` (d_state, d_conv, expand, dt_rank,
    dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias, bias, use_fast_path) and
    ``layer`` ("Mamba1", the only mixer ssmkit has). d_intermediate > 0 adds a gated MLP after
    each mixer. attn_layer_idx must stay empty (ssmkit has no attention layers).
    norm_epsilon (ssmkit extension, upstream fixes 1e-5): the eps of every norm.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5

    @classmethod
    def from_dict(cls, data: dict) -> "MambaConfig":
        """From a config.json dict in upstream's layout; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"MambaConfig: unknown keys {extra} (known: {sorted(known)})")
        return cls(**data)

    def to_dict(self) -> dict:
        """The config.json dict: upstream's fields, plus ssmkit's only where not at their default
        (so upstream's MambaConfig(**json) loads what ssmkit writes)."""
        d = asdict(self)
        if d["norm_epsilon"] == 1e-5:
            del d["norm_epsilon"]
        return d

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to pad_vocab_size_multiple: the embedding and LM head rows."""
        m = self.pad_vocab_size_multiple
        v = self.vocab_size
        return v if v % m == 0 else v + m - v % m

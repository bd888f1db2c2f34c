"""Block: residual add + norm + mixer (+ norm + gated MLP), upstream's ``mamba_ssm.modules.block``.

A block takes (hidden_states, residual) and returns the mixer's output and the new residual:
``residual = hidden_states + residual; hidden_states = mixer(norm(residual))``. With
``fused_add_norm`` the add and the norm are one ssmkit kernel (``ssmkit.torch.layer_norm_fn``);
``residual_in_fp32`` keeps the residual stream in fp32. Shapes: (B, L, d_model).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssmkit.torch as sst

from .mamba import Mamba


class GatedMLP(nn.Module):
    """fc1 -> (y, gate) -> y * silu(gate) -> fc2 (upstream's GatedMLP); hidden rounded up to a
    multiple of ``multiple_of``."""

    def __init__(self, in_features, hidden_features=None, out_features=None, activation=F.silu, bias=False,
                 multiple_of=128, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, **factory)
        self.activation = activation
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **factory)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


def _norm_eps(norm) -> float:
    eps = norm.eps
    return float(eps if eps is not None else torch.finfo(norm.weight.dtype).eps)


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None
        if fused_add_norm and not isinstance(self.norm, (nn.LayerNorm, sst.RMSNorm)):
            raise TypeError("Block: fused_add_norm needs nn.LayerNorm or ssmkit.torch.RMSNorm as the norm")

    def _add_norm(self, norm, hidden_states, residual):
        if not self.fused_add_norm:
            residual = hidden_states + residual if residual is not None else hidden_states
            hidden_states = norm(residual.to(dtype=norm.weight.dtype))
            if self.residual_in_fp32 and residual.dtype != torch.float64:   # fp32 at least: never narrow fp64
                residual = residual.to(torch.float32)
            return hidden_states, residual
        return sst.layer_norm_fn(hidden_states, norm.weight, norm.bias, residual=residual, prenorm=True,
                                 residual_in_fp32=self.residual_in_fp32, eps=_norm_eps(norm),
                                 is_rms_norm=isinstance(norm, sst.RMSNorm))

    def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
        """hidden_states, residual (B, L, d_model) (residual None in the first block) ->
        (mixer output, residual)."""
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


def create_block(d_model, d_intermediate=0, ssm_cfg=None, attn_layer_idx=None, attn_cfg=None, norm_epsilon=1e-5,
                 rms_norm=False, residual_in_fp32=False, fused_add_norm=False, layer_idx=None, device=None,
                 dtype=None):
    """One block as upstream's create_block builds it (Mamba-1 mixer only)."""
    factory = {"device": device, "dtype": dtype}
    if attn_layer_idx and layer_idx in attn_layer_idx:
        raise NotImplementedError("ssmkit's models have no attention layers (attn_layer_idx must be empty)")
    ssm_cfg = dict(ssm_cfg or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise NotImplementedError(f"ssmkit's models have the Mamba-1 mixer only, got ssm_cfg layer={layer!r}")
    mixer_cls = partial(Mamba, layer_idx=layer_idx, **ssm_cfg, **factory)
    norm_cls = partial(sst.RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory)
    mlp_cls = nn.Identity if d_intermediate == 0 else partial(GatedMLP, hidden_features=d_intermediate,
                                                              out_features=d_model, **factory)
    block = Block(d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block

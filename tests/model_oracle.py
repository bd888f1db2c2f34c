"""Pure-torch oracles for the model layer: the Mamba mixer, the block and the language model written
with plain torch ops (F.conv1d, a step-by-step scan loop, the norms' formulas), so autograd gives
their gradients independently of ssmkit's kernels and of the NumPy reference's hand-written
backward. Used in float64 on small shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixer(m, h):
    """ssmkit.models.Mamba ``m`` applied to h (B, L, d_model), in torch ops only."""
    Bsz, L, _ = h.shape
    xz = F.linear(h, m.in_proj.weight, m.in_proj.bias)                      # (B, L, 2D)
    x, z = xz.chunk(2, dim=-1)
    W = m.d_conv
    x = F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=W - 1, groups=m.d_inner)[..., :L]
    x = F.silu(x).transpose(1, 2)                                           # (B, L, D)
    x_dbl = F.linear(x, m.x_proj.weight)
    dt, Bm, Cm = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))        # (B, L, D)
    A = -torch.exp(m.A_log.to(h.dtype))                                     # (D, N)
    state = h.new_zeros(Bsz, m.d_inner, m.d_state)
    ys = []
    for t in range(L):
        state = state * torch.exp(dt[:, t, :, None] * A) + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((state * Cm[:, t, None, :]).sum(-1) + m.D.to(h.dtype) * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def norm(n, x):
    """nn.LayerNorm or ssmkit.torch.RMSNorm ``n`` applied to x, by its formula."""
    eps = n.eps
    w = n.weight.to(x.dtype)
    if isinstance(n, torch.nn.LayerNorm):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + eps) * w
        return y + n.bias.to(x.dtype) if n.bias is not None else y
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    b = getattr(n, "bias", None)
    return y + b.to(x.dtype) if b is not None else y


def block(b, h, residual):
    """ssmkit.models.Block ``b``: (h, residual) -> (out, new residual)."""
    residual = h + residual if residual is not None else h
    out = mixer(b.mixer, norm(b.norm, residual))
    if b.mlp is not None:
        residual = out + residual
        y, gate = F.linear(norm(b.norm2, residual), b.mlp.fc1.weight, b.mlp.fc1.bias).chunk(2, dim=-1)
        out = F.linear(y * F.silu(gate), b.mlp.fc2.weight, b.mlp.fc2.bias)
    return out, residual


def lm_logits(model, ids):
    """ssmkit.models.MambaLMHeadModel ``model``'s logits (B, L, V) for ids (B, L)."""
    h = F.embedding(ids, model.backbone.embedding.weight)
    residual = None
    for layer in model.backbone.layers:
        h, residual = block(layer, h, residual)
    h = norm(model.backbone.norm_f, h + residual)
    return F.linear(h, model.lm_head.weight)

"""ssmkit.torch: PyTorch adapters with the upstream signatures, so switching is an import change.

    from ssmkit.torch import selective_scan_fn, mamba_inner_fn   # mamba_ssm.ops.selective_scan_interface
    from ssmkit.torch import causal_conv1d_fn, causal_conv1d_update   # causal_conv1d
    from ssmkit.torch import selective_state_update   # mamba_ssm.ops.triton.selective_state_update
    from ssmkit.torch import linear_scan

CUDA tensors run ssmkit's kernels on the tensors' own device and on torch's current stream there,
with outputs and workspaces from torch's caching allocator (CUDA-graph capturable once each
kernel has run eagerly, i.e. been compiled). CPU tensors run the float64 NumPy reference with
autograd, so a model can be debugged without a GPU (float64 passes ``torch.autograd.gradcheck``).
Eager calls go through ``torch.autograd.Function``s; under ``torch.compile`` the same code runs
as ``torch.library`` custom ops (``torch.ops.ssmkit.*``, with fake kernels), without graph
breaks. Mixed devices raise ValueError, wrong dtypes/shapes TypeError/ValueError, naming the
arguments. CuPy is imported on first GPU use only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _impl
from . import _ops  # noqa: F401  (registers torch.ops.ssmkit.*)
from ._functions import CausalConv1dFunction, LinearScanFunction, MambaInnerFunction, SelectiveScanFunction
from .layer_norm import LayerNormFunction, RMSNorm, layer_norm_fn, rms_norm_fn  # noqa: F401

__all__ = ["selective_scan_fn", "linear_scan", "causal_conv1d_fn", "causal_conv1d_update",
           "selective_state_update", "mamba_inner_fn", "SelectiveScanFunction", "LinearScanFunction",
           "CausalConv1dFunction", "MambaInnerFunction"]
__all__ += ["layer_norm_fn", "rms_norm_fn", "RMSNorm", "LayerNormFunction"]

_is_compiling = torch.compiler.is_compiling


def _grad_needed(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and getattr(t, "requires_grad", False):
            return True
    return False


def _as_complex_bc(X, A):
    """Upstream's complex-A convention for a real variable B/C: (..., N, 2L) with real and
    imaginary parts interleaved along L. Our host API takes complex (..., N, L) arrays in A's
    dtype (the gradient flows back through view_as_complex as the interleaved real gradient)."""
    if X.shape[-1] % 2:
        raise ValueError(f"selective_scan_fn: with complex A, a real variable B/C holds real/imag parts "
                         f"interleaved along the last axis (length 2L), got odd length {X.shape[-1]}")
    real = torch.float64 if A.dtype == torch.complex128 else torch.float32
    return torch.view_as_complex(X.to(real).unflatten(-1, (-1, 2)).contiguous())


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None):
    """Mamba-1 selective scan (``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``).

    u, delta, z: (B, D, L) float16/bfloat16/float32 (float64 too). A: (D, N) float32 or
    complex64 (float64/complex128 with float64 inputs). B, C: constant (D, N) in A's dtype, or
    variable (B, N, L) / (B, G, N, L) in u's dtype; with complex A a real variable B/C is
    upstream's (B, [G,] N, 2L) real/imaginary interleaving (or pass a complex (B, [G,] N, L)).
    D, delta_bias: (D,) float32. initial_state (extension): (B, D, N) in A's dtype.

    Returns out (B, D, L) in u's dtype, and with ``return_last_state`` also last_state
    (B, D, N) in A's dtype. Unlike upstream, a gradient flowing into last_state is propagated.
    """
    if isinstance(A, torch.Tensor) and A.is_complex():
        if isinstance(B, torch.Tensor) and B.dim() >= 3 and not B.is_complex():
            B = _as_complex_bc(B, A)
        if isinstance(C, torch.Tensor) and C.dim() >= 3 and not C.is_complex():
            C = _as_complex_bc(C, A)
    if _is_compiling():
        save = _grad_needed(u, delta, A, B, C, D, z, delta_bias, initial_state)
        out, last, _ = torch.ops.ssmkit.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                           delta_softplus, save)
    elif _grad_needed(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                delta_softplus, return_last_state)
    else:
        out, last, _ = _impl.ss_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                        False, return_last_state)
    return (out, last) if return_last_state else out


def linear_scan(a, b, initial=None, reverse=False):
    """h_t = a_t h_{t-1} + b_t along the last axis (``reverse``: h_t = a_t h_{t+1} + b_t).

    a, b: (..., L), one dtype (float16/bfloat16/float32/float64/complex64/complex128);
    initial: (...) or None. Returns h (..., L). Differentiable in a, b and initial.
    """
    if _is_compiling():
        return torch.ops.ssmkit.linear_scan(a, b, initial, reverse)
    if _grad_needed(a, b, initial):
        return LinearScanFunction.apply(a, b, initial, reverse)
    return _impl.ls_forward(a, b, initial, reverse)


def _silu(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    return activation is not None


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Depthwise causal conv1d (``causal_conv1d.causal_conv1d_fn``).

    x: (B, D, L) (channel-first or channel-last strides); weight: (D, W); bias: (D,);
    seq_idx: (B, L) int32; initial_states: (B, D, W-1); final_states_out: (B, D, W-1) written
    in place (and returned) when ``return_final_states``; activation None, "silu" or "swish".
    Returns out (B, D, L) in x's dtype, or (out, final_states) with ``return_final_states``.
    Differentiable in x, weight, bias, initial_states (and through final_states).
    """
    silu = _silu(activation)
    return_final_states = bool(return_final_states)
    if return_final_states and final_states_out is not None:
        _check_final_states_out(final_states_out, x, weight)
    if _is_compiling():
        out, final = torch.ops.ssmkit.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states,
                                                         return_final_states, silu)
    elif _grad_needed(x, weight, bias, initial_states):
        out, final = CausalConv1dFunction.apply(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    else:
        out, final = _impl.conv_forward(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final)
        return out, final_states_out
    return out, final


def _check_final_states_out(fso, x, weight):
    """final_states_out, written in place: (B, D, W-1) in x's dtype on x's device, writeable
    layout (checked before anything runs)."""
    from ssmkit._arrays import dtype_name
    from ssmkit._validate import check_array, check_written

    from ._bridge import Shadow

    op = "causal_conv1d_fn"
    if not isinstance(fso, torch.Tensor):
        raise TypeError(f"{op}: argument 'final_states_out' must be a torch.Tensor or None, got {type(fso).__name__}")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 3 and weight.dim() >= 2):
        return                     # the host validation names what is wrong with x / weight
    if fso.device != x.device:
        raise ValueError(f"{op}: all tensors must be on one device; 'x' is on {x.device} but "
                         f"'final_states_out' is on {fso.device}")
    sh = Shadow(fso)
    check_array(op, "final_states_out", sh, (x.shape[0], x.shape[1], weight.shape[-1] - 1),
                dtypes=(dtype_name(Shadow(x)),))
    check_written(op, "final_states_out", sh)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode-time causal conv (``causal_conv1d.causal_conv1d_update``), in place on conv_state.

    x: (B, D) or (B, D, L_new); conv_state: (B_pool, D, S), S >= W-1; weight: (D, W); bias: (D,);
    cache_seqlens: (B,) int32 (ring-buffer state); conv_state_indices: (B,) int32 (state rows for
    continuous batching). Returns out with x's shape and dtype. Not differentiable.
    """
    silu = _silu(activation)
    if _is_compiling():
        return torch.ops.ssmkit.causal_conv1d_update(x, conv_state, weight, bias, silu, cache_seqlens,
                                                     conv_state_indices)
    return _impl.conv_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decode step (``mamba_ssm.ops.triton.selective_state_update.selective_state_update``),
    in place on state.

    state: (B, D, N) or (B, H, P, N); x, dt, z: (B, D) or (B, H, P); A: (D, N) or (H, P, N);
    B, C: (B, N) or (B, G, N); D, dt_bias: (D,) or (H, P); state_batch_indices: (B,) int32/int64.
    Returns out with x's shape and dtype. Not differentiable.
    """
    if _is_compiling():
        return torch.ops.ssmkit.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                       state_batch_indices)
    return _impl.ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def _autocast_dtype(device_type: str):
    """The autocast dtype for ``device_type`` when autocast is on there, else None."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: CUDA-only query functions
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def _rms_norm(x, weight, eps):
    """RMSNorm over the last axis in fp32, cast back to x's dtype (upstream's B/C/dt norms)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                   B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1,
                   b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
    """Mamba-1 block interior (``mamba_ssm.ops.selective_scan_interface.mamba_inner_fn``):
    xz (B, 2D, L) -> causal conv1d + silu on x -> x_proj -> dt_proj -> selective scan (gated by
    z) -> out_proj, returning (B, L, out_dim).

    xz: (B, 2D, L); conv1d_weight (D, 1, W) or (D, W); x_proj_weight (R + 2N, D); delta_proj_weight
    (D, R); out_proj_weight (out_dim, D); A (D, N) float32 (or complex); D, delta_bias (D,) float32.

    The common call (real A, B and C from x_proj, no B/C biases or RMS norms, eager) runs as one
    autograd node (``MambaInnerFunction``) that honours ``checkpoint_lvl``: level 1 (the default)
    recomputes the conv output and delta in the backward, so a layer keeps what upstream's level 1
    keeps; level 0 keeps them. The other options (complex A, given B/C, B/C biases, the RMS norms)
    and calls under ``torch.compile`` are composed from ``causal_conv1d_fn``, ``selective_scan_fn``
    and torch ops, where autograd keeps the conv output and delta whatever the level.
    """
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"mamba_inner_fn: checkpoint_lvl must be 0 or 1, got {checkpoint_lvl}")
    fused = (B is None and C is None and B_proj_bias is None and C_proj_bias is None and b_rms_weight is None
             and c_rms_weight is None and dt_rms_weight is None and not A.is_complex() and not _is_compiling())
    if fused and _grad_needed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                              out_proj_bias, A, D, delta_bias):
        return MambaInnerFunction.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                        out_proj_weight, out_proj_bias, A, D, delta_bias, bool(delta_softplus),
                                        checkpoint_lvl)
    return _mamba_inner_composed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                                 out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                                 b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps)


def _conv_silu(x, weight, bias):
    return causal_conv1d_fn(x, weight, bias, activation="silu")


def _scan_gated(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def _mamba_inner_composed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                          out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                          b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
                          conv=_conv_silu, scan=_scan_gated):
    """``mamba_inner_fn`` composed from differentiable pieces: ``conv(x, weight (D, W), bias)``
    (causal conv1d + silu) and ``scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)``;
    ``ssmkit.distributed`` passes its split versions of both."""
    L = xz.shape[-1]
    batch = xz.shape[0]
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1] * (2 if A.is_complex() else 1)
    dt = _autocast_dtype(xz.device.type)
    if dt is not None:               # as upstream: weights in the autocast dtype
        x_proj_weight = x_proj_weight.to(dt)
        delta_proj_weight = delta_proj_weight.to(dt)
        out_proj_weight = out_proj_weight.to(dt)
        out_proj_bias = out_proj_bias.to(dt) if out_proj_bias is not None else None
    x, z = xz.chunk(2, dim=1)
    dim = x.shape[1]
    weight = conv1d_weight.reshape(conv1d_weight.shape[0], conv1d_weight.shape[-1])   # (D, 1, W) -> (D, W)
    conv_out = conv(x, weight, conv1d_bias)                                             # (B, D, L)
    in_dtype = conv_out.dtype
    x_dbl = F.linear(conv_out.transpose(1, 2).reshape(batch * L, dim), x_proj_weight)  # (B L, R + 2N)
    # delta: (D, B L) viewed as (B, D, L) with L innermost, as the scan reads it.
    delta = (delta_proj_weight @ x_dbl[:, :delta_rank].t()).view(dim, batch, L).transpose(0, 1)
    if dt_rms_weight is not None:
        delta = _rms_norm(delta.transpose(1, 2), dt_rms_weight, b_c_dt_rms_eps).transpose(1, 2)
    delta = delta.to(in_dtype)

    def variable(cols, proj_bias, rms_weight):
        X = cols
        if proj_bias is not None:
            X = X + proj_bias.to(dtype=X.dtype)
        if rms_weight is not None:
            X = _rms_norm(X, rms_weight, b_c_dt_rms_eps)
        if not A.is_complex():       # (B L, N) -> (B, 1, N, L), L contiguous (as upstream)
            return X.to(in_dtype).view(batch, L, d_state).transpose(1, 2).unsqueeze(1).contiguous()
        # (B L, (N two)) -> complex (B, 1, N, L): (re, im) pairs per state, upstream's layout
        real = torch.float64 if in_dtype == torch.float64 else torch.float32
        Xc = torch.view_as_complex(X.to(real).view(batch, L, d_state // 2, 2).contiguous())
        return Xc.transpose(1, 2).unsqueeze(1).contiguous()

    if B is None:
        B = variable(x_dbl[:, delta_rank:delta_rank + d_state], B_proj_bias, b_rms_weight)
    if C is None:
        C = variable(x_dbl[:, -d_state:], C_proj_bias, c_rms_weight)
    y = scan(conv_out, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)

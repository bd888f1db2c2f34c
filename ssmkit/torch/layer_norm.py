"""Fused residual add + LayerNorm / RMSNorm for torch, with mamba_ssm's signatures
(``mamba_ssm.ops.triton.layer_norm``: ``layer_norm_fn``, ``rms_norm_fn``, ``RMSNorm``).

    from ssmkit.torch import layer_norm_fn, rms_norm_fn, RMSNorm

Semantics as upstream: out has x's dtype (also under ``torch.autocast``: upstream's function is
not an autocast op and neither is this one); with ``prenorm`` the second return is residual_out =
x + residual in the residual's dtype, or float32 with ``residual_in_fp32`` (no residual, 16-bit x),
else x itself. The backward's dresidual is dx (in the residual's dtype). Upstream's dropout,
x1/weight1/bias1, rowscale and dropout masks are not implemented (NotImplementedError).

CUDA tensors run kernels_cu/layer_norm.cu through ``ssmkit.layer_norm*`` on torch's stream and
allocator; CPU tensors run the float64 reference with autograd (bfloat16 travels as float32).
Eager calls go through ``LayerNormFunction``; under ``torch.compile`` the custom ops
``torch.ops.ssmkit.layer_norm_fwd`` / ``layer_norm_bwd`` (with fake kernels) are traced instead.
Weights whose dtype the kernels do not take for x's dtype (e.g. fp16 weights with bf16 x, or a
bias of another dtype than the weight) are cast to fp32 first (upstream reads them as fp32 too).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import ssmkit
from ssmkit.ops import layer_norm as _ln_mod

from ._bridge import (device_of, from_numpy, gpu_context, has_bf16, np_view, shadows, to_torch, view, views,
                      _torch_device)

__all__ = ["layer_norm_fn", "rms_norm_fn", "RMSNorm", "LayerNormFunction"]

OP = "layer_norm_fn"
NAMES = ("x", "weight", "bias", "residual")
BWD_NAMES = ("dout", "x", "weight", "bias", "mean", "rstd", "dresidual_out")

_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
_WEIGHT_OK = {_F16: (_F16, _F32), _BF16: (_BF16, _F32), _F32: (_F32,), _F64: (_F64,)}

_is_compiling = torch.compiler.is_compiling


def residual_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """residual_out's dtype (upstream's rule): the residual's, else fp32 with ``residual_in_fp32``
    for 16-bit x, else x's (then residual_out is x itself)."""
    if residual is not None:
        return residual.dtype
    if residual_in_fp32 and x.dtype in (_F16, _BF16):
        return _F32
    return x.dtype


def _materialized(x, residual, residual_in_fp32) -> bool:
    return residual is not None or residual_dtype(x, residual, residual_in_fp32) != x.dtype


def _acc_dtype(x: Tensor) -> torch.dtype:
    return _F64 if x.dtype == _F64 else _F32


def _grad_needed(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and getattr(t, "requires_grad", False) for t in tensors)


# ---- bodies shared by the autograd.Function (eager) and the custom ops (torch.compile) ----------

def ln_forward(x, weight, bias, residual, eps: float, residual_in_fp32: bool, rms: bool, want_rout: bool,
               save: bool):
    """(y, residual_out or None, mean or None, rstd or None). residual_out is returned when it is
    materialized (see ``residual_dtype``) and wanted (``want_rout``) or ``save``; mean (LayerNorm)
    and rstd with ``save``."""
    args = (x, weight, bias, residual)
    idx = device_of(OP, NAMES, args)
    mat = _materialized(x, residual, residual_in_fp32)
    keep = mat and (want_rout or save)
    if idx >= 0:
        y = torch.empty(x.shape, dtype=x.dtype, device=_torch_device(idx))
        with gpu_context(idx):
            v = views(OP, idx, NAMES, args)
            if save:
                _, rout, mean, rstd = ssmkit.layer_norm_fwd(v[0], v[1], v[2], v[3], eps=eps,
                                                            residual_in_fp32=residual_in_fp32, is_rms_norm=rms,
                                                            out=view(y, "out", idx))
            else:
                res = ssmkit.layer_norm(v[0], v[1], v[2], v[3], eps=eps, prenorm=keep,
                                        residual_in_fp32=residual_in_fp32, is_rms_norm=rms, out=view(y, "out", idx))
                rout, mean, rstd = (res[1] if keep else None), None, None
            return y, (to_torch(rout) if keep else None), to_torch(mean), to_torch(rstd)
    if has_bf16(args):
        sh = shadows(args)
        _ln_mod.validate(sh[0], sh[1], sh[2], sh[3], eps, False, residual_in_fp32, rms)
    n = [np_view(t) for t in args]
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(n[0], n[1], n[2], n[3], eps=eps, residual_in_fp32=residual_in_fp32,
                                                is_rms_norm=rms)
    rout_t = from_numpy(rout, residual_dtype(x, residual, residual_in_fp32)) if keep else None
    if not save:
        mean = rstd = None
    return from_numpy(y, x.dtype), rout_t, from_numpy(mean), from_numpy(rstd)


def ln_backward(dy, xs, weight, bias, mean, rstd, drout, has_residual: bool, rms: bool):
    """(dx, dweight, dbias or None, dresidual or None). ``xs``: the normalized input (residual_out,
    or x); dresidual is None also when it would be dx itself (a residual in x's dtype): callers
    use dx there."""
    if rms:
        mean = None
    args = (dy, xs, weight, bias, mean, rstd, drout)
    idx = device_of(OP, BWD_NAMES, args)
    if idx >= 0:
        with gpu_context(idx):
            v = views(OP, idx, BWD_NAMES, args)
            dx, dw, db, dres = ssmkit.layer_norm_bwd(*v, has_residual=has_residual, is_rms_norm=rms)
            return to_torch(dx), to_torch(dw), to_torch(db), (None if dres is None or dres is dx else to_torch(dres))
    if has_bf16(args):
        sh = shadows(args)
        _ln_mod.validate_bwd(*sh[:6], dresidual_out=sh[6], has_residual=has_residual, is_rms_norm=rms)
    n = [np_view(t) for t in args]
    dx, dw, db, dres = ssmkit.layer_norm_bwd(*n, has_residual=has_residual, is_rms_norm=rms)
    dres_t = None
    if has_residual and xs.dtype != dy.dtype:
        dres_t = from_numpy(dres, xs.dtype)
    return (from_numpy(dx, dy.dtype), from_numpy(dw, weight.dtype),
            None if db is None else from_numpy(db, bias.dtype), dres_t)


class LayerNormFunction(torch.autograd.Function):
    """(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm) -> (out, residual_out
    or None (not materialized)). Saves residual_out (or x), weight, bias, mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm):
        y, rout, mean, rstd = ln_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm, True)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x if rout is None else rout, weight, bias, mean, rstd)
        ctx.has_residual = residual is not None
        ctx.rms = is_rms_norm
        ctx.y_dtype = x.dtype
        return y, rout

    @staticmethod
    def backward(ctx, dy, drout):
        xs, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(xs.shape, dtype=ctx.y_dtype, device=xs.device)
        dx, dw, db, dres = ln_backward(dy, xs, weight, bias, mean, rstd, drout, ctx.has_residual, ctx.rms)
        if ctx.has_residual and dres is None:
            dres = dx
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                dres if need[3] else None, None, None, None, None)


# ---- custom ops (torch.compile) ----------------------------------------------------------------

def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("ssmkit::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                       is_rms_norm: bool, residual_in_fp32: bool, prenorm: bool,
                       save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, rout, mean, rstd = ln_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm, save)
    return (y, _empty(x) if rout is None else rout, _empty(x) if mean is None else mean,
            _empty(x) if rstd is None else rstd)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, is_rms_norm, residual_in_fp32, prenorm, save):
    y = x.new_empty(x.shape)
    keep = _materialized(x, residual, residual_in_fp32) and (prenorm or save)
    rout = x.new_empty(x.shape, dtype=residual_dtype(x, residual, residual_in_fp32)) if keep else _empty(x)
    rstd = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x)) if save else _empty(x)
    mean = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x)) if save and not is_rms_norm else _empty(x)
    return y, rout, mean, rstd


@torch.library.custom_op("ssmkit::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: Tensor, xs: Tensor, weight: Tensor, bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                       drout: Optional[Tensor], has_residual: bool,
                       is_rms_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dres = ln_backward(dy, xs, weight, bias, mean, rstd, drout, has_residual, is_rms_norm)
    return dx, dw, _empty(weight) if db is None else db, _empty(xs) if dres is None else dres


@_layer_norm_bwd_op.register_fake
def _(dy, xs, weight, bias, mean, rstd, drout, has_residual, is_rms_norm):
    dres = xs.new_empty(xs.shape) if has_residual and xs.dtype != dy.dtype else _empty(xs)
    return (dy.new_empty(dy.shape), weight.new_empty(weight.shape),
            _empty(weight) if bias is None else bias.new_empty(bias.shape), dres)


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms_norm, residual_in_fp32, prenorm, save = inputs
    y, rout, mean, rstd = output
    mat = _materialized(x, residual, residual_in_fp32)
    ctx.save_for_backward(rout if mat else x, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.rms = is_rms_norm
    ctx.mat = mat
    ctx.y_dtype = x.dtype


def _fwd_backward(ctx, dy, drout, dmean, drstd):
    xs, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(xs.shape, dtype=ctx.y_dtype, device=xs.device)
    if not ctx.mat:
        drout = None          # residual_out was x itself: its gradient reaches x outside the op
    dx, dw, db, dres = torch.ops.ssmkit.layer_norm_bwd(dy, xs, weight, bias, mean, rstd, drout, ctx.has_residual,
                                                       ctx.rms)
    if ctx.has_residual and xs.dtype == dx.dtype:
        dres = dx             # the op returns no separate dresidual when it would equal dx
    return (dx, dw, db if bias is not None else None, dres if ctx.has_residual else None,
            None, None, None, None, None)


_layer_norm_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---- public functions -------------------------------------------------------------------------

def _unsupported(x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask):
    names = [n for n, bad in (("x1", x1 is not None), ("weight1", weight1 is not None),
                              ("bias1", bias1 is not None), ("dropout_p > 0", dropout_p > 0.0),
                              ("rowscale", rowscale is not None), ("return_dropout_mask", bool(return_dropout_mask)))
             if bad]
    if names:
        raise NotImplementedError(f"{OP}: {', '.join(names)} not implemented in ssmkit (upstream's dropout / "
                                  "parallel-norm features)")


def _promote(x, weight, bias):
    """Weights in a dtype the kernels take for x's dtype: else both cast to fp32 (fp64 for fp64 x)."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dtype not in _WEIGHT_OK:
        return weight, bias                       # the host validation names the problem
    ok = _WEIGHT_OK[x.dtype]
    if weight.dtype in ok and (bias is None or bias.dtype == weight.dtype):
        return weight, bias
    to = _F64 if x.dtype == _F64 else _F32
    return weight.to(to), (None if bias is None else bias.to(to))


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                  return_dropout_mask=False):
    """Residual add + LayerNorm / RMSNorm (``mamba_ssm.ops.triton.layer_norm.layer_norm_fn``).

    x, residual: (..., H); weight, bias: (H,). Returns out (x's shape and dtype), or with
    ``prenorm`` (out, residual_out): residual_out = x + residual in the residual's dtype (fp32
    with ``residual_in_fp32`` and no residual; x itself when neither applies). Differentiable in
    x, weight, bias and residual (and through residual_out).
    """
    _unsupported(x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask)
    eps = float(eps)
    prenorm, residual_in_fp32, is_rms_norm = bool(prenorm), bool(residual_in_fp32), bool(is_rms_norm)
    weight, bias = _promote(x, weight, bias)
    if _is_compiling():
        save = _grad_needed(x, weight, bias, residual)
        y, rout, _, _ = torch.ops.ssmkit.layer_norm_fwd(x, weight, bias, residual, eps, is_rms_norm, residual_in_fp32,
                                                        prenorm, save)
        if not _materialized(x, residual, residual_in_fp32):
            rout = None
    elif _grad_needed(x, weight, bias, residual):
        y, rout = LayerNormFunction.apply(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm)
    else:
        y, rout, _, _ = ln_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, prenorm, False)
    if not prenorm:
        return y
    return y, (x if rout is None else rout)


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
    """``layer_norm_fn`` with ``is_rms_norm=True`` (``mamba_ssm.ops.triton.layer_norm.rms_norm_fn``)."""
    return layer_norm_fn(x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1, eps=eps,
                         dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                         is_rms_norm=True, return_dropout_mask=return_dropout_mask)


class RMSNorm(torch.nn.Module):
    """RMSNorm with a weight (ones) and no bias (``mamba_ssm.ops.triton.layer_norm.RMSNorm``).

    ``forward(x, residual=None, prenorm=False, residual_in_fp32=False)`` as ``rms_norm_fn``. A
    module built with ``dropout_p > 0`` works in eval mode; in training mode it raises
    NotImplementedError (dropout is not implemented)."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.eps = eps
        self.drop = torch.nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps,
                           dropout_p=self.drop.p if self.drop is not None and self.training else 0.0,
                           prenorm=prenorm, residual_in_fp32=residual_in_fp32)

"""Fused residual add + LayerNorm / RMSNorm over the last axis, forward and backward.

Shapes: x, residual, out, residual_out (..., H); weight, bias (H,). Rows are the flattened
leading dims; H is the normalized (hidden) axis.

Math (float64), per row:

    s = x + residual                       (s = x without residual)
    LayerNorm: mean = sum(s) / H;  var = sum((s - mean)^2) / H;  xhat = (s - mean) * rstd
    RMSNorm:   var = sum(s^2) / H;  xhat = s * rstd                 (no mean)
    rstd = 1 / sqrt(var + eps);  out = xhat * weight + bias

residual_out is s in the residual stream's dtype: the residual's dtype when a residual is
given, else float32 with ``residual_in_fp32`` (and x narrower than float32), else x's dtype,
in which case s is x itself and nothing new is made (as mamba_ssm's layer_norm_fn).
``out`` is computed from s before residual_out is rounded.

Backward, with dout the gradient of out and dresidual_out that of residual_out (prenorm):

    dweight = sum_rows dout * xhat;  dbias = sum_rows dout;  g = weight * dout
    LayerNorm: ds = rstd * (g - mean(g) - xhat * mean(xhat * g))
    RMSNorm:   ds = rstd * (g - xhat * mean(xhat * g))
    ds += dresidual_out;   dx = ds;   dresidual = ds
"""

import numpy as np

from ._common import as64


def residual_dtype(x_dtype, res_dtype=None, residual_in_fp32=False):
    """dtype of residual_out: the residual's if given, else float32 with ``residual_in_fp32``
    when x is narrower than float32, else x's dtype (then residual_out is x itself)."""
    if res_dtype is not None:
        return np.dtype(res_dtype)
    x_dtype = np.dtype(x_dtype)
    if residual_in_fp32 and x_dtype.itemsize < 4:
        return np.dtype(np.float32)
    return x_dtype


def layer_norm_stats(s, eps=1e-6, is_rms_norm=False):
    """(mean or None for RMSNorm, rstd) of the rows of s, float64, shapes (...)."""
    s = as64(s)
    if is_rms_norm:
        return None, 1.0 / np.sqrt(np.mean(s * s, axis=-1) + eps)
    mean = np.mean(s, axis=-1)
    d = s - mean[..., None]
    return mean, 1.0 / np.sqrt(np.mean(d * d, axis=-1) + eps)


def _xhat(s64, mean, rstd):
    c = s64 if mean is None else s64 - as64(mean)[..., None]
    return c * as64(rstd)[..., None]


def layer_norm(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
               is_rms_norm=False):
    """out (x's shape and dtype), or (out, residual_out) with ``prenorm``.

    The sum x + residual is rounded to residual_out's dtype before it is normalized (as ssmkit's
    kernel does; mamba_ssm normalizes the unrounded fp32 sum): the backward reads residual_out,
    so the gradient is then exactly that of the function computed. In float64 nothing rounds."""
    rdt = residual_dtype(x.dtype, None if residual is None else residual.dtype, residual_in_fp32)
    s = as64(x) if residual is None else as64((as64(x) + as64(residual)).astype(rdt))
    mean, rstd = layer_norm_stats(s, eps, is_rms_norm)
    out = _xhat(s, mean, rstd) * as64(weight)
    if bias is not None:
        out = out + as64(bias)
    out = out.astype(x.dtype)
    if not prenorm:
        return out
    if residual is None and rdt == x.dtype:
        return out, x
    return out, s.astype(rdt)


def layer_norm_bwd(dout, x, weight, bias=None, residual=None, eps=1e-6, dresidual_out=None,
                   is_rms_norm=False, mean=None, rstd=None):
    """Gradients (dx, dweight, dbias, dresidual) of ``layer_norm``: dx in x's dtype, dweight in
    weight's, dbias in bias's (None without bias), dresidual in residual's (None without one).

    ``dresidual_out`` (x's shape) is the gradient of residual_out (prenorm). ``mean`` / ``rstd``
    (the rows' statistics, e.g. saved by a forward) are used when given instead of recomputed
    from x + residual (then ``eps`` is unused)."""
    s = as64(x) if residual is None else as64(x) + as64(residual)
    if rstd is None:
        mean, rstd = layer_norm_stats(s, eps, is_rms_norm)
    elif is_rms_norm:
        mean = None
    xhat = _xhat(s, mean, rstd)
    dy = as64(dout)
    g = dy * as64(weight)
    rows = tuple(range(dy.ndim - 1))
    dweight = np.sum(dy * xhat, axis=rows)
    dbias = None if bias is None else np.sum(dy, axis=rows)
    proj = np.mean(xhat * g, axis=-1, keepdims=True)
    ds = g - xhat * proj
    if not is_rms_norm:
        ds = ds - np.mean(g, axis=-1, keepdims=True)
    ds = ds * as64(rstd)[..., None]
    if dresidual_out is not None:
        ds = ds + as64(dresidual_out)
    return (ds.astype(x.dtype), dweight.astype(weight.dtype),
            None if bias is None else dbias.astype(bias.dtype),
            None if residual is None else ds.astype(residual.dtype))

"""Small numeric helpers shared by the reference implementations.

All helpers work in float64 / complex128.
"""

import numpy as np


def as64(x):
    """Return ``x`` as float64, or complex128 if it is complex (None passes through)."""
    if x is None:
        return None
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def cast_like(value, like):
    """Cast ``value`` to the dtype of ``like``; drop the imaginary part if ``like`` is real.

    Used to turn a float64 / complex128 result (or gradient) back into the dtype of
    the input it belongs to. Returns None if ``like`` is None.
    """
    if like is None:
        return None
    like = np.asarray(like)
    value = np.asarray(value)
    if not np.iscomplexobj(like) and np.iscomplexobj(value):
        value = value.real
    return value.astype(like.dtype)


def state_dtype(u_dtype, is_complex):
    """dtype of a returned scan state: 64-bit for float64 inputs, 32-bit otherwise."""
    if np.dtype(u_dtype) == np.float64:
        return np.dtype(np.complex128 if is_complex else np.float64)
    return np.dtype(np.complex64 if is_complex else np.float32)


def softplus(x):
    """log(1 + exp(x)), computed without overflow."""
    return np.logaddexp(0.0, x)


def sigmoid(x):
    """1 / (1 + exp(-x)), computed without overflow."""
    return np.exp(-np.logaddexp(0.0, -x))


def silu(x):
    """x * sigmoid(x)."""
    return x * sigmoid(x)


def silu_grad(x):
    """d silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def activation_fns(activation):
    """Return (f, f') for activation None / "silu" / "swish"."""
    if activation is None:
        return (lambda x: x), (lambda x: np.ones_like(x))
    if activation in ("silu", "swish"):
        return silu, silu_grad
    raise ValueError(f"unknown activation {activation!r}")

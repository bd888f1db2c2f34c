"""First-order linear recurrence h_t = a_t * h_{t-1} + b_t and its backward.

Complex gradient convention (same as PyTorch): for a real loss ``loss`` and a complex
variable ``x``, the gradient is ``dloss/dRe(x) + 1j * dloss/dIm(x)``. With this
convention, for ``y = a * x`` the gradients are ``grad_a = conj(x) * grad_y`` and
``grad_x = conj(a) * grad_y``. Gradients of real inputs are real (the real part).
"""

import numpy as np

from ._common import as64, cast_like


def _scan_forward(a, b, initial):
    """Forward recurrence on float64/complex128 arrays. a, b: (..., L); initial: (...)."""
    dtype = np.result_type(a, b, initial if initial is not None else np.float64)
    h = np.empty(np.broadcast_shapes(a.shape, b.shape), dtype=dtype)
    prev = np.zeros(h.shape[:-1], dtype=dtype) if initial is None else initial
    for t in range(h.shape[-1]):
        prev = a[..., t] * prev + b[..., t]
        h[..., t] = prev
    return h


def linear_scan(a, b, initial=None, reverse=False):
    """Linear recurrence along the last axis.

    a, b: (..., L), real or complex. initial: (...) or None (zeros).
    Forward:  h_t = a_t * h_{t-1} + b_t for t = 0..L-1, with h_{-1} = initial.
    Reverse:  h_t = a_t * h_{t+1} + b_t for t = L-1..0, with h_L = initial.
    Returns h: (..., L), dtype = result dtype of (a, b).
    """
    out_dtype = np.result_type(a, b)
    a64, b64, init64 = as64(a), as64(b), as64(initial)
    if reverse:
        h = _scan_forward(a64[..., ::-1], b64[..., ::-1], init64)[..., ::-1]
    else:
        h = _scan_forward(a64, b64, init64)
    return h.astype(out_dtype)


def _bwd_forward_direction(a, b, dh, initial, h):
    """Backward of the forward-direction scan (all float64/complex128)."""
    if h is None:
        h = _scan_forward(a, b, initial)
    # Reverse-scan identity: the adjoint g_t = dloss/dh_t (total) satisfies
    #   g_t = dh_t + conj(a_{t+1}) * g_{t+1},  g_{L-1} = dh_{L-1},
    # i.e. a reverse linear scan of dh with the gates shifted by one step.
    a_next = np.zeros_like(a)
    a_next[..., :-1] = a[..., 1:]
    g = _scan_forward(np.conj(a_next)[..., ::-1], dh[..., ::-1], None)[..., ::-1]
    if h.shape[-1] == 0:                 # L = 0: h does not depend on initial
        return g, g, None if initial is None else np.zeros(np.shape(initial), dtype=g.dtype)
    h_prev = np.zeros_like(h)
    h_prev[..., 1:] = h[..., :-1]
    if initial is not None:
        h_prev[..., 0] = initial
    da = g * np.conj(h_prev)
    db = g
    dinitial = None if initial is None else np.conj(a[..., 0]) * g[..., 0]
    return da, db, dinitial


def linear_scan_bwd(a, b, dh, initial=None, reverse=False, h=None):
    """Gradients of ``linear_scan`` given the upstream gradient dh: (..., L).

    h: optional precomputed forward output (..., L).
    Returns (da, db, dinitial), each with the shape and dtype of its input;
    dinitial is None if initial is None. Complex gradients use the PyTorch
    convention (see module docstring): db = g, da_t = g_t * conj(h_{t-1}),
    dinitial = conj(a_0) * g_0 where g is the reverse scan of dh with gates
    conj(a_{t+1}).
    """
    a64, b64, dh64, init64 = as64(a), as64(b), as64(dh), as64(initial)
    h64 = as64(h)
    if reverse:
        flip = lambda x: None if x is None else x[..., ::-1]
        da, db, dinit = _bwd_forward_direction(flip(a64), flip(b64), flip(dh64), init64, flip(h64))
        da, db = flip(da), flip(db)
    else:
        da, db, dinit = _bwd_forward_direction(a64, b64, dh64, init64, h64)
    return cast_like(da, a), cast_like(db, b), cast_like(dinit, initial)

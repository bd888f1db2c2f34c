"""Selective scan (Mamba-1 SSM), forward and explicit backward.

Shapes: B batch, D channels, L length, N state size, G groups.

    u, delta, z:        (B, D, L)
    A:                  (D, N), real or complex
    B, C (each):        constant (D, N), or variable (B, N, L) or (B, G, N, L);
                        channel d uses group d // (D // G); (B, N, L) means G = 1
    D, delta_bias:      (D,)
    initial_state:      (B, D, N) (complex if A is complex)

Math:
    delta' = delta + delta_bias;   delta' = softplus(delta') if delta_softplus
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t      (over N)
    y_t    = sum_n C_t[n] h_t[n]           (real A)
    y_t    = 2 * Re(sum_n C_t[n] h_t[n])   (complex A: the state stands for
                                            conjugate pairs, as upstream Mamba)
    out    = y + D * u;  out = out * silu(z) if z is given

Complex representation: for complex A, B and C may be real arrays or complex-dtype
arrays of the shapes above. (Upstream mamba_ssm instead stores complex variable B/C
as real arrays with real/imag parts interleaved; we do not.)

Complex gradient convention (PyTorch): gradient = dloss/dRe + 1j * dloss/dIm, so
for y = a * x, grad_a = conj(x) * grad_y. Gradients of real inputs are real.
"""

import numpy as np

from ._common import as64, cast_like, sigmoid, silu, silu_grad, softplus, state_dtype


def _expand_bc(X, dim):
    """Per-channel view of B or C: (1, D, N, 1) if constant, else (B, D, N, L)."""
    if X.ndim == 2:
        return X[None, :, :, None]
    if X.ndim == 3:
        X = X[:, None]
    return np.repeat(X, dim // X.shape[1], axis=1)


def _reduce_bc(dX, like):
    """Sum a per-channel gradient dX: (B, D, N, L) back to the shape of ``like``."""
    if like.ndim == 2:
        return dX.sum(axis=(0, 3))
    batch, dim, dstate, length = dX.shape
    groups = 1 if like.ndim == 3 else like.shape[1]
    # explicit sizes: a -1 is ambiguous when a dimension is 0
    return dX.reshape(batch, groups, dim // groups, dstate, length).sum(axis=2).reshape(like.shape)


def _at(X, t):
    """Time slice t of an expanded B/C: (B|1, D, N)."""
    return X[..., t if X.shape[-1] > 1 else 0]


def _effective_delta(delta, delta_bias, delta_softplus):
    """Returns (pre-softplus delta, delta'), both (B, D, L) float64."""
    raw = delta if delta_bias is None else delta + delta_bias[:, None]
    return raw, (softplus(raw) if delta_softplus else raw)


def _run_states(u, dlt, A, Be, Ce, h0):
    """Run the recurrence. Returns hs: (L, B, D, N) and s = sum_n C h: (B, D, L)."""
    batch, dim, length = u.shape
    cplx = any(np.iscomplexobj(x) for x in (A, Be, Ce, h0) if x is not None)
    dtype = np.complex128 if cplx else np.float64
    hs = np.empty((length, batch, dim, A.shape[-1]), dtype=dtype)
    s = np.empty((batch, dim, length), dtype=dtype)
    h = np.zeros(hs.shape[1:], dtype=dtype) if h0 is None else h0
    for t in range(length):
        decay = np.exp(dlt[:, :, t, None] * A)
        h = decay * h + (dlt[:, :, t] * u[:, :, t])[..., None] * _at(Be, t)
        hs[t] = h
        s[:, :, t] = (_at(Ce, t) * h).sum(axis=-1)
    return hs, s


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, initial_state=None, return_last_state=False):
    """Selective scan forward (see module docstring for shapes and math).

    Returns out: (B, D, L) in u's dtype; with return_last_state also
    last_state = h_{L-1}: (B, D, N), float64/complex128 for float64 u, else
    float32/complex64.
    """
    u64, A64 = as64(u), as64(A)
    _, dlt = _effective_delta(as64(delta), as64(delta_bias), delta_softplus)
    dim = u.shape[1]
    hs, s = _run_states(u64, dlt, A64, _expand_bc(as64(B), dim), _expand_bc(as64(C), dim),
                        as64(initial_state))
    cplx = np.iscomplexobj(A64)
    out = 2.0 * s.real if cplx else s.real
    if D is not None:
        out = out + as64(D)[:, None] * u64
    if z is not None:
        out = out * silu(as64(z))
    out = out.astype(u.dtype)
    if not return_last_state:
        return out
    if u.shape[-1] > 0:
        last = hs[-1]
    elif initial_state is not None:
        last = as64(initial_state)
    else:
        last = np.zeros(hs.shape[1:], dtype=hs.dtype)
    return out, last.astype(state_dtype(u.dtype, np.iscomplexobj(last)))


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None, dlast_state=None):
    """Explicit backward of ``selective_scan``.

    dout: (B, D, L); dlast_state: optional (B, D, N) gradient flowing into last_state.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), each with the
    shape and dtype of its input (None where the input is None).

    Adjoint recurrence (reverse loop over L), with g_t = dloss/dh_t:
        g_t = conj(C_t) ds_t + conj(exp(delta'_{t+1} A)) g_{t+1},  g_{L-1} += dlast_state
    where ds = dy (real A) or 2 dy (complex A, since y = 2 Re s).
    """
    u64, A64, dout64 = as64(u), as64(A), as64(dout)
    B64, C64, h0 = as64(B), as64(C), as64(initial_state)
    raw, dlt = _effective_delta(as64(delta), as64(delta_bias), delta_softplus)
    batch, dim, length = u.shape
    Be, Ce = _expand_bc(B64, dim), _expand_bc(C64, dim)
    hs, s = _run_states(u64, dlt, A64, Be, Ce, h0)
    cplx = np.iscomplexobj(A64)

    # Output stage: out = (y + D u) * silu(z).
    y = 2.0 * s.real if cplx else s.real
    pre = y if D is None else y + as64(D)[:, None] * u64
    dz = None
    dpre = dout64
    if z is not None:
        z64 = as64(z)
        dpre = dout64 * silu(z64)
        dz = dout64 * pre * silu_grad(z64)
    dD = None
    du = np.zeros((batch, dim, length))
    if D is not None:
        dD = (dpre * u64).sum(axis=(0, 2))
        du += dpre * as64(D)[:, None]
    ds = 2.0 * dpre if cplx else dpre

    # Reverse loop with the adjoint state g = dloss/dh_t.
    dBe = np.zeros((batch, dim, A.shape[-1], length), dtype=hs.dtype)
    dCe = np.zeros_like(dBe)
    dA = np.zeros(A.shape, dtype=hs.dtype)
    ddlt = np.zeros((batch, dim, length))
    g = np.zeros(hs.shape[1:], dtype=hs.dtype)
    if dlast_state is not None:
        g = g + as64(dlast_state)
    for t in reversed(range(length)):
        B_t, C_t = _at(Be, t), _at(Ce, t)
        ds_t = ds[:, :, t, None]
        dCe[..., t] = np.conj(hs[t]) * ds_t
        g = g + np.conj(C_t) * ds_t
        # h_t = decay * h_prev + (delta' u)_t * B_t, decay = exp(delta'_t * A)
        decay = np.exp(dlt[:, :, t, None] * A64)
        if t > 0:
            h_prev = hs[t - 1]
        elif h0 is not None:
            h_prev = h0
        else:
            h_prev = np.zeros_like(g)
        g_w = np.conj(decay) * g * np.conj(h_prev)       # gradient wrt delta'_t * A
        dA += (dlt[:, :, t, None] * g_w).sum(axis=0)
        ddlt[:, :, t] += (np.conj(A64) * g_w).real.sum(axis=-1)
        dBe[..., t] = (dlt[:, :, t] * u64[:, :, t])[..., None] * g
        gB = (np.conj(B_t) * g).real.sum(axis=-1)         # gradient wrt (delta' u)_t
        ddlt[:, :, t] += gB * u64[:, :, t]
        du[:, :, t] += gB * dlt[:, :, t]
        g = np.conj(decay) * g
    dinit = g

    ddelta = ddlt * sigmoid(raw) if delta_softplus else ddlt
    ddelta_bias = None if delta_bias is None else ddelta.sum(axis=(0, 2))
    return (
        cast_like(du, u),
        cast_like(ddelta, delta),
        cast_like(dA, A),
        cast_like(_reduce_bc(dBe, B64), B),
        cast_like(_reduce_bc(dCe, C64), C),
        cast_like(dD, D),
        cast_like(dz, z),
        cast_like(ddelta_bias, delta_bias),
        cast_like(dinit, initial_state),
    )

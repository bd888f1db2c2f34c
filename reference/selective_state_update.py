"""Single-token selective state update (decode step of Mamba-1 / Mamba-2).

Shapes (B batch, D channels, N state, H heads, P head dim, G groups):

    Mamba-1:  state (B, D, N); x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,)
    Mamba-2:  state (B, H, P, N); x, dt, z (B, H, P); A (H, P, N); B, C (B, G, N)
              with G dividing H (head h uses group h // (H // G)); D, dt_bias (H, P)

The state may be a pool (B_pool, ...) addressed by state_batch_indices (B,); a
negative index marks padding: that state row is untouched and the output is zero.

Math:
    dt' = dt + dt_bias;  dt' = softplus(dt') if dt_softplus
    state = state * exp(A * dt') + B * dt' * x          (broadcast over N)
    out   = sum_n state * C + D * x;  out = out * silu(z) if z is given
"""

import numpy as np

from ._common import as64, silu, softplus


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None):
    """One recurrence step, updating ``state`` in place (in its own dtype).

    Returns out with x's shape and dtype. Computation is in float64.
    """
    mamba1 = state.ndim == 3
    # Normalize to head form: (B, H, P, ...), with Mamba-1 as H = 1, P = D, G = 1.
    lift = (lambda v: None if v is None else as64(v)[:, None]) if mamba1 else as64
    x64, dt64, z64 = lift(x), lift(dt), lift(z)
    A64 = as64(A)[None] if mamba1 else as64(A)                   # (H, P, N)
    B64, C64 = lift(B), lift(C)                                  # (B, G, N)
    D64 = None if D is None else (as64(D)[None] if mamba1 else as64(D))  # (H, P)
    bias64 = None if dt_bias is None else (as64(dt_bias)[None] if mamba1 else as64(dt_bias))

    batch = x64.shape[0]
    heads = A64.shape[0]
    rows = np.arange(batch) if state_batch_indices is None else np.asarray(state_batch_indices).astype(np.int64)
    live = rows >= 0
    st = as64(state[np.where(live, rows, 0)])
    st = st[:, None] if mamba1 else st                           # (B, H, P, N)

    if bias64 is not None:
        dt64 = dt64 + bias64
    if dt_softplus:
        dt64 = softplus(dt64)
    repeat = heads // B64.shape[1]
    Bh = np.repeat(B64, repeat, axis=1)[:, :, None, :]           # (B, H, 1, N)
    Ch = np.repeat(C64, repeat, axis=1)[:, :, None, :]
    st = st * np.exp(A64 * dt64[..., None]) + Bh * (dt64 * x64)[..., None]
    out = (st * Ch).sum(axis=-1)
    if D64 is not None:
        out = out + D64 * x64
    if z64 is not None:
        out = out * silu(z64)
    out = np.where(live[:, None, None], out, 0.0)

    new_state = st[:, 0] if mamba1 else st
    for b in np.nonzero(live)[0]:
        state[rows[b]] = new_state[b].astype(state.dtype)
    if mamba1:
        out = out[:, 0]
    return out.astype(x.dtype)

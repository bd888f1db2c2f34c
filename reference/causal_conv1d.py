"""Depthwise causal 1-D convolution (Mamba's short conv), forward, backward and
single-step / chunked state update.

Shapes: B batch, D channels, L length, W kernel width, S state length.

    x:               (B, D, L)
    weight:          (D, W)
    bias:            (D,)
    initial_states:  (B, D, W-1), last column is time -1
    seq_idx:         (B, L) int; token t sees only tokens s with
                     seq_idx[b, s] == seq_idx[b, t]; initial_states belong to the
                     sequence seq_idx[b, 0]; negative values mark padding tokens:
                     their output is exactly 0 and they contribute to nothing.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * xx[b, d, t - (W-1) + k])

where xx is x extended to negative time with initial_states (zeros if None).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._common import activation_fns, as64, cast_like


def _extended_input(x, initial_states, width):
    """concat(initial_states or zeros, x) along time: (B, D, W-1+L) float64."""
    batch, dim, _ = x.shape
    init = np.zeros((batch, dim, width - 1)) if initial_states is None else as64(initial_states)
    return np.concatenate([init, as64(x)], axis=-1)


def _visibility(seq_idx, width):
    """mask (B, L, W): True if input at time t-(W-1)+k is visible to output t;
    valid (B, L): True where token t is not padding. (None, None) without seq_idx."""
    if seq_idx is None:
        return None, None
    s = np.asarray(seq_idx).astype(np.int64)
    if s.shape[1] == 0:
        return np.zeros((s.shape[0], 0, width), bool), np.zeros(s.shape, bool)
    ext = np.concatenate([np.repeat(s[:, :1], width - 1, axis=1), s], axis=1)
    windows = sliding_window_view(ext, width, axis=1)           # (B, L, W)
    valid = s >= 0
    mask = (windows == s[:, :, None]) & valid[:, :, None]
    return mask, valid


def _windows(x, weight, initial_states, seq_idx):
    """Masked input windows (B, D, L, W), validity (B, L) or None, extended input.
    Invisible entries are selected away (np.where), not multiplied by 0: a NaN in another
    sequence's token must not reach this one."""
    width = weight.shape[-1]
    xx = _extended_input(x, initial_states, width)
    if x.shape[-1] == 0:                                         # L = 0: no windows
        win = np.zeros(x.shape + (width,))
    else:
        win = sliding_window_view(xx, width, axis=-1)            # (B, D, L, W)
    mask, valid = _visibility(seq_idx, width)
    if mask is not None:
        win = np.where(mask[:, None], win, 0.0)
    return win, mask, valid, xx


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None,
                  initial_states=None, return_final_states=False):
    """Causal depthwise conv forward.

    Returns out: (B, D, L) in x's dtype; with return_final_states also
    final_states: (B, D, W-1) = last W-1 time steps of concat(initial_states or
    zeros, x) (raw inputs, seq_idx is ignored), in x's dtype.
    """
    act, _ = activation_fns(activation)
    win, _, valid, xx = _windows(x, weight, initial_states, seq_idx)
    pre = np.einsum("bdlw,dw->bdl", win, as64(weight))
    if bias is not None:
        pre = pre + as64(bias)[:, None]
    out = act(pre)
    if valid is not None:
        out = np.where(valid[:, None, :], out, 0.0)
    out = out.astype(x.dtype)
    if not return_final_states:
        return out
    width = weight.shape[-1]
    final = xx[..., xx.shape[-1] - (width - 1):]
    return out, final.astype(x.dtype)


def causal_conv1d_bwd(x, weight, bias, dout, activation=None, seq_idx=None,
                      initial_states=None, dfinal_states=None):
    """Backward of ``causal_conv1d``.

    dout: (B, D, L); dfinal_states: optional (B, D, W-1) gradient of final_states.
    Returns (dx, dweight, dbias, dinitial_states) in the dtypes of their inputs;
    dbias is None if bias is None, dinitial_states None if initial_states is None.
    """
    _, act_grad = activation_fns(activation)
    w64 = as64(weight)
    width = weight.shape[-1]
    length = x.shape[-1]
    win, mask, valid, _ = _windows(x, weight, initial_states, seq_idx)
    pre = np.einsum("bdlw,dw->bdl", win, w64)
    if bias is not None:
        pre = pre + as64(bias)[:, None]
    dpre = as64(dout) * act_grad(pre)
    if valid is not None:
        dpre = np.where(valid[:, None, :], dpre, 0.0)
    dbias = None if bias is None else dpre.sum(axis=(0, 2))
    dweight = np.einsum("bdlw,bdl->dw", win, dpre)
    contrib = np.einsum("bdl,dw->bdlw", dpre, w64)               # grad wrt window entries
    if mask is not None:
        contrib = np.where(mask[:, None], contrib, 0.0)
    dxx = np.zeros(x.shape[:2] + (width - 1 + length,))
    for k in range(width):
        dxx[..., k:k + length] += contrib[..., k]
    if dfinal_states is not None:
        dxx[..., dxx.shape[-1] - (width - 1):] += as64(dfinal_states)
    dinit = None if initial_states is None else dxx[..., :width - 1]
    dx = dxx[..., width - 1:]
    return cast_like(dx, x), cast_like(dweight, weight), cast_like(dbias, bias), cast_like(dinit, initial_states)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         cache_seqlens=None, conv_state_indices=None):
    """Decode-time conv on new tokens, updating ``conv_state`` in place.

    x: (B, D) or (B, D, L_new). conv_state: (B_pool, D, S), S >= W-1, written back
    in its own dtype. conv_state_indices: (B,) int, batch row b uses state row
    conv_state_indices[b] (default b); a negative index marks padding: state
    untouched, output zeros.

    Without cache_seqlens the state is a shift register: token t's window is the
    last W values of concat(state_row, x[:t+1]); afterwards state_row = last S values
    of concat(state_row, x).
    With cache_seqlens (B,) int the state row is a ring buffer: token t is written at
    position (cache_seqlens[b] + t) % S, and its W-1 previous values are read from
    positions (cache_seqlens[b] + t - j) % S, j = 1..W-1 (read before the write).

    Returns out with x's shape and dtype.
    """
    act, _ = activation_fns(activation)
    x3 = x[..., None] if x.ndim == 2 else x
    batch, dim, new_len = x3.shape
    width = weight.shape[-1]
    state_len = conv_state.shape[-1]
    w64 = as64(weight)
    b64 = np.zeros(dim) if bias is None else as64(bias)
    xs = as64(x3)
    out = np.zeros((batch, dim, new_len))
    for b in range(batch):
        row = b if conv_state_indices is None else int(conv_state_indices[b])
        if row < 0:
            continue
        state = as64(conv_state[row])                              # (D, S)
        if cache_seqlens is None:
            full = np.concatenate([state, xs[b]], axis=-1)         # (D, S + L_new)
            for t in range(new_len):
                window = full[:, state_len + t + 1 - width: state_len + t + 1]
                out[b, :, t] = act(b64 + (w64 * window).sum(axis=-1))
            state = full[:, full.shape[-1] - state_len:]
        else:
            start = int(cache_seqlens[b])
            for t in range(new_len):
                prev_pos = (start + t - np.arange(width - 1, 0, -1)) % state_len
                window = np.concatenate([state[:, prev_pos], xs[b, :, t:t + 1]], axis=-1)
                out[b, :, t] = act(b64 + (w64 * window).sum(axis=-1))
                state[:, (start + t) % state_len] = xs[b, :, t]
        conv_state[row] = state.astype(conv_state.dtype)
    if x.ndim == 2:
        out = out[..., 0]
    return out.astype(x.dtype)

"""Self-tests of the float64 NumPy reference implementations.

* every backward against Richardson-extrapolated central finite differences
  (random projections, each input separately, real and imaginary directions),
* algebraic identities (reverse-scan identity, chaining, decode step == scan step,
  conv update == last columns of the full conv),
* small hand-computed cases and dtype cast-back.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

try:
    from ssmkit.reference import (causal_conv1d, causal_conv1d_bwd, causal_conv1d_update,
                                  linear_scan, linear_scan_bwd, selective_scan,
                                  selective_scan_bwd, selective_state_update)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reference import (causal_conv1d, causal_conv1d_bwd, causal_conv1d_update,
                           linear_scan, linear_scan_bwd, selective_scan,
                           selective_scan_bwd, selective_state_update)

try:
    from strategies import (conv_problems, conv_update_problems, scan_problems, seeds,
                            ssu_problems)
except ImportError:
    from tests.strategies import (conv_problems, conv_update_problems, scan_problems, seeds,
                                  ssu_problems)

SETTINGS = settings(max_examples=200, deadline=None)
EPS = 3e-4   # Richardson step: truncation ~EPS**4, roundoff ~1e-16 |loss| / EPS
RTOL = 1e-6


# --------------------------------------------------------------------------- helpers


def _directional_fd(loss, x, v):
    """Richardson-extrapolated central difference of ``loss`` at x along v."""
    def central(e):
        return (loss(x + e * v) - loss(x - e * v)) / (2 * e)
    return (4 * central(EPS / 2) - central(EPS)) / 3


def check_grad(loss, x, grad, rng, name):
    """Compare <grad, v> with the finite difference of ``loss`` along random v.

    Complex x: grad uses the PyTorch convention dloss/dRe + 1j dloss/dIm, so the
    directional derivative along v is Re(sum(conj(grad) * v)); real and imaginary
    directions are checked separately.
    """
    assert grad.shape == x.shape, name
    assert grad.dtype == x.dtype, name
    dirs = [rng.standard_normal(x.shape)]
    if np.iscomplexobj(x):
        dirs.append(1j * rng.standard_normal(x.shape))
    for v in dirs:
        analytic = np.real(np.vdot(grad, v))
        fd = _directional_fd(loss, x, v)
        scale = max(abs(analytic), abs(fd), 1e-3 * np.linalg.norm(grad) * np.linalg.norm(v))
        assert abs(analytic - fd) <= RTOL * scale + 1e-11, (name, analytic, fd)


def _weights(rng, shape, cplx=False):
    w = rng.standard_normal(shape)
    return w + 1j * rng.standard_normal(shape) if cplx else w


def _slice_bc(X, sl):
    """Slice a variable B/C along L (constant (D, N) B/C is returned unchanged)."""
    return X if X.ndim == 2 else X[..., sl]


# --------------------------------------------------------------------------- linear scan


@st.composite
def linear_scan_inputs(draw):
    rng = np.random.default_rng(draw(seeds()))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 40)))
    cplx = draw(st.booleans())
    a = rng.uniform(0.3, 1.0, shape)
    b = _weights(rng, shape, cplx)
    if cplx:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    initial = _weights(rng, shape[:-1], cplx) if draw(st.booleans()) else None
    return rng, a, b, initial, draw(st.booleans())


@SETTINGS
@given(linear_scan_inputs())
def test_linear_scan_grad_fd(case):
    rng, a, b, initial, reverse = case
    w = _weights(rng, a.shape, np.iscomplexobj(b) or np.iscomplexobj(a))

    def loss(a_, b_, init_):
        return np.real(np.vdot(w, linear_scan(a_, b_, init_, reverse=reverse)))

    da, db, dinit = linear_scan_bwd(a, b, w, initial, reverse=reverse)
    check_grad(lambda x: loss(x, b, initial), a, da, rng, "a")
    check_grad(lambda x: loss(a, x, initial), b, db, rng, "b")
    if initial is None:
        assert dinit is None
    else:
        check_grad(lambda x: loss(a, b, x), initial, dinit, rng, "initial")


def _transfer_matrix(a):
    """M with h = M b for the forward scan of 1-D gates a: M[t, s] = prod_{s<r<=t} a_r."""
    L = a.shape[0]
    M = np.zeros((L, L), dtype=a.dtype)
    for t in range(L):
        for s in range(t + 1):
            M[t, s] = np.prod(a[s + 1:t + 1])
    return M


@SETTINGS
@given(linear_scan_inputs())
def test_reverse_scan_identity(case):
    rng, a, b, initial, _ = case
    a1, b1 = a[0, 0], b[0, 0]
    dh = _weights(rng, a1.shape, True)
    # Backward of the forward scan: db = M^H dh ...
    _, db, _ = linear_scan_bwd(a1.astype(complex), b1.astype(complex), dh)
    np.testing.assert_allclose(db, _transfer_matrix(a1).conj().T @ dh, rtol=1e-10, atol=1e-12)
    # ... which is the reverse scan of dh with gates shifted by one (conjugated).
    shifted = np.append(a1[1:], 0.0)
    np.testing.assert_allclose(db, linear_scan(np.conj(shifted), dh, reverse=True),
                               rtol=1e-12, atol=1e-12)


def test_linear_scan_by_hand():
    a, b = np.array([2.0, 3.0]), np.array([1.0, 1.0])
    np.testing.assert_allclose(linear_scan(a, b, np.array(1.0)), [3.0, 10.0])
    np.testing.assert_allclose(linear_scan(a, b, np.array(1.0), reverse=True), [9.0, 4.0])
    np.testing.assert_allclose(linear_scan(a, b), [1.0, 4.0])


# --------------------------------------------------------------------------- selective scan

SCAN_GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@SETTINGS
@given(scan_problems(), st.booleans(), seeds())
def test_selective_scan_grad_fd(p, use_dlast, seed):
    rng = np.random.default_rng(seed)
    out, last = selective_scan(**p, return_last_state=True)
    w = rng.standard_normal(out.shape)
    wl = _weights(rng, last.shape, np.iscomplexobj(last)) if use_dlast else None

    def loss(name, value):
        out_, last_ = selective_scan(**{**p, name: value}, return_last_state=True)
        total = np.sum(out_ * w)
        if wl is not None:
            total += np.real(np.vdot(wl, last_))
        return total

    grads = dict(zip(SCAN_GRAD_NAMES, selective_scan_bwd(w, **p, dlast_state=wl)))
    for name in SCAN_GRAD_NAMES:
        if p[name] is None:
            assert grads[name] is None, name
        else:
            check_grad(lambda x: loss(name, x), p[name], grads[name], rng, name)


@SETTINGS
@given(scan_problems(min_seqlen=2), st.data())
def test_selective_scan_chaining(p, data):
    L = p["u"].shape[-1]
    k = data.draw(st.integers(1, L - 1))
    out, last = selective_scan(**p, return_last_state=True)

    def part(sl, init):
        q = dict(p, initial_state=init)
        for name in ("u", "delta", "z"):
            if q[name] is not None:
                q[name] = q[name][..., sl]
        q["B"], q["C"] = _slice_bc(p["B"], sl), _slice_bc(p["C"], sl)
        return selective_scan(**q, return_last_state=True)

    out1, mid = part(slice(0, k), p["initial_state"])
    out2, last2 = part(slice(k, L), mid)
    np.testing.assert_allclose(np.concatenate([out1, out2], axis=-1), out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(last2, last, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(scan_problems(max_seqlen=12))
def test_selective_scan_state_is_linear_scan(p):
    """Each state coordinate (b, d, n) follows a linear scan with a = exp(delta' A)."""
    _, last = selective_scan(**p, return_last_state=True)
    u, A = p["u"], p["A"]
    Bsz, D, L = u.shape
    N = A.shape[1]
    delta = p["delta"] + (0 if p["delta_bias"] is None else p["delta_bias"][:, None])
    if p["delta_softplus"]:
        delta = np.logaddexp(0, delta)
    Bx = p["B"]
    if Bx.ndim == 2:
        Bx = np.broadcast_to(Bx[None, :, :, None], (Bsz, D, N, L))
    else:
        Bx = Bx[:, None] if Bx.ndim == 3 else Bx
        Bx = np.repeat(Bx, D // Bx.shape[1], axis=1)
    a = np.exp(delta[:, :, None, :] * A[None, :, :, None])              # (B, D, N, L)
    b = (delta * u)[:, :, None, :] * Bx
    h = linear_scan(a, b, p["initial_state"])
    np.testing.assert_allclose(h[..., -1], last, rtol=1e-10, atol=1e-12)


def test_selective_scan_by_hand():
    # One channel, one state, L = 1: h = exp(dt A) h0 + dt B u, out = (C h + D u) silu(z)
    u, dt, A, B, C, D, z, h0 = 2.0, 0.5, -1.0, 3.0, 4.0, 0.25, 1.5, 0.7
    h = np.exp(dt * A) * h0 + dt * B * u
    expected = (C * h + D * u) * z / (1 + np.exp(-z))
    out, last = selective_scan(
        np.full((1, 1, 1), u), np.full((1, 1, 1), dt), np.full((1, 1), A),
        np.full((1, 1), B), np.full((1, 1, 1), C), D=np.array([D]), z=np.full((1, 1, 1), z),
        initial_state=np.full((1, 1, 1), h0), return_last_state=True)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-14)
    np.testing.assert_allclose(last[0, 0, 0], h, rtol=1e-14)
    # Complex A: y = 2 Re(C h).
    Ac = -1.0 + 2.0j
    out = selective_scan(np.full((1, 1, 1), u), np.full((1, 1, 1), dt), np.full((1, 1), Ac),
                         np.full((1, 1), B + 1j), np.full((1, 1), C - 2j))
    np.testing.assert_allclose(out[0, 0, 0], 2 * ((C - 2j) * (dt * (B + 1j) * u)).real, rtol=1e-14)


# --------------------------------------------------------------------------- state update


@SETTINGS
@given(scan_problems(bc_kinds=["var"], complex_A=False, max_seqlen=8))
def test_state_update_steps_equal_scan(p):
    out, last = selective_scan(**p, return_last_state=True)
    Bsz, D, K = p["u"].shape
    state = (np.zeros((Bsz, D, p["A"].shape[1])) if p["initial_state"] is None
             else p["initial_state"].copy())
    steps = []
    for t in range(K):
        steps.append(selective_state_update(
            state, p["u"][..., t], p["delta"][..., t], p["A"], p["B"][..., t], p["C"][..., t],
            D=p["D"], z=None if p["z"] is None else p["z"][..., t], dt_bias=p["delta_bias"],
            dt_softplus=p["delta_softplus"]))
    np.testing.assert_allclose(np.stack(steps, axis=-1), out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state, last, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(ssu_problems(mamba2=True))
def test_state_update_mamba2_reduces_to_scan(p):
    state0 = p["state"].copy()
    Bp, H, P, N = state0.shape
    Bsz = p["x"].shape[0]
    out = selective_state_update(**p)
    idx = p["state_batch_indices"]
    rows = np.arange(Bsz) if idx is None else idx.astype(int)
    live = rows >= 0
    flat = lambda v: None if v is None else v.reshape(v.shape[0], H * P)
    vec = lambda v: None if v is None else v.reshape(H * P)
    # Reference: selective_scan with L = 1 over D = H * P channels and grouped B/C.
    exp_out, exp_state = selective_scan(
        flat(p["x"])[..., None], flat(p["dt"])[..., None], p["A"].reshape(H * P, N),
        p["B"][..., None], p["C"][..., None], D=vec(p["D"]),
        z=None if p["z"] is None else flat(p["z"])[..., None], delta_bias=vec(p["dt_bias"]),
        delta_softplus=p["dt_softplus"],
        initial_state=state0[np.where(live, rows, 0)].reshape(Bsz, H * P, N),
        return_last_state=True)
    exp_out = np.where(live[:, None], exp_out[..., 0], 0.0).reshape(Bsz, H, P)
    np.testing.assert_allclose(out, exp_out, rtol=1e-10, atol=1e-12)
    expected_pool = state0.copy()
    expected_pool[rows[live]] = exp_state[live].reshape(-1, H, P, N)
    np.testing.assert_allclose(p["state"], expected_pool, rtol=1e-10, atol=1e-12)
    assert np.array_equal(p["state"][np.setdiff1d(np.arange(Bp), rows[live])],
                          state0[np.setdiff1d(np.arange(Bp), rows[live])])
    if p["B"].shape[1] == 1:
        # With one group, the Mamba-2 head layout is Mamba-1 with D = H * P.
        st1 = state0.reshape(Bp, H * P, N).copy()
        out1 = selective_state_update(
            st1, flat(p["x"]), flat(p["dt"]), p["A"].reshape(H * P, N), p["B"][:, 0],
            p["C"][:, 0], D=vec(p["D"]), z=flat(p["z"]), dt_bias=vec(p["dt_bias"]),
            dt_softplus=p["dt_softplus"], state_batch_indices=idx)
        np.testing.assert_allclose(out1.reshape(out.shape), out, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(st1.reshape(p["state"].shape), p["state"], rtol=1e-12, atol=1e-14)


@SETTINGS
@given(ssu_problems(mamba2=False))
def test_state_update_pool_indices(p):
    """Pool addressing equals a call on the gathered rows; padding rows output 0."""
    state0 = p["state"].copy()
    idx = p["state_batch_indices"]
    out = selective_state_update(**p)
    Bsz = p["x"].shape[0]
    rows = np.arange(Bsz) if idx is None else idx.astype(int)
    live = rows >= 0
    gathered = state0[np.where(live, rows, 0)].copy()
    exp_out = selective_state_update(**dict(p, state=gathered, state_batch_indices=None))
    np.testing.assert_allclose(out, np.where(live[:, None], exp_out, 0.0), rtol=1e-12, atol=1e-14)
    expected_pool = state0.copy()
    expected_pool[rows[live]] = gathered[live]
    assert np.array_equal(p["state"], expected_pool)


def test_state_update_by_hand():
    state = np.array([[[1.0, 2.0]]])                     # (B=1, D=1, N=2)
    A = np.array([[-1.0, -2.0]])
    out = selective_state_update(state, np.array([[3.0]]), np.array([[0.5]]), A,
                                 np.array([[1.0, -1.0]]), np.array([[2.0, 1.0]]),
                                 D=np.array([10.0]))
    new = np.array([1.0 * np.exp(-0.5) + 1.5, 2.0 * np.exp(-1.0) - 1.5])
    np.testing.assert_allclose(state[0, 0], new, rtol=1e-14)
    np.testing.assert_allclose(out[0, 0], 2 * new[0] + new[1] + 30.0, rtol=1e-14)


# --------------------------------------------------------------------------- causal conv1d

CONV_GRAD_NAMES = ["x", "weight", "bias", "initial_states"]


@SETTINGS
@given(conv_problems(), st.booleans(), seeds())
def test_causal_conv1d_grad_fd(p, use_dfinal, seed):
    rng = np.random.default_rng(seed)
    out, final = causal_conv1d(**p, return_final_states=True)
    w = rng.standard_normal(out.shape)
    wf = rng.standard_normal(final.shape) if use_dfinal else None

    def loss(name, value):
        out_, final_ = causal_conv1d(**{**p, name: value}, return_final_states=True)
        return np.sum(out_ * w) + (0.0 if wf is None else np.sum(final_ * wf))

    grads = dict(zip(CONV_GRAD_NAMES, causal_conv1d_bwd(
        p["x"], p["weight"], p["bias"], w, activation=p["activation"], seq_idx=p["seq_idx"],
        initial_states=p["initial_states"], dfinal_states=wf)))
    for name in CONV_GRAD_NAMES:
        if p[name] is None:
            assert grads[name] is None, name
        else:
            check_grad(lambda x: loss(name, x), p[name], grads[name], rng, name)


@SETTINGS
@given(conv_problems(seq_idx=True))
def test_causal_conv1d_seq_idx_padding(p):
    """Padding outputs are exactly 0; changing padding inputs changes nothing."""
    out = causal_conv1d(**p)
    pad = p["seq_idx"] < 0
    assert np.all(out[np.broadcast_to(pad[:, None], out.shape)] == 0.0)
    x2 = np.where(pad[:, None], 123.0, p["x"])
    np.testing.assert_array_equal(causal_conv1d(**dict(p, x=x2)), out)
    # Each segment equals an independent conv of that segment alone.
    for b in range(out.shape[0]):
        for sid in np.unique(p["seq_idx"][b]):
            if sid < 0:
                continue
            cols = np.nonzero(p["seq_idx"][b] == sid)[0]
            init = None
            if p["initial_states"] is not None and sid == p["seq_idx"][b, 0]:
                init = p["initial_states"][b:b + 1]
            seg = causal_conv1d(p["x"][b:b + 1, :, cols], p["weight"], p["bias"],
                                p["activation"], initial_states=init)
            np.testing.assert_allclose(out[b:b + 1, :, cols], seg, rtol=1e-12, atol=1e-14)


@SETTINGS
@given(conv_problems(seq_idx=False), st.data())
def test_causal_conv1d_chaining(p, data):
    L = p["x"].shape[-1]
    if L < 2:
        return
    k = data.draw(st.integers(1, L - 1))
    out, final = causal_conv1d(**p, return_final_states=True)
    out1, mid = causal_conv1d(**dict(p, x=p["x"][..., :k]), return_final_states=True)
    out2, final2 = causal_conv1d(**dict(p, x=p["x"][..., k:], initial_states=mid),
                                 return_final_states=True)
    np.testing.assert_allclose(np.concatenate([out1, out2], -1), out, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(final2, final)


@SETTINGS
@given(conv_update_problems())
def test_causal_conv1d_update_matches_full_conv(p):
    pool0 = p["conv_state"].copy()
    x3 = p["x"][..., None] if p["x"].ndim == 2 else p["x"]
    Bsz, D, n = x3.shape
    S = pool0.shape[-1]
    idx, seqlens = p["conv_state_indices"], p["cache_seqlens"]
    out = causal_conv1d_update(**p)
    assert out.shape == p["x"].shape
    out3 = out[..., None] if out.ndim == 2 else out
    rows = np.arange(Bsz) if idx is None else idx.astype(int)
    expected_pool = pool0.copy()
    for b in range(Bsz):
        r = rows[b]
        if r < 0:
            assert np.all(out3[b] == 0.0)
            continue
        if seqlens is None:
            history = pool0[r]
        else:
            history = pool0[r][:, (seqlens[b] - S + np.arange(S)) % S]   # oldest first
        full = np.concatenate([history, x3[b]], axis=-1)
        ref = causal_conv1d(full[None], p["weight"], p["bias"], p["activation"])[0, :, S:]
        np.testing.assert_allclose(out3[b], ref, rtol=1e-12, atol=1e-14)
        if seqlens is None:
            expected_pool[r] = full[:, n:]
        else:
            expected_pool[r][:, (seqlens[b] + n - S + np.arange(S)) % S] = full[:, n:]
    np.testing.assert_array_equal(p["conv_state"], expected_pool)


def test_causal_conv1d_by_hand():
    x = np.array([[[3.0]]])
    w = np.array([[2.0, 5.0]])
    out, final = causal_conv1d(x, w, np.array([1.0]), initial_states=np.array([[[7.0]]]),
                               return_final_states=True)
    assert out[0, 0, 0] == 1 + 2 * 7 + 5 * 3
    assert final[0, 0, 0] == 3.0
    silu30 = causal_conv1d(x, w, np.array([1.0]), "silu", initial_states=np.array([[[7.0]]]))
    np.testing.assert_allclose(silu30[0, 0, 0], 30.0 / (1 + np.exp(-30.0)), rtol=1e-15)
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    w = np.array([[10.0, 1.0]])
    np.testing.assert_allclose(causal_conv1d(x, w)[0, 0], [1.0, 12.0, 23.0, 34.0])
    seq_idx = np.array([[0, 0, 1, -1]], dtype=np.int32)
    np.testing.assert_allclose(causal_conv1d(x, w, np.array([0.5]), seq_idx=seq_idx)[0, 0],
                               [1.5, 12.5, 3.5, 0.0])
    # Shift-register update: state [1, 2], W = 3, new token 4 -> window [1, 2, 4].
    state = np.array([[[1.0, 2.0]]])
    out = causal_conv1d_update(np.array([[4.0]]), state, np.array([[1.0, 10.0, 100.0]]))
    assert out[0, 0] == 1 + 20 + 400
    np.testing.assert_array_equal(state[0, 0], [2.0, 4.0])
    # Ring buffer, S = 2, cache_seqlens = 3: previous values at positions 1 (t-2), 0 (t-1).
    state = np.array([[[1.0, 2.0]]])
    out = causal_conv1d_update(np.array([[4.0]]), state, np.array([[1.0, 10.0, 100.0]]),
                               cache_seqlens=np.array([3], dtype=np.int32))
    assert out[0, 0] == 2 + 10 + 400
    np.testing.assert_array_equal(state[0, 0], [1.0, 4.0])


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtype_cast_back(dtype):
    rng = np.random.default_rng(0)
    cdtype = np.complex64
    Bsz, D, L, N, W = 2, 4, 5, 3, 4
    c = lambda *s: rng.standard_normal(s).astype(dtype)
    u, z, delta = c(Bsz, D, L), c(Bsz, D, L), rng.uniform(0.1, 1, (Bsz, D, L)).astype(dtype)
    A = (-np.exp(rng.standard_normal((D, N)))).astype(dtype)
    Bv, Cv, Dv, bias = c(Bsz, N, L), c(D, N), c(D), c(D)
    out, last = selective_scan(u, delta, A, Bv, Cv, Dv, z, bias, True, return_last_state=True)
    assert out.dtype == dtype and last.dtype == np.float32
    grads = selective_scan_bwd(out, u, delta, A, Bv, Cv, Dv, z, bias, True, c(Bsz, D, N), c(Bsz, D, N))
    for g, x in zip(grads, (u, delta, A, Bv, Cv, Dv, z, bias)):
        assert g.dtype == dtype and g.shape == x.shape
    assert grads[-1].dtype == dtype
    # Complex A with real u: last state complex64, dA complex64, real B keeps its dtype.
    Ac = (A + 1j * rng.standard_normal((D, N))).astype(cdtype)
    out, last = selective_scan(u, delta, Ac, Bv, Cv, return_last_state=True)
    assert out.dtype == dtype and last.dtype == np.complex64
    du, _, dA, dB, *_ = selective_scan_bwd(out, u, delta, Ac, Bv, Cv)
    assert du.dtype == dtype and dA.dtype == np.complex64 and dB.dtype == dtype
    # Linear scan.
    a, b = c(2, L), c(2, L)
    assert linear_scan(a, b).dtype == dtype
    assert all(g.dtype == dtype for g in linear_scan_bwd(a, b, b, c(2))[:3])
    # Conv.
    x, w, init = c(Bsz, D, L), c(D, W), c(Bsz, D, W - 1)
    out, final = causal_conv1d(x, w, bias, "silu", initial_states=init, return_final_states=True)
    assert out.dtype == dtype and final.dtype == dtype
    for g in causal_conv1d_bwd(x, w, bias, out, "silu", initial_states=init, dfinal_states=final):
        assert g.dtype == dtype
    state = c(Bsz, D, W)
    assert causal_conv1d_update(c(Bsz, D), state, w, bias, "silu").dtype == dtype
    assert state.dtype == dtype
    # State update (state kept in float32 while x is dtype).
    st32 = rng.standard_normal((Bsz, D, N)).astype(np.float32)
    out = selective_state_update(st32, c(Bsz, D), delta[..., 0], A, c(Bsz, N), c(Bsz, N), Dv,
                                 dt_bias=bias, dt_softplus=True)
    assert out.dtype == dtype and st32.dtype == np.float32

"""Edge inputs (issue 13, item 5) for every op of the array API and the torch adapters:

* zero-size dimensions (B = 0, L = 0, D = 0): correctly shaped and typed results, nothing
  launched, forward and backward; with L = 0 a scan's last state is its initial state (a conv's
  final_states its initial_states), and the state gradients pass straight through;
* NaN / inf propagation: an injected NaN reaches exactly the outputs that depend on it (never
  turned into a finite number, never leaking into outputs that do not depend on it); on the GPU
  the non-finite pattern of every output equals the float64 reference's and the finite values
  still match it;
* errors before any launch: wrong ranks, written arrays that overlap themselves or are
  read-only, strides that are not whole elements, out= of the wrong shape or dtype, arrays on
  two devices; read inputs (and written outputs) with negative strides are supported.

CPU tests run the NumPy reference path and torch on the CPU; GPU tests (marked) run the CUDA
kernels through CuPy and torch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import ssmkit
from ssmkit import reference as ref
from ssmkit._validate import overlaps_itself

from compare import assert_close, to_numpy

# The reference warns on NaN / inf arithmetic, which these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

F64 = np.float64
SCAN_GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")


# ============================================================================ problems (float64)

def scan_problem(B=2, D=4, L=9, N=3, var_b=True, var_c=True, G=1, seed=0):
    rng = np.random.default_rng(seed)
    bc = lambda var: rng.standard_normal((B, G, N, L)) if var else rng.standard_normal((D, N))  # noqa: E731
    return dict(u=rng.standard_normal((B, D, L)), delta=rng.uniform(-1.0, 0.5, (B, D, L)),
                A=-np.exp(rng.uniform(-1.0, 0.5, (D, N))), B=bc(var_b), C=bc(var_c),
                D=rng.standard_normal(D), z=rng.standard_normal((B, D, L)),
                delta_bias=rng.uniform(-0.5, 0.5, D), delta_softplus=True,
                initial_state=rng.standard_normal((B, D, N)))


def scan_extras(p, seed=1):
    """(dout, dlast_state) for a scan problem."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(p["u"].shape), rng.standard_normal(p["initial_state"].shape)


def conv_problem(B=2, D=5, L=9, W=4, seq=True, seed=0):
    rng = np.random.default_rng(seed)
    p = dict(x=rng.standard_normal((B, D, L)), weight=rng.standard_normal((D, W)), bias=rng.standard_normal(D),
             activation="silu", initial_states=rng.standard_normal((B, D, W - 1)))
    if seq:   # two sequences then padding in every row (cut points scale with L)
        s = np.zeros((B, L), np.int32)
        s[:, L // 2:] = 1
        s[:, L - max(1, L // 8):] = -1
        p["seq_idx"] = s if L else np.zeros((B, 0), np.int32)
    return p


def update_problem(B=3, D=5, W=4, S=5, L_new=2, pool=None, seed=0):
    rng = np.random.default_rng(seed)
    xs = (B, D) if L_new is None else (B, D, L_new)
    return dict(x=rng.standard_normal(xs), conv_state=rng.standard_normal((B if pool is None else pool, D, S)),
                weight=rng.standard_normal((D, W)), bias=rng.standard_normal(D), activation="silu")


def ssu_problem(B=2, H=4, P=3, G=2, N=4, pool=None, mamba2=True, seed=0):
    rng = np.random.default_rng(seed)
    chan = (H, P) if mamba2 else (P,)
    bc = (B, G, N) if mamba2 else (B, N)
    return dict(state=rng.standard_normal(((B if pool is None else pool),) + chan + (N,)),
                x=rng.standard_normal((B,) + chan), dt=rng.uniform(-2, 0.5, (B,) + chan),
                A=-np.exp(rng.standard_normal(chan + (N,))), B=rng.standard_normal(bc), C=rng.standard_normal(bc),
                D=rng.standard_normal(chan), z=rng.standard_normal((B,) + chan),
                dt_bias=rng.uniform(-0.5, 0.5, chan), dt_softplus=True)


def ln_problem(shape=(2, 3, 8), residual=True, seed=0):
    rng = np.random.default_rng(seed)
    H = shape[-1]
    return dict(x=rng.standard_normal(shape), weight=1 + 0.1 * rng.standard_normal(H), bias=rng.standard_normal(H),
                residual=rng.standard_normal(shape) if residual else None)


def ls_problem(shape=(3, 9), seed=0):
    rng = np.random.default_rng(seed)
    return dict(a=rng.uniform(0.5, 1.0, shape), b=rng.standard_normal(shape), initial=rng.standard_normal(shape[:-1]))


def _copy(p):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}


# ============================================================================ CPU: zero sizes (NumPy)

ZERO_BDL = [(0, 3, 5), (2, 0, 5), (2, 3, 0), (0, 0, 0)]


@pytest.mark.parametrize("B, D, L", ZERO_BDL)
@pytest.mark.parametrize("var_bc", [True, False])
def test_scan_zero_sizes_numpy(B, D, L, var_bc):
    p = scan_problem(B, D, L, N=3, var_b=var_bc, var_c=var_bc)
    f32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    out, last = ssmkit.selective_scan(**f32, return_last_state=True)
    assert out.shape == (B, D, L) and out.dtype == np.float32
    assert last.shape == (B, D, 3) and last.dtype == np.float32
    if L == 0:   # a scan of length 0 leaves the state where it was
        np.testing.assert_array_equal(last, f32["initial_state"])
        no_init = dict(f32, initial_state=None)
        np.testing.assert_array_equal(ssmkit.selective_scan(**no_init, return_last_state=True)[1], 0)
    o2, l2, saved = ssmkit.selective_scan_fwd(**f32)
    np.testing.assert_array_equal(l2, last)
    dout, dlast = (a.astype(np.float32) for a in scan_extras(p))
    grads = ssmkit.selective_scan_bwd(dout, **f32, saved=saved, dlast_state=dlast)
    for name, g in zip(SCAN_GRADS, grads):
        like = f32[{"du": "u", "ddelta": "delta", "dinitial_state": "initial_state"}.get(name, name[1:])]
        assert g.shape == like.shape and g.dtype == like.dtype, name
    for name in ("dA", "dB", "dC", "dD", "ddelta_bias"):   # sums over nothing
        np.testing.assert_array_equal(grads[SCAN_GRADS.index(name)], 0)
    if L == 0:   # last_state = initial_state: its gradient passes through
        np.testing.assert_array_equal(grads[-1], dlast)


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4), (0,)])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_zero_sizes_numpy(shape, reverse):
    p = ls_problem(shape)
    h = ssmkit.linear_scan(**p, reverse=reverse)
    assert h.shape == shape and h.dtype == F64
    da, db, dinit = ssmkit.linear_scan_bwd(p["a"], p["b"], np.ones(shape), p["initial"], reverse=reverse)
    assert da.shape == db.shape == shape and dinit.shape == shape[:-1]
    np.testing.assert_array_equal(dinit, 0)        # with L = 0, h does not depend on initial


@pytest.mark.parametrize("B, D, L", ZERO_BDL)
def test_conv_zero_sizes_numpy(B, D, L):
    p = conv_problem(B, D, L)
    f32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == F64 else v) for k, v in p.items()}
    out, fin = ssmkit.causal_conv1d(**f32, return_final_states=True)
    assert out.shape == (B, D, L) and out.dtype == np.float32 and fin.shape == (B, D, 3)
    if L == 0:   # the last W-1 steps of concat(initial_states, x) = initial_states
        np.testing.assert_array_equal(fin, f32["initial_states"])
    rng = np.random.default_rng(0)
    dout, dfin = rng.standard_normal((B, D, L)).astype(np.float32), rng.standard_normal((B, D, 3)).astype(np.float32)
    dx, dw, db, dinit = ssmkit.causal_conv1d_bwd(f32["x"], f32["weight"], f32["bias"], dout, activation="silu",
                                                 seq_idx=f32["seq_idx"], initial_states=f32["initial_states"],
                                                 dfinal_states=dfin)
    assert dx.shape == (B, D, L) and dw.shape == (D, 4) and db.shape == (D,) and dinit.shape == (B, D, 3)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
    if L == 0:
        np.testing.assert_array_equal(dinit, dfin)


@pytest.mark.parametrize("B, D, L_new", [(0, 5, None), (0, 5, 2), (3, 0, 2), (3, 5, 0)])
def test_conv_update_zero_sizes_numpy(B, D, L_new):
    p = update_problem(B=B, D=D, L_new=L_new, pool=max(B, 1))
    state0 = p["conv_state"].copy()
    out = ssmkit.causal_conv1d_update(**p)
    assert out.shape == p["x"].shape
    np.testing.assert_array_equal(p["conv_state"], state0)        # untouched


@pytest.mark.parametrize("dims", [dict(B=0), dict(H=0, G=1), dict(P=0), dict(B=0, mamba2=False),
                                  dict(P=0, mamba2=False)])
def test_ssu_zero_sizes_numpy(dims):
    p = ssu_problem(**dims)
    state0 = p["state"].copy()
    out = ssmkit.selective_state_update(**p)
    assert out.shape == p["x"].shape
    np.testing.assert_array_equal(p["state"], state0)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0,  3, 8)])
def test_layer_norm_zero_rows_numpy(shape):
    p = ln_problem(shape)
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(**p)
    assert y.shape == rout.shape == shape and mean.shape == rstd.shape == shape[:-1]
    dx, dw, db, dres = ssmkit.layer_norm_bwd(np.ones(shape), rout, p["weight"], p["bias"], mean, rstd,
                                             has_residual=True)
    assert dx.shape == shape and dres.shape == shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_layer_norm_h0_is_refused():
    with pytest.raises(ValueError, match=r"H = shape\[-1\] >= 1"):
        ssmkit.layer_norm(np.zeros((2, 0)), np.zeros(0))


# ============================================================================ CPU: zero sizes (torch)

torch = pytest.importorskip("torch")
import ssmkit.torch as st  # noqa: E402


def _t(a, grad=False, device="cpu", dtype=None):
    if a is None:
        return None
    t = torch.tensor(a, device=device, dtype=dtype)
    return t.requires_grad_(grad) if t.is_floating_point() and grad else t


def _torch_scan_zero(device, dtype):
    for (B, D, L) in ZERO_BDL:
        p = scan_problem(B, D, L)
        w = torch.float64 if dtype == torch.float64 else torch.float32
        args = [_t(p[k], True, device, dtype if k in ("u", "delta", "z", "B", "C") else w)
                for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        init = _t(p["initial_state"], True, device, w)
        out, last = st.selective_scan_fn(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True,
                                         return_last_state=True, initial_state=init)
        assert out.shape == (B, D, L) and out.dtype == dtype and last.shape == (B, D, 3)
        if L == 0:
            torch.testing.assert_close(last, init.detach())
        gl = torch.ones_like(last)
        grads = torch.autograd.grad((out.sum() + (last * gl).sum()), args + [init], allow_unused=True)
        for g, a in zip(grads, args + [init]):
            assert g is None or (g.shape == a.shape and g.dtype == a.dtype)
        if L == 0:
            torch.testing.assert_close(grads[-1], gl)


def _torch_conv_zero(device, dtype):
    for (B, D, L) in ZERO_BDL:
        p = conv_problem(B, D, L)
        x, w, b = _t(p["x"], True, device, dtype), _t(p["weight"], True, device, dtype), _t(p["bias"], True, device, dtype)
        init = _t(p["initial_states"], True, device, dtype)
        seq = _t(p["seq_idx"], device=device)
        fin_out = torch.full((B, D, 3), float("nan"), device=device, dtype=dtype)
        out, fin = st.causal_conv1d_fn(x, w, b, seq_idx=seq, initial_states=init, return_final_states=True,
                                       final_states_out=fin_out, activation="silu")
        assert out.shape == (B, D, L) and fin is fin_out
        if L == 0:
            torch.testing.assert_close(fin, init.detach())
        dx, dw, db, dinit = torch.autograd.grad(out.sum() + fin.sum(), (x, w, b, init))
        assert dx.shape == x.shape and dw.shape == w.shape and float(dw.abs().sum()) == 0.0
        assert float(db.abs().sum()) == 0.0
        if L == 0:
            torch.testing.assert_close(dinit, torch.ones_like(dinit))
        state = _t(np.ones((max(B, 1), D, 3)), device=device, dtype=dtype)
        s0 = state.clone()
        o = st.causal_conv1d_update(torch.ones((B, D), device=device, dtype=dtype), state, w.detach(), b.detach())
        assert o.shape == (B, D)
        if B == 0 or D == 0:
            torch.testing.assert_close(state, s0)


def _torch_rest_zero(device, dtype):
    p = ssu_problem(B=0)
    w = torch.float32 if dtype != torch.float64 else torch.float64
    ssu_args = {k: (_t(v, device=device, dtype=(dtype if k in ("x", "dt", "z", "B", "C") else w))
                    if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    assert st.selective_state_update(**ssu_args).shape == (0, 4, 3)
    for shape in [(3, 0), (0, 6)]:
        q = ls_problem(shape)
        a, b, init = (_t(q[k], True, device, dtype) for k in ("a", "b", "initial"))
        h = st.linear_scan(a, b, init)
        assert h.shape == shape
        da, db, dinit = torch.autograd.grad(h.sum(), (a, b, init), allow_unused=True)
        assert da.shape == shape and dinit.shape == shape[:-1] and float(dinit.abs().sum()) == 0.0
    q = ln_problem((0, 8))
    x, wt, bs, r = (_t(q[k], True, device, dtype) for k in ("x", "weight", "bias", "residual"))
    y, res = st.layer_norm_fn(x, wt, bs, residual=r, prenorm=True)
    assert y.shape == (0, 8) and res.shape == (0, 8)
    gw, gb = torch.autograd.grad(y.sum() + res.sum(), (wt, bs))
    assert float(gw.abs().sum()) == 0.0 and float(gb.abs().sum()) == 0.0


def test_torch_zero_sizes_cpu():
    _torch_scan_zero("cpu", torch.float64)
    _torch_conv_zero("cpu", torch.float64)
    _torch_rest_zero("cpu", torch.float64)


def _torch_custom_ops_zero(device, dtype):
    p = scan_problem(2, 3, 0)
    w = torch.float64 if dtype == torch.float64 else torch.float32
    a = [torch.tensor(p[k], device=device, dtype=dtype if k in ("u", "delta", "z", "B", "C") else w)
         for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    out, last, saved = torch.ops.ssmkit.selective_scan_fwd(*a, True, True)
    assert out.shape == (2, 3, 0)
    torch.testing.assert_close(last, a[-1])
    dlast = torch.ones(2, 3, 3, dtype=w, device=device)
    g = torch.ops.ssmkit.selective_scan_bwd(torch.zeros(2, 3, 0, dtype=dtype, device=device), *a, saved, dlast, True)
    torch.testing.assert_close(g[-1], dlast)
    assert not g[2].any() and g[2].shape == (3, 3)
    c = conv_problem(0, 4, 6)
    out, fin = torch.ops.ssmkit.causal_conv1d_fwd(torch.tensor(c["x"], device=device, dtype=dtype),
                                                  torch.tensor(c["weight"], device=device, dtype=dtype), None, None,
                                                  None, True, True)
    assert out.shape == (0, 4, 6) and fin.shape == (0, 4, 3)


def test_torch_custom_ops_zero_sizes_cpu():
    """The torch.compile route (the custom ops, run eagerly here) with zero sizes."""
    _torch_custom_ops_zero("cpu", torch.float64)


def test_torch_nan_propagates_cpu():
    """The torch adapters keep the reference's non-finite pattern, forward and backward."""
    p = scan_problem(2, 3, 10)
    p["u"][1, 2, 4] = np.nan
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    ts = [torch.tensor(p[k], requires_grad=True) for k in names]
    out, last = st.selective_scan_fn(*ts[:5], D=ts[5], z=ts[6], delta_bias=ts[7], delta_softplus=True,
                                     return_last_state=True, initial_state=ts[8])
    dout, dlast = scan_extras(p)
    grads = torch.autograd.grad((out * torch.tensor(dout)).sum() + (last * torch.tensor(dlast)).sum(), ts)
    w_out, w_last = ref.selective_scan(**p, return_last_state=True)
    w_grads = ref.selective_scan_bwd(dout, **p, dlast_state=dlast)
    for name, got, want in zip(("out", "last") + SCAN_GRADS, (out, last) + grads, (w_out, w_last) + tuple(w_grads)):
        _expect_nonfinite(name, got.detach().numpy(), _nonfinite(want))
    c = conv_problem(2, 3, 12)
    c["x"][0, 1, 3] = np.nan
    x, w, b, init = (torch.tensor(c[k], requires_grad=True) for k in ("x", "weight", "bias", "initial_states"))
    out = st.causal_conv1d_fn(x, w, b, seq_idx=torch.tensor(c["seq_idx"]), initial_states=init, activation="silu")
    grads = torch.autograd.grad(out.sum(), (x, w, b, init))
    w_out = ref.causal_conv1d(**c)
    w_grads = ref.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], np.ones(out.shape), activation="silu",
                                    seq_idx=c["seq_idx"], initial_states=c["initial_states"])
    for name, got, want in zip(("out", "dx", "dweight", "dbias", "dinit"), (out,) + grads, (w_out,) + tuple(w_grads)):
        _expect_nonfinite(name, got.detach().numpy(), _nonfinite(want))
    q = ln_problem((4, 8))
    q["x"][2, 3] = np.nan
    x, wt, bs, r = (torch.tensor(q[k], requires_grad=True) for k in ("x", "weight", "bias", "residual"))
    y = st.rms_norm_fn(x, wt, bs, residual=r)
    _expect_nonfinite("rms_norm_fn", y.detach().numpy(), _mask((4, 8), 2))
    gx, gw = torch.autograd.grad(y.sum(), (x, wt))
    _expect_nonfinite("rms_norm_fn dx", gx.numpy(), _mask((4, 8), 2))
    _expect_nonfinite("rms_norm_fn dweight", gw.numpy(), _mask((8,), slice(None)))


# ============================================================================ CPU: NaN / inf in the reference

def _nonfinite(a):
    return ~np.isfinite(to_numpy(a))


def _expect_nonfinite(name, got, want_mask):
    g = _nonfinite(got)
    assert g.shape == want_mask.shape, name
    if not np.array_equal(g, want_mask):
        bad = np.argwhere(g != want_mask)
        raise AssertionError(f"{name}: {len(bad)} elements with the wrong finiteness, first "
                             f"{[tuple(int(i) for i in b) + ('non-finite' if g[tuple(b)] else 'finite',) for b in bad[:5]]}")


def _mask(shape, index=None):
    m = np.zeros(shape, bool)
    if index is not None:
        m[index] = True
    return m


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_reference_scan_nan_forward(value):
    Bz, Dz, L, N = 2, 4, 12, 3
    base = scan_problem(Bz, Dz, L, N)
    b, d, t, n = 1, 2, 5, 1

    def run(name, index):
        p = _copy(base)
        p[name][index] = value
        return ref.selective_scan(**p, return_last_state=True)

    out, last = run("u", (b, d, t))           # out[b, d, t:] and that channel's state
    _expect_nonfinite("out (u)", out, _mask(out.shape, (b, d, slice(t, None))))
    _expect_nonfinite("last (u)", last, _mask(last.shape, (b, d)))
    out, last = run("delta", (b, d, t))
    _expect_nonfinite("out (delta)", out, _mask(out.shape, (b, d, slice(t, None))))
    out, last = run("B", (b, 0, n, t))        # variable B: every channel of the group, state n
    _expect_nonfinite("out (B)", out, _mask(out.shape, (b, slice(None), slice(t, None))))
    _expect_nonfinite("last (B)", last, _mask(last.shape, (b, slice(None), n)))
    out, last = run("C", (b, 0, n, t))        # variable C: the readout at t only
    _expect_nonfinite("out (C)", out, _mask(out.shape, (b, slice(None), t)))
    _expect_nonfinite("last (C)", last, _mask(last.shape))
    out, last = run("z", (b, d, t))
    _expect_nonfinite("out (z)", out, _mask(out.shape, (b, d, t)))
    out, last = run("A", (d, n))
    _expect_nonfinite("out (A)", out, _mask(out.shape, (slice(None), d)))
    _expect_nonfinite("last (A)", last, _mask(last.shape, (slice(None), d, n)))
    out, last = run("D", (d,))
    _expect_nonfinite("out (D)", out, _mask(out.shape, (slice(None), d)))
    _expect_nonfinite("last (D)", last, _mask(last.shape))
    out, last = run("initial_state", (b, d, n))
    _expect_nonfinite("out (initial)", out, _mask(out.shape, (b, d)))


def test_reference_scan_nan_backward():
    Bz, Dz, L, N = 2, 4, 12, 3
    p = scan_problem(Bz, Dz, L, N)
    dout, dlast = scan_extras(p)
    b, d, t = 1, 2, 5
    p["u"][b, d, t] = np.nan
    g = dict(zip(SCAN_GRADS, ref.selective_scan_bwd(dout, **p, dlast_state=dlast)))
    # the adjoint does not depend on u: du and dinitial_state stay finite
    _expect_nonfinite("du", g["du"], _mask(g["du"].shape))
    _expect_nonfinite("dinitial_state", g["dinitial_state"], _mask(g["dinitial_state"].shape))
    _expect_nonfinite("ddelta", g["ddelta"], _mask(g["ddelta"].shape, (b, d, slice(t, None))))
    _expect_nonfinite("dA", g["dA"], _mask(g["dA"].shape, d))
    _expect_nonfinite("dD", g["dD"], _mask(g["dD"].shape, d))
    _expect_nonfinite("dz", g["dz"], _mask(g["dz"].shape, (b, d, slice(t, None))))
    _expect_nonfinite("dB", g["dB"], _mask(g["dB"].shape, (b, 0, slice(None), t)))
    _expect_nonfinite("dC", g["dC"], _mask(g["dC"].shape, (b, 0, slice(None), slice(t, None))))
    q = scan_problem(Bz, Dz, L, N)
    q["C"][b, 0, 1, t] = np.nan                # the readout gradient flows backward in time
    g = dict(zip(SCAN_GRADS, ref.selective_scan_bwd(dout, **q, dlast_state=dlast)))
    _expect_nonfinite("du (C)", g["du"], _mask(g["du"].shape, (b, slice(None), slice(0, t + 1))))
    _expect_nonfinite("dinitial_state (C)", g["dinitial_state"], _mask(g["dinitial_state"].shape, (b, slice(None), 1)))


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_linear_scan_nan(reverse):
    p = ls_problem((3, 10))
    r, t = 1, 4
    p["a"][r, t] = np.nan
    h = ref.linear_scan(**p, reverse=reverse)
    cols = slice(0, t + 1) if reverse else slice(t, None)
    _expect_nonfinite("h", h, _mask(h.shape, (r, cols)))
    da, db, dinit = ref.linear_scan_bwd(p["a"], p["b"], np.ones((3, 10)), p["initial"], reverse=reverse)
    before = slice(t + 1, None) if reverse else slice(0, t)         # steps whose adjoint crosses a_t
    _expect_nonfinite("db", db, _mask(db.shape, (r, before)))
    want = _mask(da.shape, (r, slice(None)))
    want[r, t] = False                 # da_t = g_t conj(h_prev_t): neither depends on a_t
    _expect_nonfinite("da", da, want)
    _expect_nonfinite("dinitial", dinit, _mask(dinit.shape, r))


def test_reference_conv_nan_respects_sequences():
    """A NaN in one sequence's token reaches the next W-1 outputs of that sequence only; padding
    tokens (seq_idx < 0) reach nothing (the reference selects, never multiplies by 0)."""
    Bz, Dz, L, W = 2, 3, 16, 4
    p = conv_problem(Bz, Dz, L, W)        # seq_idx: [0]*8 + [1]*6 + [-1]*2 per row
    b, d = 1, 2
    for t, want_cols in [(3, slice(3, 7)), (6, slice(6, 8)), (14, slice(0, 0))]:
        q = _copy(p)
        q["x"][b, d, t] = np.nan
        out, fin = ref.causal_conv1d(**q, return_final_states=True)
        _expect_nonfinite(f"out (t={t})", out, _mask(out.shape, (b, d, want_cols)))
        dout = np.ones(out.shape)
        dx, dw, db, dinit = ref.causal_conv1d_bwd(q["x"], q["weight"], q["bias"], dout, activation="silu",
                                                  seq_idx=q["seq_idx"], initial_states=q["initial_states"])
        reached = want_cols.stop > want_cols.start
        # dx: every token some NaN output's visible window holds (the NaN token's own sequence)
        want_dx = _mask(dx.shape, (b, d, slice(max(0, want_cols.start - W + 1), want_cols.stop)) if reached else None)
        _expect_nonfinite(f"dx (t={t})", dx, want_dx)
        _expect_nonfinite(f"dweight (t={t})", dw, _mask(dw.shape, d if reached else None))
        _expect_nonfinite(f"dbias (t={t})", db, _mask(db.shape, d if reached else None))
    q = _copy(p)
    q["x"][b, d, 13] = np.nan                  # the last token of sequence 1 (padding follows)
    out, fin = ref.causal_conv1d(**q, return_final_states=True)
    _expect_nonfinite("out (t=13)", out, _mask(out.shape, (b, d, 13)))
    _expect_nonfinite("final_states (t=13)", fin, _mask(fin.shape, (b, d, 0)))   # raw x: steps 13, 14, 15


def test_reference_update_and_ssu_nan():
    p = update_problem(B=3, D=5, S=5, L_new=2)
    p["x"][1, 2, 0] = np.nan
    out = ref.causal_conv1d_update(**p)
    _expect_nonfinite("update out", out, _mask(out.shape, (1, 2)))
    _expect_nonfinite("update state", p["conv_state"], _mask(p["conv_state"].shape, (1, 2, 3)))
    q = ssu_problem(B=3, pool=4)
    q["state_batch_indices"] = np.array([2, -1, 0])
    q["state"][3, 0, 0, 0] = np.nan             # a row nobody uses
    q["state"][1, 1, 1, 1] = np.nan             # not used either (batch row 1 is padding)
    q["x"][2, 1, 2] = np.nan                     # batch row 2 -> pool row 0, head 1, p 2
    out = ref.selective_state_update(**q)
    _expect_nonfinite("ssu out", out, _mask(out.shape, (2, 1, 2)))
    want = _mask(q["state"].shape, (0, 1, 2))
    want[3, 0, 0, 0] = want[1, 1, 1, 1] = True
    _expect_nonfinite("ssu state", q["state"], want)
    q = ssu_problem(B=2, mamba2=False, P=5)
    q["B"][0, 1] = np.nan                        # Mamba-1: every channel's state n = 1 of batch 0
    out = ref.selective_state_update(**q)
    _expect_nonfinite("ssu out (B)", out, _mask(out.shape, 0))
    _expect_nonfinite("ssu state (B)", q["state"], _mask(q["state"].shape, (0, slice(None), 1)))


@pytest.mark.parametrize("rms", [False, True])
def test_reference_layer_norm_nan(rms):
    p = ln_problem((4, 8))
    p["x"][2, 3] = np.nan
    y, rout = ref.layer_norm(**p, prenorm=True, is_rms_norm=rms)
    _expect_nonfinite("y", y, _mask(y.shape, 2))
    _expect_nonfinite("residual_out", rout, _mask(rout.shape, (2, 3)))
    q = ln_problem((4, 8))
    dy = np.ones((4, 8))
    dy[1, 5] = np.nan
    dx, dw, db, dres = ref.layer_norm_bwd(dy, q["x"], q["weight"], q["bias"], q["residual"], is_rms_norm=rms)
    _expect_nonfinite("dx", dx, _mask(dx.shape, 1))
    _expect_nonfinite("dweight", dw, _mask(dw.shape, 5))
    _expect_nonfinite("dbias", db, _mask(db.shape, 5))
    q["weight"][6] = np.nan
    y = ref.layer_norm(q["x"], q["weight"], q["bias"], q["residual"], is_rms_norm=rms)
    _expect_nonfinite("y (weight)", y, _mask(y.shape, (slice(None), 6)))


def test_numpy_paths_propagate_nan():
    """The array API's NumPy path (validation + reference) keeps NaN where the reference does."""
    p = scan_problem(2, 3, 8)
    p["u"][0, 1, 4] = np.nan
    out = ssmkit.selective_scan(**p)
    _expect_nonfinite("selective_scan", out, _mask(out.shape, (0, 1, slice(4, None))))
    c = conv_problem(2, 3, 8, seq=False)
    c["x"][1, 0, 2] = np.nan
    out = ssmkit.causal_conv1d(**c)
    _expect_nonfinite("causal_conv1d", out, _mask(out.shape, (1, 0, slice(2, 6))))


# ============================================================================ CPU: errors before any launch

def test_overlaps_itself():
    assert not overlaps_itself((4, 5), (40, 8), 8)
    assert not overlaps_itself((4, 5), (-40, 8), 8)           # a reversed axis
    assert not overlaps_itself((4, 5), (8, 32), 8)            # column-major
    assert overlaps_itself((4, 5), (0, 8), 8)                 # broadcast
    assert overlaps_itself((4, 5), (16, 8), 8)                # rows overlap (as_strided)
    assert overlaps_itself((3,), (4,), 8)                     # elements' bytes overlap
    assert not overlaps_itself((0, 5), (0, 0), 8)             # empty
    assert not overlaps_itself((1, 5), (0, 8), 8)             # size-1 axes do not count
    assert overlaps_itself((3, 2), (16, 24), 8)               # interleaved, not overlapping: refused (documented)


def _overlapping(shape, dtype=F64):
    """A writeable view whose leading rows share memory (stride of one element for a whole row)."""
    buf = np.zeros(int(np.prod(shape)) + 16, dtype)
    strides = [buf.itemsize] * len(shape)
    return np.lib.stride_tricks.as_strided(buf, shape, strides)


def _readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _reversed_last(a):
    """The same values in reversed memory (a negative stride along the last axis)."""
    return np.ascontiguousarray(a[..., ::-1])[..., ::-1]


def _call_scan(**over):
    p = scan_problem()
    p.update(over)
    return ssmkit.selective_scan(**p)


def _call_conv(**over):
    p = conv_problem(seq=False)
    p.update(over)
    return ssmkit.causal_conv1d(**p)


def _call_update(**over):
    p = update_problem()
    p.update(over)
    return ssmkit.causal_conv1d_update(**p)


def _call_ssu(**over):
    p = ssu_problem()
    p.update(over)
    return ssmkit.selective_state_update(**p)


def _call_ln(**over):
    p = ln_problem()
    p.update(over)
    return ssmkit.layer_norm(**p)


def _call_ls(**over):
    p = ls_problem()
    p.update(over)
    return ssmkit.linear_scan(**p)


RANK_ERRORS = [
    (_call_scan, dict(u=np.zeros((2, 4))), "'u' must be \\(B, D, L\\)"),
    (_call_scan, dict(delta=np.zeros((2, 4, 9, 1))), "'delta' must have shape \\(2, 4, 9\\)"),
    (_call_scan, dict(A=np.zeros((4, 3, 1))), "'A' must be \\(D, N\\)"),
    (_call_scan, dict(B=np.zeros((2, 1, 1, 3, 9))), "'B' must be constant"),
    (_call_scan, dict(C=np.zeros((3,))), "'C' must be constant"),
    (_call_scan, dict(D=np.zeros((4, 1))), "'D' must have shape \\(4,\\)"),
    (_call_scan, dict(z=np.zeros((2, 4))), "'z' must have shape"),
    (_call_scan, dict(delta_bias=np.zeros(())), "'delta_bias' must have shape"),
    (_call_scan, dict(initial_state=np.zeros((2, 4))), "'initial_state' must have shape"),
    (_call_scan, dict(out=np.zeros((2, 4, 9, 1))), "'out' must have shape"),
    (_call_conv, dict(x=np.zeros((5, 9))), "'x' must be \\(B, D, L\\)"),
    (_call_conv, dict(weight=np.zeros((5, 4, 1))), "'weight' must be \\(D, W\\)"),
    (_call_conv, dict(bias=np.zeros((5, 1))), "'bias' must have shape"),
    (_call_conv, dict(seq_idx=np.zeros((2, 9, 1), np.int32)), "'seq_idx' must have shape"),
    (_call_conv, dict(initial_states=np.zeros((2, 5))), "'initial_states' must have shape"),
    (_call_conv, dict(out=np.zeros((2, 5))), "'out' must have shape"),
    (_call_update, dict(x=np.zeros((3,))), "'x' must be \\(B, D\\) or \\(B, D, L_new\\)"),
    (_call_update, dict(conv_state=np.zeros((3, 5))), "'conv_state' must be \\(B_pool, D, S\\)"),
    (_call_update, dict(weight=np.zeros((5,))), "'weight' must be \\(D, W\\)"),
    (_call_update, dict(out=np.zeros((3, 5))), "'out' must have shape"),
    (_call_ssu, dict(state=np.zeros((2, 4, 3))), "'x' must be \\(B, D\\)"),
    (_call_ssu, dict(x=np.zeros((2, 4))), "'x' must be \\(B, H, P\\)"),
    (_call_ssu, dict(dt=np.zeros((2, 4))), "'dt' must have shape"),
    (_call_ssu, dict(A=np.zeros((4, 3))), "'A' must have shape"),
    (_call_ssu, dict(B=np.zeros((2, 4))), "'B' must be \\(B, G, N\\)"),
    (_call_ssu, dict(C=np.zeros((2, 2, 4, 1))), "'C' must have shape"),
    (_call_ssu, dict(D=np.zeros((4,))), "'D' must have shape"),
    (_call_ssu, dict(dt_bias=np.zeros((4, 3, 1))), "'dt_bias' must have shape"),
    (_call_ssu, dict(state_batch_indices=np.zeros((2, 1), np.int32)), "'state_batch_indices' must have shape"),
    (_call_ssu, dict(out=np.zeros((2, 12))), "'out' must have shape"),
    (_call_ln, dict(x=np.zeros(())), "'x' must be \\(\\.\\.\\., H\\)"),
    (_call_ln, dict(weight=np.zeros((8, 1))), "'weight' must be \\(H,\\)"),
    (_call_ln, dict(bias=np.zeros((1, 8))), "'bias' must have shape"),
    (_call_ln, dict(residual=np.zeros((6, 8))), "'residual' must have shape"),
    (_call_ls, dict(a=np.zeros(())), "'a' must have shape \\(\\.\\.\\., L\\)"),
    (_call_ls, dict(b=np.zeros((3, 9, 1))), "'b' must have shape"),
    (_call_ls, dict(initial=np.zeros((3, 1))), "'initial' must have shape"),
]


@pytest.mark.parametrize("call, over, match", RANK_ERRORS)
def test_wrong_ranks(call, over, match):
    with pytest.raises(ValueError, match=match):
        call(**over)


def test_backward_ranks():
    p = scan_problem()
    with pytest.raises(ValueError, match="'dout' must have shape"):
        ssmkit.selective_scan_bwd(np.zeros((2, 4)), **p)
    with pytest.raises(ValueError, match="'dlast_state' must have shape"):
        ssmkit.selective_scan_bwd(np.zeros((2, 4, 9)), **p, dlast_state=np.zeros((2, 4)))
    c = conv_problem(seq=False)
    with pytest.raises(ValueError, match="'dout' must have shape"):
        ssmkit.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], np.zeros((2, 5)))
    with pytest.raises(ValueError, match="'dfinal_states' must have shape"):
        ssmkit.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], c["x"], dfinal_states=np.zeros((2, 5)))
    q = ls_problem()
    with pytest.raises(ValueError, match="'dh' must have shape"):
        ssmkit.linear_scan_bwd(q["a"], q["b"], np.zeros((3,)))
    ln = ln_problem((4, 8), residual=False)
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(**ln)
    with pytest.raises(ValueError, match="'rstd' must have shape"):
        ssmkit.layer_norm_bwd(y, rout, ln["weight"], ln["bias"], mean, rstd[:, None])
    with pytest.raises(ValueError, match="'x' must have shape"):
        ssmkit.layer_norm_bwd(y, rout[None], ln["weight"], ln["bias"], mean, rstd)


WRITTEN = [  # (call, argument, shape): every array an op writes
    (_call_scan, "out", (2, 4, 9)),
    (_call_conv, "out", (2, 5, 9)),
    (_call_update, "out", (3, 5, 2)),
    (_call_update, "conv_state", (3, 5, 5)),
    (_call_ssu, "out", (2, 4, 3)),
    (_call_ssu, "state", (2, 4, 3, 4)),
    (_call_ln, "out", (2, 3, 8)),
]


@pytest.mark.parametrize("call, name, shape", WRITTEN)
def test_written_arrays_refused_before_running(call, name, shape):
    """Broadcast, overlapping, read-only and fractional-stride written arrays raise naming the
    argument, before anything is computed (an in-place state is left untouched)."""
    bcast = np.broadcast_to(np.zeros((1,) + shape[1:]), shape)
    with pytest.raises(ValueError, match=f"argument '{name}' is written and must not have zero strides"):
        call(**{name: bcast})
    with pytest.raises(ValueError, match=f"argument '{name}' is written and must not overlap itself"):
        call(**{name: _overlapping(shape)})
    with pytest.raises(ValueError, match=f"argument '{name}' is written but is read-only"):
        call(**{name: _readonly(np.zeros(shape))})
    # float64 elements 12 bytes apart: not a whole number of elements (kernels index by element)
    raw = np.zeros(int(np.prod(shape)) * 2 + 4)
    odd = np.lib.stride_tricks.as_strided(raw, shape=shape, strides=tuple(12 * int(np.prod(shape[i + 1:]))
                                                                          for i in range(len(shape))))
    with pytest.raises(ValueError, match=f"argument '{name}' has strides .* not whole elements"):
        call(**{name: odd})


def test_in_place_state_untouched_on_refusal():
    p = ssu_problem()
    p["out"] = np.zeros((2, 4, 12))[:, :, ::4]          # fine
    state0 = p["state"].copy()
    p["D"] = np.zeros((4, 3, 1))                        # wrong rank: refused
    with pytest.raises(ValueError, match="'D' must have shape"):
        ssmkit.selective_state_update(**p)
    np.testing.assert_array_equal(p["state"], state0)
    q = update_problem()
    s0 = q["conv_state"].copy()
    with pytest.raises(ValueError, match="'out' is written but is read-only"):
        ssmkit.causal_conv1d_update(**q, out=_readonly(np.zeros((3, 5, 2))))
    np.testing.assert_array_equal(q["conv_state"], s0)


OUT_WRONG = [
    (lambda out: ssmkit.selective_scan(**scan_problem(), out=out), (2, 4, 9)),
    (lambda out: ssmkit.selective_scan_fwd(**scan_problem(), out=out), (2, 4, 9)),
    (lambda out: ssmkit.causal_conv1d(**conv_problem(seq=False), out=out), (2, 5, 9)),
    (lambda out: ssmkit.causal_conv1d_update(**update_problem(), out=out), (3, 5, 2)),
    (lambda out: ssmkit.selective_state_update(**ssu_problem(), out=out), (2, 4, 3)),
    (lambda out: ssmkit.layer_norm(**ln_problem(), out=out), (2, 3, 8)),
    (lambda out: ssmkit.layer_norm_fwd(**ln_problem(), out=out), (2, 3, 8)),
]


@pytest.mark.parametrize("call, shape", OUT_WRONG)
def test_out_wrong_shape_dtype(call, shape):
    with pytest.raises(ValueError, match="argument 'out' must have shape"):
        call(np.zeros(shape[:-1] + (shape[-1] + 1,)))
    with pytest.raises(TypeError, match="argument 'out' must have dtype"):
        call(np.zeros(shape, np.float32))
    good = np.full(shape, np.nan)
    res = call(good)
    res = res[0] if isinstance(res, tuple) else res
    assert res is good and np.isfinite(good).all()


def test_negative_strides_numpy():
    """Reversed (negative-stride) inputs and outputs give the same numbers on the NumPy path."""
    p = scan_problem()
    want = ssmkit.selective_scan(**_copy(p))
    q = {k: (_reversed_last(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    out = np.zeros((2, 4, 9))[:, ::-1, ::-1]
    np.testing.assert_array_equal(ssmkit.selective_scan(**q, out=out), want)
    s = ssu_problem()
    want_out = ssmkit.selective_state_update(**_copy(s))
    r = {k: (_reversed_last(v) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
    state0 = r["state"]
    np.testing.assert_array_equal(ssmkit.selective_state_update(**r), want_out)
    assert state0.strides[-1] < 0


def test_torch_errors_before_running_cpu():
    p = ssu_problem()
    ts = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    ts["state"] = torch.zeros(1, 4, 3, 4, dtype=torch.float64).expand(2, 4, 3, 4)
    with pytest.raises(ValueError, match="argument 'state' is written and must not have zero strides"):
        st.selective_state_update(**ts)
    q = update_problem()
    tq = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in q.items()}
    tq["conv_state"] = torch.zeros(3, 5, 5, dtype=torch.float64).as_strided((3, 5, 5), (1, 5, 1))
    with pytest.raises(ValueError, match="argument 'conv_state' is written and must not overlap itself"):
        st.causal_conv1d_update(**tq)
    with pytest.raises(ValueError, match="one device|is on meta"):
        st.selective_state_update(**dict(ts, state=torch.zeros(2, 4, 3, 4, dtype=torch.float64, device="meta")))
    c = conv_problem(seq=False)
    x, w, b = (torch.tensor(c[k]) for k in ("x", "weight", "bias"))
    with pytest.raises(ValueError, match="'final_states_out' must have shape \\(2, 5, 3\\)"):
        st.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=torch.zeros(2, 5, 4, dtype=x.dtype))
    with pytest.raises(TypeError, match="'final_states_out' must have dtype"):
        st.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="'final_states_out' is written and must not have zero strides"):
        st.causal_conv1d_fn(x, w, b, return_final_states=True,
                            final_states_out=torch.zeros(1, 5, 3, dtype=x.dtype).expand(2, 5, 3))
    fso = torch.full((2, 5, 3), float("nan"), dtype=x.dtype)
    _, fin = st.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=fso)
    assert fin is fso and torch.isfinite(fso).all()


# ============================================================================ GPU helpers

def _gpu():
    pytest.importorskip("cupy")
    import gpu_util

    return gpu_util


@contextlib.contextmanager
def _no_launch(monkeypatch):
    """Fail on any ssmkit kernel launch (every op launches through _launch.Prepared, or the decode
    step's ``_call``)."""
    import ssmkit._launch as launch_mod
    from ssmkit.ops import selective_state_update as ssu_mod

    def boom(*a, **k):
        raise AssertionError("a kernel was launched for a zero-size problem")

    with monkeypatch.context() as m:
        m.setattr(launch_mod.Prepared, "__call__", boom)
        m.setattr(launch_mod.Prepared, "row", boom)
        m.setattr(ssu_mod, "_call", boom)
        yield


def _h(a):
    """A device (or host) array's values on the host, as float64 (bf16 included)."""
    return to_numpy(a)


def _dev(host: dict):
    g = _gpu()
    return {k: (g.to_device(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}


def _round(p: dict, rule) -> dict:
    """Host arrays in the dtypes the kernels take: ``rule(name, array)`` -> dtype name."""
    g = _gpu()
    return {k: (g.rounded(v, rule(k, v)) if _is_float(v) else v) for k, v in p.items()}


def _is_float(v) -> bool:
    return isinstance(v, np.ndarray) and (v.dtype.kind in "fc" or v.dtype.name == "bfloat16")


def _host64(p: dict) -> dict:
    """float64 copies of the (rounded) float arrays: what the reference runs on."""
    g = _gpu()
    return {k: (g.as64(v) if _is_float(v) else v) for k, v in p.items()}


def _scan_rule(dtype):
    w = "float64" if dtype == "float64" else "float32"
    return lambda k, v: dtype if k in ("u", "delta", "z", "dout") or (k in ("B", "C") and v.ndim >= 3) else w


# ============================================================================ GPU: zero sizes

@pytest.mark.gpu
@pytest.mark.parametrize("B, D, L", ZERO_BDL)
@pytest.mark.parametrize("var_bc", [True, False])
def test_gpu_scan_zero_sizes(B, D, L, var_bc, monkeypatch):
    g = _gpu()
    host = _round(scan_problem(B, D, L, var_b=var_bc, var_c=var_bc), _scan_rule("bfloat16"))
    dout, dlast = scan_extras(scan_problem(B, D, L))
    dout, dlast = g.rounded(dout, "bfloat16"), g.rounded(dlast, "float32")
    dev = _dev(host)
    with _no_launch(monkeypatch):
        out, last = ssmkit.selective_scan(**dev, return_last_state=True)
        o2, l2, saved = ssmkit.selective_scan_fwd(**dev)
        grads = ssmkit.selective_scan_bwd(g.to_device(dout), **dev, saved=saved, dlast_state=g.to_device(dlast))
        grads_nosaved = ssmkit.selective_scan_bwd(g.to_device(dout), **dev, dlast_state=g.to_device(dlast))
        given = g.poison((B, D, L), "bfloat16")
        assert ssmkit.selective_scan(**dev, out=given) is given
    g.sync_check()
    assert out.shape == (B, D, L) and out.dtype == host["u"].dtype
    assert last.shape == (B, D, 3) and last.dtype == np.float32
    want_last = host["initial_state"] if L == 0 else np.zeros((B, D, 3), np.float32)
    if L == 0 or B * D == 0:
        np.testing.assert_array_equal(_h(last), want_last[: B, : D])
    names = {"du": "u", "ddelta": "delta", "dinitial_state": "initial_state"}
    for gr in (grads, grads_nosaved):
        for name, a in zip(SCAN_GRADS, gr):
            like = host[names.get(name, name[1:])]
            assert a.shape == like.shape and a.dtype == like.dtype, name
        for name in ("dA", "dB", "dC", "dD", "ddelta_bias"):
            assert not _h(gr[SCAN_GRADS.index(name)]).any(), name
        if L == 0:
            np.testing.assert_array_equal(_h(gr[-1]), dlast)


@pytest.mark.gpu
@pytest.mark.parametrize("B, D, L", ZERO_BDL)
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_conv_zero_sizes(B, D, L, layout, monkeypatch):
    g = _gpu()
    host = _round(conv_problem(B, D, L), lambda k, v: "float32")
    dev = _dev(host)
    if layout == "cl":
        dev["x"] = g.to_device(np.ascontiguousarray(host["x"].transpose(0, 2, 1))).transpose(0, 2, 1)
    rng = np.random.default_rng(0)
    dfin = rng.standard_normal((B, D, 3)).astype(np.float32)
    with _no_launch(monkeypatch):
        out, fin = ssmkit.causal_conv1d(**dev, return_final_states=True)
        dx, dw, db, dinit = ssmkit.causal_conv1d_bwd(dev["x"], dev["weight"], dev["bias"],
                                                     g.to_device(np.zeros((B, D, L), np.float32)),
                                                     activation="silu", seq_idx=dev["seq_idx"],
                                                     initial_states=dev["initial_states"],
                                                     dfinal_states=g.to_device(dfin))
        for xs in [(B, D), (B, D, 0), (B, D, 2)]:
            if int(np.prod(xs)):
                continue
            state = g.to_device(np.ones((max(B, 1), D, 5), np.float32))
            o = ssmkit.causal_conv1d_update(g.to_device(np.ones(xs, np.float32)), state, dev["weight"], dev["bias"])
            assert o.shape == xs and (_h(state) == 1).all()
    g.sync_check()
    assert out.shape == (B, D, L) and fin.shape == (B, D, 3)
    if L == 0:
        np.testing.assert_array_equal(_h(fin), host["initial_states"])
        np.testing.assert_array_equal(_h(dinit), dfin)
    assert dx.shape == (B, D, L) and not _h(dw).any() and not _h(db).any()


@pytest.mark.gpu
def test_gpu_ssu_ls_ln_zero_sizes(monkeypatch):
    g = _gpu()
    with _no_launch(monkeypatch):
        for dims in [dict(B=0), dict(H=0, G=1), dict(P=0), dict(B=0, mamba2=False), dict(P=0, mamba2=False)]:
            host = _round(ssu_problem(**dims), lambda k, v: "float32")
            dev = _dev(host)
            out = ssmkit.selective_state_update(**dev)
            assert out.shape == host["x"].shape
            np.testing.assert_array_equal(_h(dev["state"]), host["state"])
            plan = ssmkit.SelectiveStateUpdatePlan(**dev)
            assert plan().shape == host["x"].shape
        for shape in [(3, 0), (0, 5), (2, 0, 4)]:
            p = _dev(_round(ls_problem(shape), lambda k, v: "float32"))
            for reverse in (False, True):
                h = ssmkit.linear_scan(**p, reverse=reverse)
                da, db, dinit = ssmkit.linear_scan_bwd(p["a"], p["b"], h, p["initial"], reverse=reverse)
                assert h.shape == da.shape == db.shape == shape and dinit.shape == shape[:-1]
                assert not _h(dinit).any()
    # layer_norm with no rows (the plan is still prepared: compiles, never launches)
    for shape in [(0, 8), (2, 0, 8)]:
        p = _dev(_round(ln_problem(shape), lambda k, v: "float32"))
        with _no_launch(monkeypatch):
            y, rout, mean, rstd = ssmkit.layer_norm_fwd(**p)
            dx, dw, db, dres = ssmkit.layer_norm_bwd(y, rout, p["weight"], p["bias"], mean, rstd, has_residual=True)
        assert y.shape == dx.shape == shape and not _h(dw).any() and not _h(db).any()
    g.sync_check()


@pytest.mark.gpu
def test_gpu_torch_zero_sizes():
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    _torch_scan_zero("cuda", torch.bfloat16)
    _torch_scan_zero("cuda", torch.float32)
    _torch_conv_zero("cuda", torch.float32)
    _torch_rest_zero("cuda", torch.float32)
    _torch_custom_ops_zero("cuda", torch.bfloat16)
    torch.cuda.synchronize()


# ============================================================================ GPU: NaN / inf against the reference

def _assert_same_nonfinite_and_close(name, got, want, dtype, grad=False, extra_ok=None):
    """Same non-finite elements as the reference (``extra_ok``: where the GPU may also be
    non-finite); the finite ones within the dtype's tolerance."""
    if want is None:
        assert got is None, name
        return
    g, w = to_numpy(got), to_numpy(want)
    gm, wm = ~np.isfinite(g), ~np.isfinite(w)
    assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
    if extra_ok is not None:
        wm_ok = wm | (extra_ok & gm)
    else:
        wm_ok = wm
    if not np.array_equal(gm, wm_ok):
        bad = np.argwhere(gm != wm_ok)
        raise AssertionError(f"{name} ({dtype}): {len(bad)} elements finite on one side only, first "
                             f"{[(tuple(int(i) for i in b), g[tuple(b)], w[tuple(b)]) for b in bad[:5]]}")
    assert_close(name, np.where(gm, 0, g), np.where(gm, 0, w), dtype, grad=grad)


def _injections(p: dict, picks):
    """(label, problem) with one element of one input replaced (NaN or inf)."""
    for name, index, value in picks:
        q = _copy(p)
        q[name] = np.array(q[name], dtype=F64)
        q[name][index] = value
        yield f"{name}{index}={value}", q


def _scan_gpu_vs_ref(host, dtype, deterministic):
    g = _gpu()
    r = _round(host, _scan_rule(dtype))
    dev = _dev(r)
    h64 = _host64(r)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    kw = dict(delta_softplus=True)
    out, last, saved = ssmkit.selective_scan_fwd(*(dev[k] for k in names[:5]), **{k: dev[k] for k in names[5:]}, **kw)
    grads = ssmkit.selective_scan_bwd(dev["dout"], *(dev[k] for k in names[:5]), **{k: dev[k] for k in names[5:]},
                                      **kw, saved=saved, dlast_state=dev["dlast_state"], deterministic=deterministic)
    g.sync_check()
    w_out, w_last = ref.selective_scan(*(h64[k] for k in names[:5]), **{k: h64[k] for k in names[5:]}, **kw,
                                       return_last_state=True)
    w_grads = ref.selective_scan_bwd(h64["dout"], *(h64[k] for k in names[:5]), **{k: h64[k] for k in names[5:]},
                                     **kw, dlast_state=h64["dlast_state"])
    return (out, last) + tuple(grads), (w_out, w_last) + tuple(w_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("var_bc", [True, False])
def test_gpu_scan_nan_inf_propagation(dtype, var_bc):
    Bz, Dz, L, N = 2, 4, 600, 8               # 3 forward chunks (bf16/fp32: 512 steps), 3 backward chunks
    p = scan_problem(Bz, Dz, L, N, var_b=var_bc, var_c=var_bc, seed=5)
    p["dout"], p["dlast_state"] = scan_extras(p, seed=6)
    bc = (lambda t: (1, 0, 3, t)) if var_bc else (lambda t: (2, 3))
    picks = [("u", (1, 2, 300), np.nan), ("u", (0, 1, 599), np.nan), ("u", (1, 3, 40), np.inf),
             ("delta", (0, 1, 520), np.nan), ("B", bc(257), np.nan), ("C", (bc(5)), np.nan), ("A", (3, 2), np.nan),
             ("D", (1,), np.nan), ("z", (1, 3, 10), np.nan), ("delta_bias", (2,), np.nan),
             ("initial_state", (0, 1, 4), np.nan), ("dout", (1, 2, 100), np.nan), ("dlast_state", (0, 3, 1), np.nan)]
    labels = ("out", "last_state") + SCAN_GRADS
    w_dt = "float32"
    for det in (None, True):
        for label, q in _injections(p, picks):
            got, want = _scan_gpu_vs_ref(q, dtype, det)
            assert any((~np.isfinite(to_numpy(w))).any() for w in want if w is not None), label
            for name, a, b in zip(labels, got, want):
                dt = dtype if name in ("out", "du", "ddelta", "dz") or dtype != "float32" else w_dt
                _assert_same_nonfinite_and_close(f"{label}: {name}", a, b, dt, grad=name.startswith("d"))
    # the pattern spelled out once: a NaN in u at t makes out[t:] of that channel NaN
    got, _ = _scan_gpu_vs_ref(next(_injections(p, picks[:1]))[1], dtype, None)
    o = to_numpy(got[0])
    assert np.isnan(o[1, 2, 300:]).all() and np.isfinite(o[1, 2, :300]).all() and np.isfinite(o[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_conv_nan_inf_propagation(dtype, layout):
    g = _gpu()
    Bz, Dz, L, W = 2, 40, 300, 4
    p = conv_problem(Bz, Dz, L, W, seed=3)
    rng = np.random.default_rng(4)
    p["dout"], p["dfinal_states"] = rng.standard_normal((Bz, Dz, L)), rng.standard_normal((Bz, Dz, W - 1))
    picks = [("x", (1, 2, 100), np.nan), ("x", (0, 7, L // 2 - 1), np.nan), ("x", (1, 3, L - 2), np.nan),
             ("x", (0, 5, 20), np.inf), ("weight", (3, 1), np.nan), ("bias", (4,), np.nan),
             ("initial_states", (1, 0, 2), np.nan), ("dout", (0, 5, 200), np.nan), ("dfinal_states", (1, 2, 0), np.nan)]
    for (name, index, _), (label, q) in zip(picks, _injections(p, picks)):
        # A NaN weight also reaches the dx of tokens no output sees (padding, past the end): the
        # kernel multiplies masked taps by the weight (w * 0 = NaN), the reference selects them away.
        extra = {}
        if name == "weight":
            extra = {k: _mask(shape, (slice(None), index[0])) for k, shape in
                     (("dx", (Bz, Dz, L)), ("dinitial_states", (Bz, Dz, W - 1)))}
        r = _round(q, lambda k, v: dtype)
        dev, h64 = _dev(r), _host64(r)
        if layout == "cl":
            dev["x"] = g.to_device(np.ascontiguousarray(r["x"].transpose(0, 2, 1))).transpose(0, 2, 1)
        kw = dict(activation="silu", seq_idx=dev["seq_idx"], initial_states=dev["initial_states"])
        out, fin = ssmkit.causal_conv1d(dev["x"], dev["weight"], dev["bias"], **kw, return_final_states=True)
        grads = ssmkit.causal_conv1d_bwd(dev["x"], dev["weight"], dev["bias"], dev["dout"], **kw,
                                         dfinal_states=dev["dfinal_states"])
        g.sync_check()
        kw64 = dict(activation="silu", seq_idx=h64["seq_idx"], initial_states=h64["initial_states"])
        w_out, w_fin = ref.causal_conv1d(h64["x"], h64["weight"], h64["bias"], **kw64, return_final_states=True)
        w_grads = ref.causal_conv1d_bwd(h64["x"], h64["weight"], h64["bias"], h64["dout"], **kw64,
                                        dfinal_states=h64["dfinal_states"])
        for out_name, a, b in zip(("out", "final_states", "dx", "dweight", "dbias", "dinitial_states"),
                                  (out, fin) + tuple(grads), (w_out, w_fin) + tuple(w_grads)):
            _assert_same_nonfinite_and_close(f"{label}: {out_name}", a, b, dtype, grad=out_name.startswith("d"),
                                             extra_ok=extra.get(out_name))


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [False, True])
def test_gpu_conv_update_nan(ring):
    g = _gpu()
    p = update_problem(B=3, D=70, W=4, S=6, L_new=3, pool=5)
    p["conv_state_indices"] = np.array([4, -1, 0], np.int32)
    if ring:
        p["cache_seqlens"] = np.array([2, 0, 7], np.int32)
    picks = [("x", (0, 5, 1), np.nan), ("x", (1, 6, 0), np.nan), ("conv_state", (4, 9, 3), np.nan),
             ("conv_state", (1, 2, 2), np.nan), ("weight", (11, 0), np.nan), ("bias", (12,), np.inf)]
    for label, q in _injections(p, picks):
        r = _round(q, lambda k, v: "float32")
        dev, h64 = _dev(r), _host64(r)
        out = ssmkit.causal_conv1d_update(**dev)
        g.sync_check()
        w_out = ref.causal_conv1d_update(**h64)
        _assert_same_nonfinite_and_close(f"{label}: out", out, w_out, "float32")
        _assert_same_nonfinite_and_close(f"{label}: conv_state", dev["conv_state"], h64["conv_state"], "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype, in_dtype", [("float32", "float32"), ("float32", "bfloat16"),
                                                   ("bfloat16", "bfloat16")])
def test_gpu_ssu_nan(state_dtype, in_dtype):
    g = _gpu()
    p = ssu_problem(B=3, H=4, P=8, G=2, N=16, pool=5)
    p["state_batch_indices"] = np.array([4, -1, 0], np.int32)
    picks = [("x", (0, 1, 2), np.nan), ("x", (1, 0, 0), np.nan), ("dt", (2, 3, 5), np.nan), ("A", (2, 1, 7), np.nan),
             ("B", (0, 1, 3), np.nan), ("C", (2, 0, 9), np.nan), ("D", (3, 4), np.nan), ("z", (0, 2, 2), np.inf),
             ("dt_bias", (1, 6), np.nan), ("state", (4, 0, 1, 1), np.nan), ("state", (2, 1, 1, 1), np.nan)]
    for label, q in _injections(p, picks):
        rule = lambda k, v: state_dtype if k == "state" else (in_dtype if k in ("x", "dt", "z", "B", "C")  # noqa: E731
                                                              else "float32")
        r = _round(q, rule)
        dev, h64 = _dev(r), _host64(r)
        out = ssmkit.selective_state_update(**dev)
        g.sync_check()
        w_out = ref.selective_state_update(**h64)
        _assert_same_nonfinite_and_close(f"{label}: out", out, w_out, in_dtype)
        _assert_same_nonfinite_and_close(f"{label}: state", dev["state"], h64["state"], state_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_linear_scan_nan(dtype):
    g = _gpu()
    p = ls_problem((3, 700))
    p["dh"] = np.random.default_rng(2).standard_normal((3, 700))
    picks = [("a", (1, 300), np.nan), ("b", (0, 0), np.nan), ("b", (2, 699), np.inf), ("initial", (2,), np.nan),
             ("dh", (1, 256), np.nan)]
    for reverse in (False, True):
        for label, q in _injections(p, picks):
            r = _round(q, lambda k, v: dtype)
            dev, h64 = _dev(r), _host64(r)
            h = ssmkit.linear_scan(dev["a"], dev["b"], dev["initial"], reverse=reverse)
            grads = ssmkit.linear_scan_bwd(dev["a"], dev["b"], dev["dh"], dev["initial"], reverse=reverse)
            g.sync_check()
            w_h = ref.linear_scan(h64["a"], h64["b"], h64["initial"], reverse=reverse)
            w_grads = ref.linear_scan_bwd(h64["a"], h64["b"], h64["dh"], h64["initial"], reverse=reverse)
            for name, a, b in zip(("h", "da", "db", "dinitial"), (h,) + tuple(grads), (w_h,) + tuple(w_grads)):
                _assert_same_nonfinite_and_close(f"{label} reverse={reverse}: {name}", a, b, dtype,
                                                 grad=name != "h")


@pytest.mark.gpu
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_layer_norm_nan(rms, dtype):
    g = _gpu()
    p = ln_problem((3, 5, 1000))
    rng = np.random.default_rng(8)
    p["dy"], p["drout"] = rng.standard_normal((3, 5, 1000)), rng.standard_normal((3, 5, 1000))
    picks = [("x", (1, 2, 17), np.nan), ("x", (2, 4, 999), np.inf), ("residual", (0, 0, 0), np.nan),
             ("weight", (500,), np.nan), ("bias", (3,), np.nan), ("dy", (1, 1, 64), np.nan), ("drout", (2, 2, 2), np.nan)]
    for label, q in _injections(p, picks):
        r = _round(q, lambda k, v: "float32" if k in ("weight", "bias", "residual", "drout") else dtype)
        dev, h64 = _dev(r), _host64(r)
        y, rout, mean, rstd = ssmkit.layer_norm_fwd(dev["x"], dev["weight"], dev["bias"], dev["residual"],
                                                    is_rms_norm=rms)
        dx, dw, db, dres = ssmkit.layer_norm_bwd(dev["dy"], rout, dev["weight"], dev["bias"], mean, rstd, dev["drout"],
                                                 has_residual=True, is_rms_norm=rms)
        g.sync_check()
        w_y, w_rout = ref.layer_norm(h64["x"], h64["weight"], h64["bias"], h64["residual"], prenorm=True,
                                     is_rms_norm=rms)
        w_dx, w_dw, w_db, _ = ref.layer_norm_bwd(h64["dy"], w_rout, h64["weight"], h64["bias"],
                                                 dresidual_out=h64["drout"], is_rms_norm=rms)
        for name, a, b, dt in (("y", y, w_y, dtype), ("residual_out", rout, w_rout, "float32"),
                               ("dx", dx, w_dx, dtype), ("dweight", dw, w_dw, "float32"), ("dbias", db, w_db, "float32")):
            _assert_same_nonfinite_and_close(f"{label}: {name}", a, b, dt, grad=name.startswith("d"))


# ============================================================================ GPU: errors and strides

@pytest.mark.gpu
def test_gpu_written_arrays_refused_before_launch(monkeypatch):
    """Overlapping written CuPy arrays (broadcast, as_strided) raise before anything launches."""
    g = _gpu()
    import cupy
    from cupy.lib.stride_tricks import as_strided

    def bcast(shape, dtype=np.float32):
        return cupy.broadcast_to(cupy.zeros((1,) + shape[1:], dtype), shape)

    def overlap(shape, dtype=np.float32):
        buf = cupy.zeros(int(np.prod(shape)) + 16, dtype)
        return as_strided(buf, shape, (buf.itemsize,) * len(shape))

    s = _dev(_round(scan_problem(), _scan_rule("float32")))
    c = _dev(_round(conv_problem(seq=False), lambda k, v: "float32"))
    u = _dev(_round(update_problem(), lambda k, v: "float32"))
    q = _dev(_round(ssu_problem(), lambda k, v: "float32"))
    ln = _dev(_round(ln_problem(), lambda k, v: "float32"))
    calls = [(lambda o: ssmkit.selective_scan(**s, out=o), "out", (2, 4, 9)),
             (lambda o: ssmkit.causal_conv1d(**c, out=o), "out", (2, 5, 9)),
             (lambda o: ssmkit.causal_conv1d_update(**u, out=o), "out", (3, 5, 2)),
             (lambda o: ssmkit.causal_conv1d_update(**dict(u, conv_state=o)), "conv_state", (3, 5, 5)),
             (lambda o: ssmkit.selective_state_update(**q, out=o), "out", (2, 4, 3)),
             (lambda o: ssmkit.selective_state_update(**dict(q, state=o)), "state", (2, 4, 3, 4)),
             (lambda o: ssmkit.SelectiveStateUpdatePlan(**dict(q, state=o)), "state", (2, 4, 3, 4)),
             (lambda o: ssmkit.layer_norm(**ln, out=o), "out", (2, 3, 8))]
    with _no_launch(monkeypatch):
        for call, name, shape in calls:
            with pytest.raises(ValueError, match=f"argument '{name}' is written and must not have zero strides"):
                call(bcast(shape))
            with pytest.raises(ValueError, match=f"argument '{name}' is written and must not overlap itself"):
                call(overlap(shape))
            if name == "out":
                with pytest.raises(ValueError, match="argument 'out' must have shape"):
                    call(cupy.zeros(shape[:-1] + (shape[-1] + 1,), np.float32))
                with pytest.raises(TypeError, match="argument 'out' must have dtype"):
                    call(cupy.zeros(shape, np.float64))
    g.sync_check()


@pytest.mark.gpu
def test_gpu_negative_strides_against_reference():
    """Every op on reversed (negative-stride) inputs and outputs equals the reference."""
    g = _gpu()
    import cupy

    def rev(host_arr):
        """A device view with the host values and a negative stride along the last axis."""
        return g.to_device(np.ascontiguousarray(host_arr[..., ::-1]))[..., ::-1]

    def revdev(h):
        return {k: (rev(v) if _is_float(v) and v.ndim >= 1 else
                    (g.to_device(v) if isinstance(v, np.ndarray) else v)) for k, v in h.items()}

    # selective scan: every input reversed along its last axis, out reversed too
    for dtype, var_bc in (("float32", True), ("bfloat16", True), ("float32", False)):
        r = _round(scan_problem(2, 4, 600, 8, var_b=var_bc, var_c=var_bc, seed=9), _scan_rule(dtype))
        h64 = _host64(r)
        out = cupy.zeros((2, 4, 600), g.np_dtype(dtype))[:, ::-1, ::-1]
        got, last = ssmkit.selective_scan(**revdev(r), out=out, return_last_state=True)
        assert got is out
        w, wl = ref.selective_scan(**h64, return_last_state=True)
        assert_close("scan out (reversed)", got, w, dtype)
        assert_close("scan last (reversed)", last, wl, "float32")
        dout = g.rounded(np.random.default_rng(1).standard_normal((2, 4, 600)), dtype)
        o, l2, saved = ssmkit.selective_scan_fwd(**revdev(r))
        grads = ssmkit.selective_scan_bwd(rev(dout), **revdev(r), saved=saved)
        wg = ref.selective_scan_bwd(g.as64(dout), **h64)
        for name, a, b in zip(SCAN_GRADS, grads, wg):
            if b is not None:
                assert_close(f"scan {name} (reversed)", a, b, dtype if dtype != "float32" or name in ("du", "ddelta", "dz")
                             else "float32", grad=True)
    # causal conv1d (forward, backward, update with a reversed state)
    r = _round(conv_problem(2, 40, 300, seed=2), lambda k, v: "float32")
    h64 = _host64(r)
    d = revdev(r)
    d["seq_idx"] = g.to_device(r["seq_idx"])
    out = cupy.zeros((2, 40, 300), np.float32)[::-1, :, ::-1]
    got, fin = ssmkit.causal_conv1d(**d, out=out, return_final_states=True)
    w, wf = ref.causal_conv1d(**h64, return_final_states=True)
    assert_close("conv out (reversed)", got, w, "float32")
    assert_close("conv final (reversed)", fin, wf, "float32")
    dout = np.random.default_rng(3).standard_normal((2, 40, 300)).astype(np.float32)
    grads = ssmkit.causal_conv1d_bwd(d["x"], d["weight"], d["bias"], rev(dout), activation="silu",
                                     seq_idx=d["seq_idx"], initial_states=d["initial_states"])
    wg = ref.causal_conv1d_bwd(h64["x"], h64["weight"], h64["bias"], dout.astype(F64), activation="silu",
                               seq_idx=h64["seq_idx"], initial_states=h64["initial_states"])
    for name, a, b in zip(("dx", "dweight", "dbias", "dinitial_states"), grads, wg):
        assert_close(f"conv {name} (reversed)", a, b, "float32", grad=True)
    up = _round(update_problem(B=3, D=70, S=6, L_new=3), lambda k, v: "float32")
    h64 = _host64(up)
    d = revdev(up)
    o = ssmkit.causal_conv1d_update(**d)
    assert d["conv_state"].strides[-1] < 0
    w = ref.causal_conv1d_update(**h64)
    assert_close("update out (reversed)", o, w, "float32")
    assert_close("update state (reversed)", d["conv_state"], h64["conv_state"], "float32")
    # linear scan
    r = _round(ls_problem((3, 700)), lambda k, v: "float32")
    h64 = _host64(r)
    d = revdev(r)
    for reverse in (False, True):
        assert_close("linear_scan (reversed)", ssmkit.linear_scan(**d, reverse=reverse),
                     ref.linear_scan(**h64, reverse=reverse), "float32")
    # layer norm: rows reversed (a negative row stride, read as a view) and reversed H (copied)
    r = _round(ln_problem((4, 6, 512)), lambda k, v: "float32")
    h64 = _host64(r)
    for mk in (lambda a: g.to_device(np.ascontiguousarray(a[::-1, ::-1]))[::-1, ::-1], rev):
        d = {k: (mk(v) if v.ndim == 3 else rev(v)) for k, v in r.items()}
        out = cupy.zeros((4, 6, 512), np.float32)[::-1, ::-1]
        y = ssmkit.layer_norm(**d, out=out)
        assert y is out
        assert_close("layer_norm (reversed)", y, ref.layer_norm(**h64), "float32")
    g.sync_check()


@pytest.mark.gpu
def test_gpu_devices():
    """Arrays on two devices, or on a device that is not the current one, raise before a launch;
    torch tensors on two devices (or CPU + CUDA) too."""
    g = _gpu()
    import cupy

    p = _round(conv_problem(seq=False), lambda k, v: "float32")
    if torch.cuda.is_available():
        x, w, b = (torch.tensor(p[k], device="cuda") for k in ("x", "weight", "bias"))
        with pytest.raises(ValueError, match="one device"):
            st.causal_conv1d_fn(x, w.cpu(), b)
        with pytest.raises(ValueError, match="one device"):
            st.causal_conv1d_fn(x, w, b, return_final_states=True, final_states_out=torch.zeros(2, 5, 3))
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs for the cross-device cases")
    with cupy.cuda.Device(0):
        x0 = g.to_device(p["x"])
    with cupy.cuda.Device(1):
        w1, b1 = g.to_device(p["weight"]), g.to_device(p["bias"])
        x1 = g.to_device(p["x"])
    with pytest.raises(ValueError, match="all arrays must be on one GPU"):
        ssmkit.causal_conv1d(x0, w1, b1)
    with cupy.cuda.Device(0), pytest.raises(ValueError, match="current device is cuda:0"):
        ssmkit.causal_conv1d(x1, w1, b1)
    s = _round(scan_problem(), _scan_rule("float32"))
    with cupy.cuda.Device(1):
        d1 = _dev(s)
    with cupy.cuda.Device(0):
        with pytest.raises(ValueError, match="all arrays must be on one GPU"):
            ssmkit.selective_scan(**dict(d1, u=g.to_device(s["u"])))
    if torch.cuda.device_count() >= 2:
        x, w, b = (torch.tensor(p[k], device="cuda:0") for k in ("x", "weight", "bias"))
        with pytest.raises(ValueError, match="one device"):
            st.causal_conv1d_fn(x, w.to("cuda:1"), b)

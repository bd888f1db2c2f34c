"""Large shapes (issue 13, item 3): element offsets past 2^31, D > 65535, L > 2^20, N = 256,
batches of 1 and 4096, for the selective scan (forward, backward) and causal conv1d (forward,
backward, update).

The reference cannot run on such problems, so each one is *tiled* from a small problem whose
float64 reference is cheap:

    big[b, d, t] = small[b % Bp, d % Dp, t % w]      (inputs; per-channel weights by d % Dp)

with L = n * w (n >= 3; L / w odd, so a 2^32-element wrap never maps a position onto its own
tile). A scan state decays over one period to below 1e-15 (checked on the data: exp(A sum(delta))
<= 1e-15 for every row and state), and a conv window spans W - 1 < w steps, so every output of
period p depends only on periods p - 1, p, p + 1: period 0 equals the first period of the small
problem run over 3 periods, the last period its last one, and every other period its middle one.
Per-element outputs (out, last_state, du, ddelta, dz, dx, dinitial states, variable dB/dC) are
therefore compared, *every element*, on the GPU, against the 3-period reference (``Tiling.maps``);
sums over batch and time (dA, dD, ddelta_bias, constant dB/dC, dweight, dbias) against
(B / Bp) * (R3 + (n - 3) (R4 - R3)), R3 and R4 the references over 3 and 4 periods. The CPU test
``test_tiling_method_matches_the_direct_reference`` checks this construction against the
reference run on a whole (small) tiled problem. Outputs passed as ``out=`` are NaN-poisoned and
CuPy's memory pool is NaN-filled before each call, so an element a kernel leaves unwritten fails.

CPU tests also audit every kernel's PTX for 32-bit products of block indices, and build the
launch plans of shapes far beyond memory (B*D*L = 2^44) from stand-in arrays: grids, workspace
sizes and 64-bit parameters, and the clear error past the grid limit.

GPU tests need up to ~33 GiB of free GPU memory each (skipped with a message otherwise) and take
seconds each (marked slow).
"""
from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

import ssmkit
from ssmkit.ops import causal_conv1d as conv_op
from ssmkit.ops import selective_scan as scan_op
from ssmkit.reference import causal_conv1d as ref_conv, causal_conv1d_bwd as ref_conv_bwd
from ssmkit.reference import causal_conv1d_update as ref_update
from ssmkit.reference import selective_scan as ref_scan, selective_scan_bwd as ref_scan_bwd
from ssmkit.reference._common import softplus

from compare import GRAD_FACTOR, TOL
from gpu_util import np_dtype, poison, rounded, sync_check

GiB = 1 << 30
CHUNK = 1 << 26          # elements per GPU comparison chunk (~1.5 GB of temporaries)


# ==================================================================== the tiling

@dataclass(frozen=True)
class Tiling:
    """big[b, d, t] = small[b % Bp, d % Dp, t % w], L = n * w; the references run over 3 (and 4)
    periods of the small problem."""

    B: int
    D: int
    L: int
    Bp: int
    Dp: int
    w: int

    def __post_init__(self):
        assert self.B % self.Bp == 0 and self.D % self.Dp == 0 and self.L % self.w == 0 and self.n >= 3

    @property
    def n(self) -> int:
        return self.L // self.w

    def b(self, i):
        return i % self.Bp

    def d(self, i):
        return i % self.Dp

    def t(self, i):
        """Time index into the 3-period reference: period 0 -> slot 0, the last -> slot 2, else 1."""
        p = i // self.w
        slot = np.where(p == 0, 0, np.where(p == self.n - 1, 2, 1))
        return slot * self.w + i % self.w

    @staticmethod
    def same(i):
        return i

    def sums(self, r3, r4):
        """A sum over batch and time of the big problem from the 3- and 4-period references."""
        return (self.B // self.Bp) * (r3 + (self.n - 3) * (r4 - r3))

    def periods(self, a, k: int, axis: int = -1):
        """``a`` (one period along ``axis``) repeated k times along it."""
        return np.concatenate([a] * k, axis=axis)


def _tile_dev(small: np.ndarray, reps):
    """The device array of shape small.shape * reps with big[i] = small[i % small.shape] (one
    broadcast copy; 16-bit floats move as raw 16-bit words)."""
    import cupy

    raw = small.view(np.uint16) if small.dtype.itemsize == 2 else small
    src = cupy.asarray(np.ascontiguousarray(raw))
    out = cupy.empty(tuple(s * r for s, r in zip(small.shape, reps)), src.dtype)
    out.reshape(sum(((r, s) for s, r in zip(small.shape, reps)), ()))[...] = \
        src.reshape(sum(((1, s) for s in small.shape), ()))
    return out.view(small.dtype) if raw is not small else out


def _f32(a):
    """float32 copy of a device array of any float dtype (bfloat16 through its bits)."""
    import cupy

    if str(a.dtype) == "bfloat16":
        return (a.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    return a.astype(cupy.float32)


def _chunks(shape, limit=CHUNK):
    """Boxes (per-axis (start, stop)) covering ``shape``, each of at most ``limit`` elements."""
    per = [int(np.prod(shape[k + 1:], dtype=np.int64)) for k in range(len(shape))]
    k = next(k for k in range(len(shape)) if per[k] <= limit)
    step = max(1, limit // per[k])
    for outer in itertools.product(*(range(s) for s in shape[:k])):
        for a in range(0, shape[k], step):
            yield (tuple((i, i + 1) for i in outer) + ((a, min(a + step, shape[k])),)
                   + tuple((0, s) for s in shape[k + 1:]))


def check_tiled(name, got, want, maps, dtype, grad=False, scale=1.0):
    """Every element of device array ``got`` against ``want`` (NumPy float64):
    got[i0, i1, ...] ~ want[maps[0](i0), maps[1](i1), ...] within compare.TOL[dtype] by the rule
    of compare.assert_close (relative to the element and to the RMS of the whole expected
    tensor); NaN never passes. On the GPU, chunk by chunk. Returns max-abs error."""
    import cupy

    assert got.ndim == want.ndim == len(maps), name
    rtol, atol = TOL[dtype]
    if grad:
        rtol, atol = rtol * GRAD_FACTOR, atol * GRAD_FACTOR
    rtol, atol = rtol * scale, atol * scale
    # RMS of the big expected tensor: each small element weighted by how often it appears.
    counts = [np.bincount(m(np.arange(n)), minlength=want.shape[k]).astype(np.float64)
              for k, (m, n) in enumerate(zip(maps, got.shape))]
    weight = counts[0]
    for c in counts[1:]:
        weight = np.multiply.outer(weight, c)
    rms = float(np.sqrt(np.sum(weight * np.abs(want) ** 2) / np.sum(weight))) or 1.0
    w_dev = cupy.asarray(want.astype(np.float32))
    n_bad, max_abs, first = 0, 0.0, []
    for box in _chunks(got.shape):
        g = _f32(got[tuple(slice(a, b) for a, b in box)])
        idx = [cupy.asarray(m(np.arange(a, b))) for m, (a, b) in zip(maps, box)]
        e = w_dev[cupy.ix_(*idx)]
        diff = cupy.abs(g - e)
        bad = ~(diff <= atol + rtol * cupy.maximum(cupy.abs(e), rms))
        nb = int(bad.sum())
        if nb:
            n_bad += nb
            for ix in cupy.asnumpy(cupy.argwhere(bad)[:5 - len(first)]) if len(first) < 5 else []:
                gi = tuple(int(i) + a for i, (a, _) in zip(ix, box))
                first.append(f"{gi}: got {float(g[tuple(ix)])} want {float(e[tuple(ix)])}")
        max_abs = max(max_abs, float(cupy.max(cupy.where(cupy.isfinite(diff), diff, 0))))
        del g, e, diff, bad
    if n_bad:
        raise AssertionError(f"{name} ({dtype}): {n_bad} of {got.size} elements off (max abs {max_abs:.3g}, "
                             f"rtol {rtol}, atol {atol}, rms {rms:.3g}); first: {'; '.join(first)}")
    return max_abs


def _require_free(nbytes: int) -> None:
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    free, total = cupy.cuda.runtime.memGetInfo()
    if free < nbytes:
        pytest.skip(f"needs {nbytes / GiB:.1f} GiB of free GPU memory; {free / GiB:.1f} of {total / GiB:.1f} GiB free")


POISON_MAX = 48 * GiB     # more than any single call here allocates


def _poison_pool() -> None:
    """Fill up to POISON_MAX of free GPU memory with 0xFF bytes (NaN in every float dtype)
    inside CuPy's pool and give it back: the allocations that follow on this stream (ssmkit's
    outputs and workspaces) are carved from that NaN-filled block, so an element a kernel leaves
    unwritten shows as NaN rather than as whatever the memory held before."""
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    free, _ = cupy.cuda.runtime.memGetInfo()
    n = min(POISON_MAX, free - GiB)
    while n >= GiB:
        try:
            a = cupy.empty(n, dtype=cupy.uint8)
        except cupy.cuda.memory.OutOfMemoryError:
            n //= 2
            continue
        a.fill(255)
        del a
        return


@pytest.fixture
def gpu_memory():
    """Frees CuPy's pool before and after a large test."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    yield
    cupy.get_default_memory_pool().free_all_blocks()


# ==================================================================== selective scan problems

@dataclass(frozen=True)
class ScanCase:
    tiling: Tiling
    N: int
    bc: str                   # "var" (B, G, N, L) or "const" (D, N)
    G: int = 1
    init: bool = False        # initial_state and dlast_state
    z_forward: bool = False   # an inference forward with z before the training pass
    A_range: tuple = (0.1, 1.0)

    @property
    def elems(self) -> int:
        t = self.tiling
        return t.B * t.D * t.L


SCAN_CASES = {
    # B*D*L = 2.1496e9 > 2^31, L > 2^20, batch 1, variable B/C
    "long_L_batch1": ScanCase(Tiling(1, 2048, 1025 * 1024, 1, 128, 1024), N=16, bc="var", init=True),
    # D > 65535 (65544 = 24 * 2731: the channel period 24 does not divide 2^16), constant B/C, z
    "wide_D": ScanCase(Tiling(1, 65544, 33 * 1024, 1, 24, 1024), N=16, bc="const", z_forward=True),
    # N = 256: saved states (B, D, L/256, N) hold 2.2e9 elements
    "N256": ScanCase(Tiling(1, 8192, 257 * 1024, 1, 32, 1024), N=256, bc="const"),
    # batch 4096, two groups of variable B/C
    "batch4096": ScanCase(Tiling(4096, 80, 7 * 1024, 4, 80, 1024), N=4, bc="var", G=2),
}


def scan_small(case: ScanCase, seed: int, in_dtype: str = "bfloat16") -> dict:
    """One period of the small problem, rounded to the kernel's dtypes (NumPy)."""
    t, N = case.tiling, case.N
    rng = np.random.default_rng(seed)
    real_w = scan_op.weight_dtypes(in_dtype)[0]
    Bp, Dp, w = t.Bp, t.Dp, t.w
    lo, hi = case.A_range
    p = dict(u=rounded(rng.standard_normal((Bp, Dp, w)), in_dtype),
             delta=rounded(rng.uniform(-2.2, 0.5, (Bp, Dp, w)), in_dtype),
             A=rounded(-rng.uniform(lo, hi, (Dp, N)), real_w),
             D=rounded(rng.standard_normal(Dp), real_w),
             delta_bias=rounded(rng.uniform(-0.1, 0.1, Dp), real_w),
             dout=rounded(rng.standard_normal((Bp, Dp, w)), in_dtype))
    if case.bc == "var":
        assert case.G == 1 or Dp == t.D, "a channel period needs one group of variable B/C"
        for k in ("B", "C"):
            p[k] = rounded(rng.standard_normal((Bp, case.G, N, w)), in_dtype)
    else:
        for k in ("B", "C"):
            p[k] = rounded(rng.standard_normal((Dp, N)), real_w)
    if case.z_forward:
        p["z"] = rounded(rng.standard_normal((Bp, Dp, w)), in_dtype)
    if case.init:
        p["initial_state"] = rounded(rng.standard_normal((Bp, Dp, N)), real_w)
        p["dlast_state"] = rounded(rng.standard_normal((Bp, Dp, N)), real_w)
    # The tiling's premise: a state forgets one whole period (decay <= 1e-15 for every row).
    dsum = softplus(p["delta"].astype(np.float64) + p["delta_bias"].astype(np.float64)[:, None]).sum(-1)
    decay = np.exp(p["A"].astype(np.float64)[None] * dsum[..., None])
    assert decay.max() <= 1e-15, f"a state survives a period (decay {decay.max():.2e}): widen the period"
    return p


def scan_reference(case: ScanCase, p: dict, k: int, z: bool):
    """float64 reference over k periods: (out, last), grads (or None for a pure forward)."""
    t = case.tiling
    f = lambda name: None if p.get(name) is None else p[name].astype(np.float64)   # noqa: E731
    per = lambda name: None if p.get(name) is None else t.periods(f(name), k)        # noqa: E731
    B_, C_ = (per("B"), per("C")) if case.bc == "var" else (f("B"), f("C"))
    kw = dict(D=f("D"), delta_bias=f("delta_bias"), delta_softplus=True, initial_state=f("initial_state"))
    if z:
        kw["z"] = per("z")
    out, last = ref_scan(per("u"), per("delta"), f("A"), B_, C_, return_last_state=True, **kw)
    grads = None
    if not z:
        grads = ref_scan_bwd(per("dout"), per("u"), per("delta"), f("A"), B_, C_, dlast_state=f("dlast_state"), **kw)
    return (out, last), grads


GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")


def scan_expectations(case: ScanCase, r3, r4):
    """{name: (small expected array, per-axis maps)} for every output of the big problem."""
    t = case.tiling
    (o3, l3), g3 = r3
    _, g4 = r4
    g3, g4 = dict(zip(GRAD_NAMES, g3)), dict(zip(GRAD_NAMES, g4))
    act = (t.b, t.d, t.t)
    exp = {"out": (o3, act), "last_state": (l3, (t.b, t.d, t.same)),
           "du": (g3["du"], act), "ddelta": (g3["ddelta"], act)}
    for name in ("dA", "dD", "ddelta_bias"):
        exp[name] = (t.sums(g3[name], g4[name]), (t.d,) + (t.same,) * (g3[name].ndim - 1))
    for name in ("dB", "dC"):
        if case.bc == "var":
            exp[name] = ((t.D // t.Dp) * g3[name], (t.b, t.same, t.same, t.t))
        else:
            exp[name] = (t.sums(g3[name], g4[name]), (t.d, t.same))
    if case.init:
        exp["dinitial_state"] = (g3["dinitial_state"], (t.b, t.d, t.same))
    return exp


def _scan_grad_tolerance(name: str, case: ScanCase) -> tuple[str, float]:
    """(dtype of the tolerance, scale) for a gradient of a bf16 problem: the stored precision.
    bf16 for du, ddelta, dz and variable dB/dC; fp32 (x4: sums over up to 4e9 steps) for the
    fp32 reductions dA, dD, ddelta_bias, constant dB/dC and dinitial_state. (The reference sees
    the same bf16-rounded inputs, so only the kernel's fp32 arithmetic and the output's storage
    rounding separate them.)"""
    if name in ("du", "ddelta", "dz") or (name in ("dB", "dC") and case.bc == "var"):
        return "bfloat16", 1.0
    return "float32", 4.0


# ==================================================================== causal conv1d problems

@dataclass(frozen=True)
class ConvCase:
    tiling: Tiling
    W: int
    layout: str               # "cf" (time contiguous) or "cl" (channels contiguous)
    wdtype: str = "float32"
    silu: bool = True
    bias: bool = True
    seq: bool = False
    init: bool = False
    dfinal: bool = False

    @property
    def elems(self) -> int:
        t = self.tiling
        return t.B * t.D * t.L


CONV_CASES = {
    "cf_long_L_batch1": ConvCase(Tiling(1, 2048, 1025 * 1024, 1, 128, 1024), W=4, layout="cf"),
    "cl_wide_D": ConvCase(Tiling(1, 65544, 33 * 1024, 1, 24, 1024), W=3, layout="cl", wdtype="bfloat16",
                          silu=False, init=True, dfinal=True),
    "cf_batch4096_seq": ConvCase(Tiling(4096, 80, 7 * 1024, 4, 80, 1024), W=4, layout="cf", seq=True, init=True),
    "cl_batch4096": ConvCase(Tiling(4096, 80, 7 * 1024, 4, 16, 1024), W=2, layout="cl", dfinal=True),
}


def conv_small(case: ConvCase, seed: int, dtype: str = "bfloat16") -> dict:
    t = case.tiling
    rng = np.random.default_rng(seed)
    Bp, Dp, w, W = t.Bp, t.Dp, t.w, case.W
    p = dict(x=rounded(rng.standard_normal((Bp, Dp, w)), dtype),
             weight=rounded(rng.standard_normal((Dp, W)) * 0.5, case.wdtype),
             dout=rounded(rng.standard_normal((Bp, Dp, w)), dtype))
    p["bias"] = rounded(rng.standard_normal(Dp) * 0.5, case.wdtype) if case.bias else None
    if case.seq:
        # three sequences per period (ids 0, 1, 2 at random cuts) and a padded tail (id -1)
        ids = np.zeros((Bp, w), np.int32)
        pad = max(1, w // 40)
        for b in range(Bp):
            cuts = np.sort(rng.choice(np.arange(w // 8, w - pad - w // 8), 2, replace=False))
            ids[b, cuts[0]:cuts[1]], ids[b, cuts[1]:] = 1, 2
            ids[b, w - pad:] = -1
        p["seq_idx"] = ids
    p["initial_states"] = rounded(rng.standard_normal((Bp, Dp, W - 1)), dtype) if case.init else None
    p["dfinal_states"] = rounded(rng.standard_normal((Bp, Dp, W - 1)), dtype) if case.dfinal else None
    return p


def conv_reference(case: ConvCase, p: dict, k: int):
    t = case.tiling
    f = lambda name: None if p.get(name) is None else p[name].astype(np.float64)   # noqa: E731
    x = t.periods(f("x"), k)
    seq = None if p.get("seq_idx") is None else t.periods(p["seq_idx"], k)
    act = "silu" if case.silu else None
    out, fin = ref_conv(x, f("weight"), f("bias"), activation=act, seq_idx=seq, initial_states=f("initial_states"),
                        return_final_states=True)
    grads = ref_conv_bwd(x, f("weight"), f("bias"), t.periods(f("dout"), k), activation=act, seq_idx=seq,
                         initial_states=f("initial_states"), dfinal_states=f("dfinal_states"))
    return (out, fin), grads


def conv_expectations(case: ConvCase, r3, r4):
    t = case.tiling
    (o3, f3), (dx3, dw3, db3, di3) = r3
    _, (_, dw4, db4, _) = r4
    act = (t.b, t.d, t.t)
    exp = {"out": (o3, act), "final_states": (f3, (t.b, t.d, t.same)), "dx": (dx3, act),
           "dweight": (t.sums(dw3, dw4), (t.d, t.same))}
    if case.bias:
        exp["dbias"] = (t.sums(db3, db4), (t.d,))
    if case.init:
        exp["dinitial_states"] = (di3, (t.b, t.d, t.same))
    return exp


# ==================================================================== CPU: the method itself

def test_tiling_method_matches_the_direct_reference():
    """The tiling's expectations equal the reference run on a whole tiled problem (small
    enough to run directly): scan forward and backward, conv forward and backward, with batch,
    channel and time periods, initial states, seq_idx."""
    t = Tiling(B=4, D=6, L=5 * 64, Bp=2, Dp=3, w=64)
    scase = ScanCase(t, N=3, bc="var", init=True, A_range=(4.0, 8.0))
    p = scan_small(scase, 0, "float64")
    big = {k: np.tile(p[k], (2, 2, 5)) for k in ("u", "delta", "dout")}          # np.tile: big[i] = small[i % n]
    big.update({k: np.tile(p[k], (2, 1, 1, 5)) for k in ("B", "C")})
    big.update({k: np.tile(p[k], (2, 2, 1)) for k in ("initial_state", "dlast_state")})
    big.update(A=np.tile(p["A"], (2, 1)), D=np.tile(p["D"], 2), delta_bias=np.tile(p["delta_bias"], 2))
    kw = dict(D=big["D"], delta_bias=big["delta_bias"], delta_softplus=True, initial_state=big["initial_state"])
    out, last = ref_scan(big["u"], big["delta"], big["A"], big["B"], big["C"], return_last_state=True, **kw)
    grads = ref_scan_bwd(big["dout"], big["u"], big["delta"], big["A"], big["B"], big["C"],
                         dlast_state=big["dlast_state"], **kw)
    exp = scan_expectations(scase, scan_reference(scase, p, 3, False), scan_reference(scase, p, 4, False))
    got = dict(zip(GRAD_NAMES, grads), out=out, last_state=last)
    for name, (want, maps) in exp.items():
        idx = np.ix_(*(m(np.arange(n)) for m, n in zip(maps, got[name].shape)))
        np.testing.assert_allclose(got[name], want[idx], rtol=1e-9, atol=1e-9, err_msg=name)

    ccase = ConvCase(Tiling(B=4, D=6, L=5 * 64, Bp=2, Dp=3, w=64), W=4, layout="cf", wdtype="float64",
                     seq=True, init=True, dfinal=True)
    p = conv_small(ccase, 1, "float64")
    x = np.tile(p["x"], (2, 2, 5))
    wgt, bias = np.tile(p["weight"], (2, 1)), np.tile(p["bias"], 2)
    seq, init = np.tile(p["seq_idx"], (2, 5)), np.tile(p["initial_states"], (2, 2, 1))
    dfin = np.tile(p["dfinal_states"], (2, 2, 1))
    out, fin = ref_conv(x, wgt, bias, activation="silu", seq_idx=seq, initial_states=init, return_final_states=True)
    dx, dw, db, di = ref_conv_bwd(x, wgt, bias, np.tile(p["dout"], (2, 2, 5)), activation="silu", seq_idx=seq,
                                  initial_states=init, dfinal_states=dfin)
    exp = conv_expectations(ccase, conv_reference(ccase, p, 3), conv_reference(ccase, p, 4))
    got = dict(out=out, final_states=fin, dx=dx, dweight=dw, dbias=db, dinitial_states=di)
    for name, (want, maps) in exp.items():
        idx = np.ix_(*(m(np.arange(n)) for m, n in zip(maps, got[name].shape)))
        np.testing.assert_allclose(got[name], want[idx], rtol=1e-9, atol=1e-9, err_msg=name)


def test_tiling_guard_rejects_a_state_that_outlives_the_period():
    with pytest.raises(AssertionError, match="survives a period"):
        scan_small(ScanCase(Tiling(1, 4, 3 * 64, 1, 4, 64), N=2, bc="var", A_range=(0.01, 0.02)), 0, "float64")


def test_cases_are_large_as_claimed():
    for name, c in SCAN_CASES.items():
        t = c.tiling
        assert c.elems > 2**31 and t.n % 2 == 1, name
        assert c.N == 256 or t.L > 2**20 or t.D > 65535 or t.B == 4096, name
    assert any(c.tiling.L > 2**20 and c.tiling.B == 1 for c in SCAN_CASES.values())
    n256 = SCAN_CASES["N256"].tiling
    assert n256.B * n256.D * -(-n256.L // 256) * 256 > 2**31          # its saved states
    for name, c in CONV_CASES.items():
        assert c.elems > 2**31 and c.tiling.n % 2 == 1, name
    assert 4096 * 65544 * 8 > 2**31                           # the update's state pool


# ==================================================================== CPU: 32-bit index products in the PTX

_PTX_INS = re.compile(r"^\s*(@%?!?\w+\s+)?([a-z][\w.]*)\s+(.*?);\s*$")
_PTX_REG = re.compile(r"%\w+")


def _split_operands(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "{[" and 1 or (ch in "}]" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def int32_block_index_products(ptx: str) -> list[tuple[int, str]]:
    """(line, instruction) of every 32-bit multiply, multiply-add or left shift of a value derived
    from %ctaid/%nctaid (blockIdx/gridDim) by 32-bit arithmetic: the instructions that overflow
    when blockIdx * stride or blockIdx * blockDim passes 2^31. The remainder step of the
    compiler's 32-bit fast path for 64-bit division (q * b after q = a / b) is exempt: it is
    bounded by a. A straight-line scan per function (registers are reset at each entry)."""
    taint, quot, found = set(), {}, []
    for no, line in enumerate(ptx.splitlines(), 1):
        if re.match(r"^\s*(\.visible\s+|\.weak\s+)?\.(entry|func)\b", line):
            taint, quot = set(), {}
            continue
        m = _PTX_INS.match(line)
        if not m:
            continue
        op, args = m.group(2), _split_operands(m.group(3))
        if op.startswith(("st.", "bra", "ret", "bar", "membar", "prefetch", "red.", "call")):
            continue
        dst, srcs = args[0], args[1:]
        base = op.split(".")[0]
        tainted = any(r in taint or "ctaid" in r for s in srcs for r in _PTX_REG.findall(s))
        is32 = re.search(r"\.(s32|u32|b32)$", op) is not None
        if base == "div" and is32 and len(srcs) == 2:
            quot[dst] = srcs[1]
        remainder = base == "mul" and len(srcs) == 2 and (quot.get(srcs[0]) == srcs[1] or quot.get(srcs[1]) == srcs[0])
        if is32 and tainted and not remainder and ((base in ("mul", "mad") and ".lo." in op) or base == "shl"):
            found.append((no, line.strip()))
        for r in _PTX_REG.findall(dst):
            taint.discard(r)
        if is32 and tainted and dst.startswith("%") and base in ("mov", "add", "sub", "mul", "mad", "shl", "or",
                                                                  "selp", "cvt"):
            taint.add(dst)
    return found


def _ptx(source: str, names: list[str], arch: int = 90) -> str:
    from cuda.bindings import nvrtc

    from ssmkit._compile import compile_options
    from ssmkit._nvrtc_offline import CUPY_ADDED_OPTIONS, NVRTCError, _program_log

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"audit.cu", 0, [], [])
    try:
        for n in names:
            nvrtc.nvrtcAddNameExpression(prog, n.encode())
        opts = [o.encode() for o in compile_options() + CUPY_ADDED_OPTIONS + (f"--gpu-architecture=compute_{arch}",)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NVRTCError(f"NVRTC failed: {err}\n{_program_log(prog)}")
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        buf = bytearray(size)
        nvrtc.nvrtcGetPTX(prog, buf)
        return bytes(buf).decode().rstrip("\0")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.nvrtc
def test_ptx_audit_flags_a_32bit_global_index():
    """The audit itself: the classic ``int i = blockIdx.x * blockDim.x + threadIdx.x`` is
    flagged; the same with a 64-bit product, and a 32-bit product of thread indices, are not."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings + nvidia-cuda-nvrtc (the test extra)")
    bad = ('extern "C" __global__ void k(float* x, long long n) {'
           ' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = 1.f; }')
    good = ('extern "C" __global__ void k(float* x, long long n) {'
            ' long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; int j = threadIdx.x * 7;'
            ' if (i < n) x[i] = (float)j; }')
    assert int32_block_index_products(_ptx(bad, []))
    assert not int32_block_index_products(_ptx(good, []))


@pytest.mark.nvrtc
def test_no_32bit_block_index_products_in_any_kernel():
    """Every kernel template (its first and last instantiation, in PTX for sm_90) is free of
    32-bit products of block indices. (All 584 instantiations were audited once the same way,
    in 2.6 minutes on 2 cores: none; see benchmarks/NOTES.md, "Large shapes".)"""
    pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings + nvidia-cuda-nvrtc (the test extra)")
    from ssmkit._compile import read_source
    from ssmkit._registry import variants

    by_template: dict[tuple[str, str], list[str]] = {}
    for ref in variants():
        by_template.setdefault((ref.file, ref.name.split("<")[0]), []).append(ref.name)
    by_file: dict[str, set[str]] = {}
    for (file, _), names in by_template.items():
        names = sorted(names)
        by_file.setdefault(file, set()).update({names[0], names[-1]})
    assert {"selective_scan_fwd.cu", "selective_scan_bwd.cu", "causal_conv1d.cu", "selective_state_update.cu",
            "linear_scan.cu", "reduce_partials.cu", "layer_norm.cu"} <= set(by_file)
    findings = {}
    for file, names in sorted(by_file.items()):
        found = int32_block_index_products(_ptx(read_source(file), sorted(names)))
        if found:
            findings[file] = found[:5]
    assert not findings, f"32-bit products of block indices: {findings}"


# ==================================================================== CPU: host plans at shapes beyond memory

class _Mem:
    def __init__(self, ptr):
        self.ptr, self.device_id = ptr, 0


class FakeArray:
    """Shape, strides, dtype and a device pointer: what the host code reads to validate a call
    and build its launch plan. No memory: shapes far beyond any GPU are fine."""

    __module__ = "tests.fake"

    def __init__(self, shape, dtype, strides=None, ptr=1 << 40):
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        item = self.dtype.itemsize
        if strides is None:
            strides, acc = [], 1
            for s in reversed(self.shape):
                strides.insert(0, acc)
                acc *= max(s, 1)
        self.strides = tuple(int(s) * item for s in strides)
        self.size = int(np.prod(self.shape, dtype=object))
        self.nbytes = self.size * item
        self.data = _Mem(ptr)
        self.device = type("Device", (), {"id": 0})()


def _fake_kernels(monkeypatch):
    """get_kernel and the device queries answered without a GPU."""
    from ssmkit import _launch

    kernel = type("Kernel", (), {})()
    monkeypatch.setattr(_launch, "get_kernel", lambda ref: kernel)
    monkeypatch.setattr(_launch, "DEFAULT_SMEM_LIMIT", 1 << 30)     # no opt-in (a device query)
    monkeypatch.setattr(conv_op, "get_kernel", lambda ref: kernel)
    monkeypatch.setattr(scan_op, "_sm_count", lambda: 132)


def _unpack(params, row) -> dict:
    rec = params.pack_row(row)
    return {n: int(rec[n]) for n in params.names}


def test_scan_plans_at_huge_shapes(monkeypatch):
    """Forward and backward plans for B*D*L = 2.8e14 (B = 4096, D = 65544 > 65535, L = 2^20,
    N = 256): grids within limits, every stride and size a 64-bit parameter, workspaces sized
    without overflow; a grid past 2^31 - 1 blocks is a ValueError, not a wrapped launch."""
    _fake_kernels(monkeypatch)
    B, D, L, N = 4096, 65544, 1 << 20, 256
    a = {"u": FakeArray((B, D, L), "bfloat16"), "delta": FakeArray((B, D, L), "bfloat16", ptr=2 << 40),
         "A": FakeArray((D, N), "float32"), "B": FakeArray((B, 1, N, L), "bfloat16"),
         "C": FakeArray((B, 1, N, L), "bfloat16"), "D": FakeArray((D,), "float32"), "z": None,
         "delta_bias": FakeArray((D,), "float32"), "initial_state": FakeArray((B, D, N), "float32")}
    spec = scan_op.validate(*(a[k] for k in scan_op._NAMES[:8]), True, a["initial_state"])
    fwd = scan_op._FwdPlan(spec, a, None, True, True)
    warps, bpg, smem = scan_op._launch_shape(spec, scan_op.fwd_smem)
    assert fwd.launch.grid == (B * bpg, 1, 1) and bpg == -(-D // warps) and fwd.launch.grid[0] < 2**31
    f = _unpack(scan_op.PARAMS, fwd.row)
    assert (f["batch"], f["dim"], f["seqlen"], f["dstate"]) == (B, D, L, N)
    assert (f["u_b"], f["u_d"], f["u_l"]) == (D * L, L, 1) and f["u_b"] > 2**31
    assert (f["B_b"], f["B_n"], f["init_b"]) == (N * L, L, D * N)
    assert (f["out_b"], f["n_saved"]) == (D * L, L // 256)
    a.update(dout=FakeArray((B, D, L), "bfloat16"), dlast_state=None)
    bwd = scan_op._BwdPlan(spec, a)
    assert bwd.launch.grid[0] == bwd.n_seg * B * bwd.bpg < 2**31
    for atomic in (0, 1):
        mode = scan_op._BwdMode(bwd, atomic)
        bpg = 1 if atomic else bwd.bpg
        assert mode.var_bytes >= 2 * B * bpg * N * L * 4 > 2**40      # (B, G, bpg, N, L) fp32 x 2
        assert mode.small_bytes >= bwd.n_seg * B * D * N * 4
        for launch, row, _ in mode.fold.launches:
            from ssmkit.ops.reduce_partials import PARAMS as RP

            r = _unpack(RP, row)
            assert r[f"start{r['n_jobs']}"] == sum(r[f"outer{j}"] * r[f"inner{j}"] for j in range(r["n_jobs"]))
    with pytest.raises(ValueError, match="outside the limits"):
        big = {k: v for k, v in a.items()}
        big.update(u=FakeArray((1 << 20, 1 << 14, 8), "bfloat16"), delta=FakeArray((1 << 20, 1 << 14, 8), "bfloat16"),
                   A=FakeArray((1 << 14, 16), "float32"), B=FakeArray((1 << 20, 1, 16, 8), "bfloat16"),
                   C=FakeArray((1 << 20, 1, 16, 8), "bfloat16"), D=None, delta_bias=None, initial_state=None)
        s2 = scan_op.validate(*(big[k] for k in scan_op._NAMES[:8]), True, None)
        scan_op._FwdPlan(s2, big, None, False, False)                # 2^20 * 2^11 blocks = 2^31


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_conv_plans_at_huge_shapes(monkeypatch, layout):
    """causal_conv1d forward and backward plans for B*D*L = 4.4e12 (B = 4096, D = 65544,
    L = 2^14; the channel-first grid is then 1.07e9 blocks), both layouts: grid = the launch
    table's product, 64-bit strides, the dweight workspace (P, D, W+1); and the grid-limit error
    for a problem past 2^31 - 1 blocks."""
    _fake_kernels(monkeypatch)
    B, D, L, W = 4096, 65544, 1 << 14, 4

    def x_of(b, d, l):
        return FakeArray((b, d, l), "bfloat16", strides=(l * d, 1, d) if layout == "cl" else None)

    x, wgt, bias = x_of(B, D, L), FakeArray((D, W), "float32"), FakeArray((D,), "float32")
    spec = conv_op.validate(x, wgt, bias, "silu", None, None)
    fwd = conv_op._FwdPlan(spec, x, wgt, bias, None, None, None, True)
    if layout == "cf":
        segs = -(-L // (32 * 16))
        blocks = B * -(-D // 4) * -(-segs // 2)
    else:
        blocks = B * -(-L // (4 * 16)) * -(-D // (32 * 4))
    assert fwd.grid == (blocks, 1, 1) and blocks < 2**31
    v = dict(zip(conv_op.PARAMS_FWD.names, fwd.vals))
    conv_op._PACK_FWD.pack(fwd.vals)                                  # every field fits its C type
    assert (v["x_b"], v["x_d"], v["x_l"]) == ((L * D, 1, D) if layout == "cl" else (D * L, L, 1))
    assert v["out_b"] == D * L and v["out_b"] * (B - 1) > 2**40           # the last row's offset
    bwd = conv_op._BwdPlan(spec, x, wgt, bias, x_of(B, D, L), None, None, None)
    conv_op._PACK_BWD.pack(bwd.vals)
    conv_op._PACK_REDUCE.pack(bwd.rvals)
    per_row = (L // 1024) if layout == "cf" else (L // 256)
    assert bwd.P == B * per_row and bwd.grid[0] < 2**31
    assert bwd.reduce_grid == (-(-D * (W + 1) // 256), 1, 1)
    huge = x_of(1 << 22, D, L)                                        # 2^22 * 16386 * 16 blocks (cf)
    spec2 = conv_op.validate(huge, wgt, bias, "silu", None, None)
    with pytest.raises(ValueError, match="grid limit"):
        conv_op._FwdPlan(spec2, huge, wgt, bias, None, None, None, False)


def test_conv_update_plan_at_huge_shapes(monkeypatch):
    _fake_kernels(monkeypatch)
    B, D, S, W = 1 << 16, 1 << 17, 8, 4               # a state pool of 2^36 elements
    x, st = FakeArray((B, D), "bfloat16"), FakeArray((B, D, S), "bfloat16")
    wgt = FakeArray((D, W), "bfloat16")
    idx = FakeArray((B,), "int32")
    plan = conv_op._UpdatePlan(x, st, wgt, None, "silu", None, idx, None)
    assert plan.grid == (B * (D // 128), 1, 1)
    v = dict(zip(conv_op.PARAMS_UPDATE.names, plan.vals))
    conv_op._PACK_UPDATE.pack(plan.vals)
    assert (v["st_b"], v["st_d"], v["st_s"]) == (D * S, S, 1) and v["st_b"] * (B - 1) > 2**31


# ==================================================================== GPU: selective scan

def _bytes_scan(case: ScanCase) -> int:
    """Peak bytes: bf16 u, delta, dout, out, du, ddelta; saved states (fp32); variable B/C with
    their fp32 atomic sums and results; ~3 GiB for comparison chunks and fragments."""
    t = case.tiling
    e = case.elems
    saved = t.B * t.D * -(-t.L // 256) * case.N * 4
    bc = 0 if case.bc == "const" else t.B * case.G * case.N * t.L * (2 + 2 + 4 + 4 + 2 + 2)
    return 6 * 2 * e + saved + bc + 3 * GiB


def _dev_scan_inputs(case: ScanCase, p: dict) -> dict:
    t = case.tiling
    rep_act = (t.B // t.Bp, t.D // t.Dp, t.n)
    d = {k: _tile_dev(p[k], rep_act) for k in ("u", "delta", "dout") + (("z",) if case.z_forward else ())}
    d["A"] = _tile_dev(p["A"], (t.D // t.Dp, 1))
    for k in ("D", "delta_bias"):
        d[k] = _tile_dev(p[k], (t.D // t.Dp,))
    for k in ("B", "C"):
        d[k] = (_tile_dev(p[k], (t.B // t.Bp, 1, 1, t.n)) if case.bc == "var"
                else _tile_dev(p[k], (t.D // t.Dp, 1)))
    for k in ("initial_state", "dlast_state"):
        d[k] = _tile_dev(p[k], (t.B // t.Bp, t.D // t.Dp, 1)) if case.init else None
    return d


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCAN_CASES))
def test_gpu_selective_scan_large(name, gpu_memory):
    """Forward (out poisoned) and backward (pool poisoned) of a tiled problem past 2^31
    elements: every element of every output against the float64 reference (module docstring)."""
    import cupy

    case = SCAN_CASES[name]
    t = case.tiling
    _require_free(_bytes_scan(case))
    p = scan_small(case, seed=zlib.crc32(name.encode()) % 1000)
    d = _dev_scan_inputs(case, p)
    args = [d[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=d["D"], delta_bias=d["delta_bias"], delta_softplus=True, initial_state=d["initial_state"])
    if case.z_forward:                                   # inference with z first, then z is freed
        (o3, _), _ = scan_reference(case, p, 3, True)
        out = poison((t.B, t.D, t.L), "bfloat16")
        ssmkit.selective_scan(*args, z=d.pop("z"), out=out, **kw)
        sync_check()
        check_tiled("out (with z)", out, o3, (t.b, t.d, t.t), "bfloat16")
        del out
    r3, r4 = scan_reference(case, p, 3, False), scan_reference(case, p, 4, False)
    exp = scan_expectations(case, r3, r4)
    out = poison((t.B, t.D, t.L), "bfloat16")
    _poison_pool()
    out, last, saved = ssmkit.selective_scan_fwd(*args, out=out, **kw)
    sync_check()
    assert saved.states.size > 2**31 or name != "N256"
    check_tiled("out", out, *exp["out"], "bfloat16")
    check_tiled("last_state", last, *exp["last_state"], "float32")
    del out, last
    _poison_pool()
    grads = ssmkit.selective_scan_bwd(d.pop("dout"), *args, saved=saved, dlast_state=d["dlast_state"], **kw)
    sync_check()
    del saved
    for gname, g in zip(GRAD_NAMES, grads):
        if gname not in exp:
            assert g is None, gname
            continue
        dtype, scale = _scan_grad_tolerance(gname, case)
        check_tiled(gname, g, *exp[gname], dtype, grad=True, scale=scale)
    cupy.get_default_memory_pool().free_all_blocks()


# ==================================================================== GPU: causal conv1d

def _bytes_conv(case: ConvCase) -> int:
    return 4 * 2 * case.elems + 3 * GiB          # bf16 x, out, dout, dx + comparison chunks


def _dev_conv_x(case: ConvCase, small: np.ndarray):
    """A (B, D, L) device array tiled from ``small`` (Bp, Dp, w), in the case's layout."""
    t = case.tiling
    if case.layout == "cl":
        storage = np.ascontiguousarray(small.transpose(0, 2, 1))          # (Bp, w, Dp)
        return _tile_dev(storage, (t.B // t.Bp, t.n, t.D // t.Dp)).transpose(0, 2, 1)
    return _tile_dev(small, (t.B // t.Bp, t.D // t.Dp, t.n))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_gpu_causal_conv1d_large(name, gpu_memory):
    import cupy

    case = CONV_CASES[name]
    t = case.tiling
    _require_free(_bytes_conv(case))
    p = conv_small(case, seed=zlib.crc32(name.encode()) % 1000)
    exp = conv_expectations(case, conv_reference(case, p, 3), conv_reference(case, p, 4))
    x = _dev_conv_x(case, p["x"])
    weight = _tile_dev(p["weight"], (t.D // t.Dp, 1))
    bias = _tile_dev(p["bias"], (t.D // t.Dp,)) if case.bias else None
    seq = _tile_dev(p["seq_idx"], (t.B // t.Bp, t.n)) if case.seq else None
    init = _tile_dev(p["initial_states"], (t.B // t.Bp, t.D // t.Dp, 1)) if case.init else None
    act = "silu" if case.silu else None
    out = poison((t.B, t.L, t.D) if case.layout == "cl" else (t.B, t.D, t.L), "bfloat16")
    out = out.transpose(0, 2, 1) if case.layout == "cl" else out
    _poison_pool()
    out, fin = ssmkit.causal_conv1d(x, weight, bias, activation=act, seq_idx=seq, initial_states=init,
                                    return_final_states=True, out=out)
    sync_check()
    check_tiled("out", out, *exp["out"], "bfloat16")
    check_tiled("final_states", fin, *exp["final_states"], "bfloat16")
    del out, fin
    dout = _dev_conv_x(case, p["dout"])
    dfin = _tile_dev(p["dfinal_states"], (t.B // t.Bp, t.D // t.Dp, 1)) if case.dfinal else None
    _poison_pool()
    dx, dweight, dbias, dinit = ssmkit.causal_conv1d_bwd(x, weight, bias, dout, activation=act, seq_idx=seq,
                                                        initial_states=init, dfinal_states=dfin)
    sync_check()
    check_tiled("dx", dx, *exp["dx"], "bfloat16", grad=True)
    check_tiled("dweight", dweight, *exp["dweight"], case.wdtype, grad=True)
    if case.bias:
        check_tiled("dbias", dbias, *exp["dbias"], case.wdtype, grad=True)
    if case.init:
        check_tiled("dinitial_states", dinit, *exp["dinitial_states"], "bfloat16", grad=True)
    cupy.get_default_memory_pool().free_all_blocks()


UPDATE_MODES = {
    # x (B, D), pool rows in reverse order, silu, bias
    "shift_indices": dict(new_len=None, indices=True, seqlens=False, silu=True, bias=True, wdtype="bfloat16"),
    # x (B, D, 2), ring buffer at per-row cache_seqlens, fp32 weight
    "ring_seqlens": dict(new_len=2, indices=False, seqlens=True, silu=False, bias=False, wdtype="float32"),
}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(UPDATE_MODES))
def test_gpu_causal_conv1d_update_large(mode, gpu_memory):
    """The decode update with a state pool of 4096 x 65544 x 8 = 2.1e9 elements (D > 65535):
    every output and every state element (rows tiled with period 4, channels with 24)."""
    import cupy

    m = UPDATE_MODES[mode]
    B, D, S, W, Bp, Dp = 4096, 65544, 8, 4, 4, 24
    ln = m["new_len"]
    _require_free(2 * (B * D * S + 2 * B * D * (ln or 1)) + 3 * GiB)
    rng = np.random.default_rng(11)
    xs = (Bp, Dp) if ln is None else (Bp, Dp, ln)
    x_s = rounded(rng.standard_normal(xs), "bfloat16")
    st_s = rounded(rng.standard_normal((Bp, Dp, S)), "bfloat16")
    w_s = rounded(rng.standard_normal((Dp, W)) * 0.5, m["wdtype"])
    b_s = rounded(rng.standard_normal(Dp), m["wdtype"]) if m["bias"] else None
    idx_s = (Bp - 1 - np.arange(Bp)).astype(np.int32) if m["indices"] else None
    csl_s = rng.integers(0, 3 * S, Bp).astype(np.int32) if m["seqlens"] else None
    act = "silu" if m["silu"] else None
    state_ref = st_s.astype(np.float64)
    out_ref = ref_update(x_s.astype(np.float64), state_ref, w_s.astype(np.float64),
                         None if b_s is None else b_s.astype(np.float64), activation=act, cache_seqlens=csl_s,
                         conv_state_indices=idx_s)
    x = _tile_dev(x_s, (B // Bp, D // Dp) + (() if ln is None else (1,)))
    state = _tile_dev(st_s, (B // Bp, D // Dp, 1))
    assert state.size > 2**31
    weight = _tile_dev(w_s, (D // Dp, 1))
    bias = None if b_s is None else _tile_dev(b_s, (D // Dp,))
    idx = cupy.asarray((B - 1 - np.arange(B)).astype(np.int32)) if m["indices"] else None
    csl = _tile_dev(csl_s, (B // Bp,)) if m["seqlens"] else None
    out = poison(x.shape, "bfloat16")
    ssmkit.causal_conv1d_update(x, state, weight, bias, activation=act, cache_seqlens=csl,
                                conv_state_indices=idx, out=out)
    sync_check()
    row = lambda i: i % Bp                    # noqa: E731  (pool row r holds tile r % Bp)
    chan = lambda i: i % Dp                   # noqa: E731
    same = lambda i: i                        # noqa: E731
    check_tiled("out", out, out_ref, (row, chan) + (() if ln is None else (same,)), "bfloat16")
    check_tiled("conv_state", state, state_ref, (row, chan, same), "bfloat16")

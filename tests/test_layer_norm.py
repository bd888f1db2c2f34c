"""layer_norm (fused residual add + LayerNorm / RMSNorm): the float64 reference against finite
differences and torch; the NumPy path and the torch CPU path (float64 gradcheck) under hypothesis;
validation; launch shapes and parameter packing on a fake device; the torch adapters' upstream
conventions (return values, dtypes, autocast, unsupported features, RMSNorm, custom ops and
torch.compile) (CI, no GPU). On a GPU: forward and backward against the float64 reference in
fp32 / fp16 / bf16 (fp64) with and without residual, bias, prenorm, residual_in_fp32, odd and
large H, many rows, unaligned and strided views, poisoned outputs; the torch adapters."""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ssmkit
from ssmkit._plan import PlanCache
from ssmkit.ops import layer_norm as op
from ssmkit.reference import layer_norm as ref_fwd, layer_norm_bwd as ref_bwd
from ssmkit.reference.layer_norm import layer_norm_stats, residual_dtype

from compare import assert_close
from gpu_examples import shards

F64, F32, F16 = np.float64, np.float32, np.float16


def _problem(shape=(2, 3, 8), seed=0, dtype=F64, wdtype=None, bias=True, residual=False, rdtype=None):
    rng = np.random.default_rng(seed)
    H = shape[-1]
    wdtype = dtype if wdtype is None else wdtype
    p = dict(x=rng.standard_normal(shape).astype(dtype),
             weight=(1 + 0.5 * rng.standard_normal(H)).astype(wdtype),
             bias=rng.standard_normal(H).astype(wdtype) if bias else None,
             residual=rng.standard_normal(shape).astype(dtype if rdtype is None else rdtype) if residual else None)
    return p


# ============================================================================ CPU: reference

EPS_FD = 3e-4


def _fd(loss, x, v):
    """Richardson-extrapolated central difference of ``loss`` at x along v."""
    def central(e):
        return (loss(x + e * v) - loss(x - e * v)) / (2 * e)
    return (4 * central(EPS_FD / 2) - central(EPS_FD)) / 3


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
def test_reference_grad_fd(rms, bias, residual, prenorm):
    p = _problem((3, 2, 7), seed=int(rms) + 2 * bias + 4 * residual + 8 * prenorm, bias=bias, residual=residual)
    rng = np.random.default_rng(1)
    gy = rng.standard_normal(p["x"].shape)
    gr = rng.standard_normal(p["x"].shape) if prenorm else None

    def loss_of(name):
        def loss(value):
            q = dict(p, **{name: value})
            res = ref_fwd(**q, eps=1e-5, prenorm=prenorm, is_rms_norm=rms)
            y, r = res if prenorm else (res, None)
            return float(np.sum(y * gy) + (np.sum(r * gr) if prenorm else 0.0))
        return loss

    dx, dw, db, dres = ref_bwd(gy, **p, eps=1e-5, dresidual_out=gr, is_rms_norm=rms)
    grads = dict(x=dx, weight=dw, bias=db, residual=dres)
    for name, g in grads.items():
        if p[name] is None:
            assert g is None, name
            continue
        assert g.shape == p[name].shape and g.dtype == p[name].dtype, name
        for _ in range(2):
            v = rng.standard_normal(p[name].shape)
            analytic = float(np.sum(g * v))
            fd = _fd(loss_of(name), p[name], v)
            assert abs(analytic - fd) <= 1e-6 * max(abs(fd), 1e-3 * np.linalg.norm(g) * np.linalg.norm(v)) + 1e-11, \
                (name, analytic, fd)


def test_reference_matches_torch():
    torch = pytest.importorskip("torch")
    p = _problem((4, 5, 33), residual=True)
    s = torch.tensor(p["x"] + p["residual"])
    w, b = torch.tensor(p["weight"]), torch.tensor(p["bias"])
    want = torch.nn.functional.layer_norm(s, (33,), w, b, eps=1e-5).numpy()
    np.testing.assert_allclose(ref_fwd(**p, eps=1e-5), want, rtol=1e-12, atol=1e-12)
    want_rms = (s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5) * w + b).numpy()
    np.testing.assert_allclose(ref_fwd(**p, eps=1e-5, is_rms_norm=True), want_rms, rtol=1e-12, atol=1e-12)


def test_reference_residual_out_dtypes():
    x16 = np.ones((2, 4), F16)
    assert ref_fwd(x16, np.ones(4, F32), prenorm=True)[1] is x16                      # nothing new
    assert ref_fwd(x16, np.ones(4, F32), prenorm=True, residual_in_fp32=True)[1].dtype == F32
    assert ref_fwd(x16, np.ones(4, F32), residual=np.ones((2, 4), F16), prenorm=True,
                   residual_in_fp32=True)[1].dtype == F16                             # the residual's wins
    x32 = np.ones((2, 4), F32)
    assert ref_fwd(x32, np.ones(4, F32), prenorm=True, residual_in_fp32=True)[1] is x32
    assert residual_dtype(F64, None, True) == F64
    r = ref_fwd(x16, np.ones(4, F32), residual=np.full((2, 4), 2.0, F32), prenorm=True)[1]
    assert r.dtype == F32 and np.all(r == 3)


def test_reference_bwd_with_saved_stats():
    p = _problem((3, 9), residual=True)
    gy = np.random.default_rng(2).standard_normal((3, 9))
    for rms in (False, True):
        mean, rstd = layer_norm_stats(p["x"] + p["residual"], 1e-5, rms)
        a = ref_bwd(gy, **p, eps=1e-5, is_rms_norm=rms)
        b = ref_bwd(gy, **p, eps=123.0, is_rms_norm=rms, mean=mean, rstd=rstd)   # eps unused
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13)


# ============================================================================ CPU: NumPy path

@st.composite
def ln_problems(draw, max_h=40):
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    H = draw(st.integers(1, max_h))
    dtype = draw(st.sampled_from([F32, F64]))
    residual = draw(st.booleans())
    p = _problem(lead + (H,), seed=draw(st.integers(0, 2**16)), dtype=dtype, bias=draw(st.booleans()),
                 residual=residual)
    flags = dict(eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])), is_rms_norm=draw(st.booleans()),
                 residual_in_fp32=draw(st.booleans()))
    return p, flags


@settings(max_examples=60, deadline=None)
@given(ln_problems(), st.booleans(), st.booleans())
def test_numpy_path_is_reference(case, prenorm, use_out):
    p, flags = case
    out = np.full(p["x"].shape, np.nan, p["x"].dtype) if use_out else None
    got = ssmkit.layer_norm(**p, **flags, prenorm=prenorm, out=out)
    want = ref_fwd(**p, **flags, prenorm=prenorm)
    if prenorm:
        np.testing.assert_array_equal(got[1], want[1])
        assert got[1].dtype == want[1].dtype
        if p["residual"] is None and got[1].dtype == p["x"].dtype:
            assert got[1] is p["x"]
        got, want = got[0], want[0]
    if use_out:
        assert got is out
    np.testing.assert_array_equal(got, want)
    # training forward + backward against the reference gradients
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(**p, **flags)
    np.testing.assert_array_equal(y, want)
    acc = p["x"].dtype if p["x"].dtype == F64 else F32
    assert rstd.dtype == acc and rstd.shape == p["x"].shape[:-1]
    assert (mean is None) == flags["is_rms_norm"]
    rng = np.random.default_rng(3)
    gy = rng.standard_normal(p["x"].shape).astype(p["x"].dtype)
    gr = rng.standard_normal(p["x"].shape).astype(rout.dtype)
    dx, dw, db, dres = ssmkit.layer_norm_bwd(gy, rout, p["weight"], p["bias"], mean, rstd, gr,
                                             has_residual=p["residual"] is not None,
                                             is_rms_norm=flags["is_rms_norm"])
    w = ref_bwd(gy, **p, eps=flags["eps"], dresidual_out=gr, is_rms_norm=flags["is_rms_norm"])
    tol = dict(rtol=1e-10, atol=1e-10) if p["x"].dtype == F64 else dict(rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(dx, w[0], **tol)
    np.testing.assert_allclose(dw, w[1], **tol)
    if p["bias"] is not None:
        np.testing.assert_allclose(db, w[2], **tol)
    if p["residual"] is not None:
        np.testing.assert_allclose(dres, w[3], **tol)
        assert dres is dx                          # same dtype: one array, as upstream
    else:
        assert dres is None


# ============================================================================ CPU: validation

def _args(**over):
    p = _problem((2, 3, 8), dtype=F32)
    p["residual"] = None
    p.update(over)
    return p


FWD_ERRORS = [
    (dict(x=np.zeros((), F32)), ValueError, r"argument 'x' must be \(\.\.\., H\)"),
    (dict(x=np.zeros((2, 0), F32)), ValueError, r"'x' must have H = shape\[-1\] >= 1"),
    (dict(x=np.zeros((2, 8), np.int32)), TypeError, r"argument 'x' must have dtype in"),
    (dict(x=np.zeros((2, 16385), F32), weight=np.zeros(16385, F32), bias=None), ValueError,
     r"H = 16385, more than the largest supported 16384 for float32"),
    (dict(weight=np.zeros(7, F32)), ValueError, r"argument 'weight' must have shape \(8,\) = \(H\), got \(7,\)"),
    (dict(weight=np.zeros((1, 8), F32)), ValueError, r"argument 'weight' must be \(H,\)"),
    (dict(weight=np.zeros(8, F16)), TypeError, r"argument 'weight' must have dtype in \('float32',\), got float16"),
    (dict(bias=np.zeros(8, F64)), TypeError, r"argument 'bias' must have dtype in \('float32',\), got float64"),
    (dict(bias=np.zeros(9, F32)), ValueError, r"argument 'bias' must have shape \(8,\)"),
    (dict(residual=np.zeros((2, 3, 7), F32)), ValueError, r"argument 'residual' must have shape \(2, 3, 8\)"),
    (dict(residual=np.zeros((2, 3, 8), F16)), TypeError, r"argument 'residual' must have dtype in \('float32',\)"),
    (dict(eps=-1.0), ValueError, r"argument 'eps' must be a finite number >= 0, got -1.0"),
    (dict(eps=float("nan")), ValueError, r"argument 'eps' must be a finite number"),
    (dict(eps="1e-5"), ValueError, r"argument 'eps' must be a finite number"),
    (dict(prenorm=1), TypeError, r"argument 'prenorm' must be a bool, got int"),
    (dict(is_rms_norm=None), TypeError, r"argument 'is_rms_norm' must be a bool"),
    (dict(residual_in_fp32="yes"), TypeError, r"argument 'residual_in_fp32' must be a bool"),
    (dict(out=np.zeros((2, 3, 8), F64)), TypeError, r"argument 'out' must have dtype in \('float32',\)"),
    (dict(out=np.zeros((2, 8), F32)), ValueError, r"argument 'out' must have shape \(2, 3, 8\)"),
]


@pytest.mark.parametrize("over, exc, match", FWD_ERRORS)
def test_fwd_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        ssmkit.layer_norm(**_args(**over))


def test_dtype_rules_accepted():
    rng = np.random.default_rng(0)
    x16 = rng.standard_normal((3, 8)).astype(F16)
    for wd in (F16, F32):
        for rd in (F16, F32):
            y, r = ssmkit.layer_norm(x16, np.ones(8, wd), np.zeros(8, wd), residual=np.ones((3, 8), rd),
                                     prenorm=True)
            assert y.dtype == F16 and r.dtype == rd
    assert ssmkit.layer_norm(x16, np.ones(8, F32), prenorm=True, residual_in_fp32=True)[1].dtype == F32
    # the largest rows: 64 KB of x, as upstream
    assert op.max_hidden("bfloat16") == 32768 and op.max_hidden("float32") == 16384 and op.max_hidden("float64") == 8192


def _bwd_args(**over):
    p = _problem((2, 3, 8), dtype=F32, residual=True)
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(**p)
    a = dict(dout=np.ones((2, 3, 8), F32), x=rout, weight=p["weight"], bias=p["bias"], mean=mean, rstd=rstd,
             dresidual_out=None, has_residual=True, is_rms_norm=False)
    a.update(over)
    return a


BWD_ERRORS = [
    (dict(dout=np.zeros((2, 3, 7), F32)), ValueError, r"layer_norm_bwd: argument 'x' must have shape \(2, 3, 7\)"),
    (dict(x=np.zeros((2, 3, 8), F16)), TypeError, r"argument 'x' must have dtype in \('float32',\)"),
    (dict(rstd=np.zeros((6,), F32)), ValueError, r"argument 'rstd' must have shape \(2, 3\)"),
    (dict(rstd=np.zeros((2, 3), F64)), TypeError, r"argument 'rstd' must have dtype in \('float32',\)"),
    (dict(mean=None), ValueError, r"argument 'mean' is required"),
    (dict(dresidual_out=np.zeros((2, 3, 8), F64)), TypeError, r"argument 'dresidual_out' must have dtype"),
    (dict(weight=np.zeros(8, F64)), TypeError, r"argument 'weight' must have dtype"),
    (dict(has_residual=1), TypeError, r"argument 'has_residual' must be a bool"),
]


@pytest.mark.parametrize("over, exc, match", BWD_ERRORS)
def test_bwd_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        ssmkit.layer_norm_bwd(**_bwd_args(**over))


def test_bwd_rms_needs_no_mean():
    a = _bwd_args(mean=None, is_rms_norm=True)
    dx = ssmkit.layer_norm_bwd(**a)[0]
    assert dx.shape == (2, 3, 8) and np.all(np.isfinite(dx))


# ============================================================================ CPU: launch shapes, layouts, kernels

def test_launch_shape():
    assert op.launch_shape("bfloat16", 2048) == (1, 256)        # 8 bf16 per 16-byte chunk
    assert op.launch_shape("float32", 2048) == (1, 512)
    assert op.launch_shape("bfloat16", 8192) == (1, 1024)
    assert op.launch_shape("bfloat16", 8193) == (2, 544)        # 1025 chunks over 2 -> 513 -> 17 warps
    assert op.launch_shape("bfloat16", 32768) == (4, 1024)
    assert op.launch_shape("float32", 16384) == (4, 1024)
    assert op.launch_shape("float64", 8192) == (4, 1024)
    assert op.launch_shape("float16", 1) == (1, 32)
    assert op.launch_shape("float32", 2560) == (1, 640)
    assert op.launch_shape("bfloat16", 2048, min_iters=2) == (2, 128)
    assert op.launch_shape("bfloat16", 2048, min_iters=4) == (4, 64)
    with pytest.raises(ValueError, match="H = 32769 exceeds"):
        op.launch_shape("bfloat16", 32769)


def test_kernel_refs_and_variants():
    assert op.kernel_ref("fwd", "bfloat16", "float32", "float32", True, 1).name == \
        "ssm::layer_norm_fwd<ssm::bf16, float, float, 1, 1>"
    assert op.kernel_ref("bwd", "float16", "float16", "float32", False, 4).name == \
        "ssm::layer_norm_bwd<ssm::f16, ssm::f16, float, 0, 4>"
    assert op.kernel_ref("reduce", "bfloat16").name == "ssm::layer_norm_bwd_reduce<ssm::bf16>"
    refs = op.variants()
    # (fp16, bf16: 2 weight x 2 residual dtypes; fp32, fp64: 1 x 1) x 2 norms x 3 kIters, fwd + bwd; 4 reduces
    assert len(refs) == len(set(refs)) == 2 * (4 + 4 + 1 + 1) * 2 * 3 + 4
    assert {r.file for r in refs} == {"layer_norm.cu"}
    assert len(op.variants(dtype="float32", kind="fwd")) == 6
    from ssmkit._registry import ops

    assert "layer_norm" in ops()


def test_row_stride():
    a = np.zeros((4, 5, 6), F32)
    assert op.row_stride(a) == 6
    assert op.row_stride(a[:, :, :3]) == 6                     # rows still 6 apart
    assert op.row_stride(a[:, :3, :]) is None                  # two strides between rows
    assert op.row_stride(a[:, 2, :]) == 30                     # one row per leading index
    assert op.row_stride(a.reshape(20, 6)[::2]) == 12
    assert op.row_stride(a.transpose(1, 0, 2)) is None
    assert op.row_stride(a[:, :, ::2]) is None                 # H not unit stride
    assert op.row_stride(a[:1, :1]) == 6                       # one row
    assert op.row_stride(np.zeros((3, 1), F32)[:, ::1]) == 1
    assert op.row_stride(np.zeros((6,), F32)) == 6


@pytest.mark.nvrtc
def test_params_layout():
    """The C structs have the mirrors' sizes and offsets (a few instantiations compiled with the
    static_asserts; test_nvrtc_compile.py compiles every instantiation)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from ssmkit._nvrtc_offline import compile_file

    names = [op.kernel_ref("fwd", "bfloat16", "float32", "float32", True, 1).name,
             op.kernel_ref("bwd", "float32", "float32", "float32", False, 2).name,
             op.kernel_ref("reduce", "float16").name]
    res = compile_file(op.KERNEL_FILE, names, 90, extra_source="\n".join(p.layout_asserts() for p in op.ALL_PARAMS))
    assert res.cubin_bytes > 0 and len(res.lowered) == 3


# ---- host path on a fake device: CuPy arrays over made-up addresses, a kernel stub -----------

@pytest.fixture
def fake_device(monkeypatch):
    cupy = pytest.importorskip("cupy")
    import ssmkit._launch as launch_mod

    launches = []

    class Stub:
        def __init__(self, ref):
            self.name = ref.name

        def __call__(self, grid, block, args, **kw):
            (prm,) = args
            launches.append((self.name, grid, block, np.asarray(prm).tobytes()))

    next_addr = [1 << 32]

    def make(shape, dtype, offset_bytes=0, strides=None):
        n = max(1, int(np.prod(shape))) * np.dtype(dtype).itemsize * 2 + 64
        mem = cupy.cuda.memory.UnownedMemory(next_addr[0], n, None, device_id=0)
        next_addr[0] += (n + 4095) // 4096 * 4096
        return cupy.ndarray(shape, dtype, memptr=cupy.cuda.memory.MemoryPointer(mem, offset_bytes),
                            strides=strides)

    copies = []

    def contiguous(a):
        copies.append(a)
        return make(a.shape, a.dtype)

    monkeypatch.setattr(launch_mod, "get_kernel", Stub)
    monkeypatch.setattr(op, "get_kernel", Stub)
    monkeypatch.setattr(op, "_device", lambda: 0)
    monkeypatch.setattr(op, "_alloc", lambda shape, dtype: make(tuple(shape), dtype))
    monkeypatch.setattr(op, "_contiguous", contiguous)
    monkeypatch.setattr(op, "_SM_COUNT", {0: 132})
    monkeypatch.setattr(op, "_FWD_PLANS", PlanCache())
    monkeypatch.setattr(op, "_BWD_PLANS", PlanCache())
    return make, launches, copies


def _prm(params, blob):
    return np.frombuffer(blob, dtype=params.dtype)[0]


def test_host_fwd(fake_device):
    make, launches, copies = fake_device
    M, H = 40, 2048
    x, w = make((4, 10, H), F16), make((H,), F32)
    b, res = make((H,), F32), make((4, 10, H), F32)
    y, rout = ssmkit.layer_norm(x, w, b, residual=res, eps=1e-5, prenorm=True, is_rms_norm=True)
    (name, grid, block, blob), = launches
    assert name == "ssm::layer_norm_fwd<ssm::f16, float, float, 1, 1>"
    prm = _prm(op.PARAMS_FWD, blob)
    for f, a in (("x", x), ("weight", w), ("bias", b), ("residual", res), ("y", y), ("residual_out", rout)):
        assert int(prm[f]) == a.data.ptr, f
    assert int(prm["mean"]) == 0 and int(prm["rstd"]) == 0       # inference keeps no statistics
    assert (prm["rows"], prm["hidden"], prm["group"]) == (M, H, 256)
    assert (prm["x_row"], prm["res_row"], prm["y_row"], prm["rout_row"]) == (H, H, H, H)
    assert all(prm[f] == 1 for f in ("vec_x", "vec_res", "vec_y", "vec_rout", "vec_w"))
    assert prm["eps"] == 1e-5
    assert grid == (M, 1, 1) and block == (256, 1, 1)
    assert y.dtype == F16 and rout.dtype == F32 and y.shape == rout.shape == (4, 10, H)
    # same layout, new buffers: one plan, new pointers; no residual_out without prenorm
    x2 = make((4, 10, H), F16)
    y2 = ssmkit.layer_norm(x2, w, b, residual=res, eps=1e-5, prenorm=True, is_rms_norm=True)[0]
    assert len(op._FWD_PLANS) == 1 and int(_prm(op.PARAMS_FWD, launches[-1][3])["x"]) == x2.data.ptr
    assert int(_prm(op.PARAMS_FWD, launches[-1][3])["y"]) == y2.data.ptr
    ssmkit.layer_norm(x2, w, b, residual=res, eps=1e-5, is_rms_norm=True)
    assert int(_prm(op.PARAMS_FWD, launches[-1][3])["residual_out"]) == 0
    assert not copies


def test_host_fwd_training_small_h_and_unaligned(fake_device):
    make, launches, copies = fake_device
    H = 100                                       # 13 chunks of 8: one warp per row, 8 rows per block
    x = make((37, H), F16)
    w = make((H,), F16)
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w, residual_in_fp32=True)
    name, grid, block, blob = launches[-1]
    prm = _prm(op.PARAMS_FWD, blob)
    assert name == "ssm::layer_norm_fwd<ssm::f16, ssm::f16, float, 0, 1>"
    assert prm["group"] == 32 and block == (256, 1, 1) and grid == (-(-37 // 8), 1, 1)
    assert int(prm["mean"]) == mean.data.ptr and int(prm["rstd"]) == rstd.data.ptr
    assert mean.dtype == F32 and mean.shape == (37,) and rout.dtype == F32
    assert prm["vec_x"] == 0 and prm["vec_y"] == 0           # 200-byte rows: not 16-byte aligned
    assert prm["vec_rout"] == 1 and prm["vec_w"] == 1         # 400-byte fp32 rows are
    # no residual, no fp32: residual_out is x itself, nothing stored
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w)
    assert rout is x and int(_prm(op.PARAMS_FWD, launches[-1][3])["residual_out"]) == 0
    # an unaligned base address: scalar accesses for x only
    xo = make((37, 128), F16, offset_bytes=2)
    ssmkit.layer_norm(xo, make((128,), F16))
    prm = _prm(op.PARAMS_FWD, launches[-1][3])
    assert prm["vec_x"] == 0 and prm["vec_y"] == 1 and prm["x_row"] == 128
    assert not copies


def test_host_fwd_views_and_copies(fake_device):
    make, launches, copies = fake_device
    H = 64
    base = make((6, 2 * H), F32)
    x = base[:, :H]                               # rows 2H apart: a view, no copy
    w = make((H,), F32)
    ssmkit.layer_norm(x, w)
    prm = _prm(op.PARAMS_FWD, launches[-1][3])
    assert prm["x_row"] == 2 * H and prm["vec_x"] == 1 and int(prm["x"]) == x.data.ptr and not copies
    xt = make((3, 4, H), F32).transpose(1, 0, 2)   # leading dims not one stride: copied per call
    ssmkit.layer_norm(xt, w)
    prm = _prm(op.PARAMS_FWD, launches[-1][3])
    assert len(copies) == 1 and copies[0] is xt and int(prm["x"]) != xt.data.ptr and prm["x_row"] == H
    ws = make((2 * H,), F32)[::2]                 # strided weight: copied
    ssmkit.layer_norm(make((2, H), F32), ws)
    assert copies[-1] is ws
    out = make((6, 2 * H), F32)[:, H:]
    got = ssmkit.layer_norm(x, w, out=out)
    prm = _prm(op.PARAMS_FWD, launches[-1][3])
    assert got is out and prm["y_row"] == 2 * H and int(prm["y"]) == out.data.ptr
    with pytest.raises(ValueError, match="argument 'out' must be a"):
        ssmkit.layer_norm(make((6, H), F32), w, out=make((H, 6), F32).T)


def test_host_bwd(fake_device):
    make, launches, _ = fake_device
    M, H = 1000, 2048
    dy, xs = make((M, H), F16), make((M, H), F32)
    w, b = make((H,), F32), make((H,), F32)
    mean, rstd = make((M,), F32), make((M,), F32)
    drout = make((M, H), F32)
    dx, dw, db, dres = ssmkit.layer_norm_bwd(dy, xs, w, b, mean, rstd, drout, has_residual=True)
    (n1, g1, b1, blob1), (n2, g2, b2, blob2) = launches
    assert n1 == "ssm::layer_norm_bwd<ssm::f16, float, float, 0, 1>"
    assert n2 == "ssm::layer_norm_bwd_reduce<float>"
    prm = _prm(op.PARAMS_BWD, blob1)
    for f, a in (("x", xs), ("weight", w), ("dy", dy), ("dres_out", drout), ("mean", mean), ("rstd", rstd),
                 ("dx", dx), ("dres", dres)):
        assert int(prm[f]) == a.data.ptr, f
    assert prm["group"] == 256 and b1 == (op.BWD_BLOCK, 1, 1)
    blocks = min(-(-M // (op.BWD_BLOCK // 256)), 132 * (2048 // op.BWD_BLOCK))   # the stub's occupancy fallback
    assert g1 == (blocks, 1, 1) and prm["part_row"] == H
    rp = _prm(op.PARAMS_REDUCE, blob2)
    assert rp["parts"] == blocks and rp["hidden"] == H and int(rp["dweight"]) == dw.data.ptr
    assert int(rp["dbias"]) == db.data.ptr and int(rp["dw_part"]) == int(prm["dw_part"])
    assert int(rp["db_part"]) == int(prm["db_part"]) == int(prm["dw_part"]) + blocks * H * 4
    assert g2 == (H // 32, 2, 1) and b2 == (32 * op.REDUCE_ROWS, 1, 1)
    assert dx.dtype == F16 and dres.dtype == F32 and dw.dtype == db.dtype == F32
    # a residual in x's dtype: dresidual is dx itself, not written separately; no bias: one job
    dy2, xs2 = make((M, H), F16), make((M, H), F16)
    w2 = make((H,), F16)
    dx2, dw2, db2, dres2 = ssmkit.layer_norm_bwd(dy2, xs2, w2, None, None, rstd, None, has_residual=True,
                                                 is_rms_norm=True)
    prm = _prm(op.PARAMS_BWD, launches[-2][3])
    assert launches[-2][0] == "ssm::layer_norm_bwd<ssm::f16, ssm::f16, ssm::f16, 1, 1>"
    assert dres2 is dx2 and int(prm["dres"]) == 0 and int(prm["db_part"]) == 0 and int(prm["mean"]) == 0
    assert db2 is None and launches[-1][1] == (H // 32, 1, 1) and launches[-1][0] == "ssm::layer_norm_bwd_reduce<ssm::f16>"


def test_host_bwd_odd_h_partial_rows_padded(fake_device):
    make, launches, _ = fake_device
    M, H = 3, 13
    dy = make((M, H), F32)
    ssmkit.layer_norm_bwd(dy, make((M, H), F32), make((H,), F32), None, make((M,), F32), make((M,), F32))
    prm = _prm(op.PARAMS_BWD, launches[0][3])
    assert prm["part_row"] == 16 and prm["vec_dy"] == 0 and prm["vec_dx"] == 0 and prm["vec_w"] == 1
    assert launches[0][1] == (1, 1, 1) and launches[0][2] == (op.BWD_BLOCK, 1, 1)   # 16 rows/block, 3 rows


# ============================================================================ torch (CPU)

torch = pytest.importorskip("torch")
import ssmkit.torch as sttorch  # noqa: E402
from ssmkit.torch import layer_norm as tmod  # noqa: E402

CUDA = torch.cuda.is_available()


def _t(a, grad=False, dtype=None, device="cpu"):
    if a is None:
        return None
    t = torch.tensor(a, dtype=dtype or torch.float64, device=device)
    return t.requires_grad_(grad)


UPSTREAM = {
    "layer_norm_fn": "(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-06, dropout_p=0.0, "
                     "rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False, "
                     "return_dropout_mask=False)",
    "rms_norm_fn": "(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-06, dropout_p=0.0, "
                   "rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False)",
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_signature_matches_upstream(name):
    assert str(inspect.signature(getattr(sttorch, name))) == UPSTREAM[name]
    assert str(inspect.signature(sttorch.RMSNorm.__init__)) == \
        "(self, hidden_size, eps=1e-05, dropout_p=0.0, device=None, dtype=None)"
    assert str(inspect.signature(sttorch.RMSNorm.forward)) == "(self, x, residual=None, prenorm=False, residual_in_fp32=False)"


@st.composite
def torch_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    H = draw(st.integers(1, 12))
    return (lead + (H,), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
            draw(st.integers(0, 2**16)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(torch_cases())
def test_torch_gradcheck_cpu(case):
    shape, rms, bias, residual, prenorm, seed = case
    p = _problem(shape, seed=seed, bias=bias, residual=residual)
    args = [_t(p["x"], True), _t(p["weight"], True), _t(p["bias"], True), _t(p["residual"], True)]

    def f(x, w, b, r):
        return sttorch.layer_norm_fn(x, w, b, residual=r, eps=1e-5, prenorm=prenorm, is_rms_norm=rms)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-6)
    res = f(*args)
    y, r = res if prenorm else (res, None)
    want = ref_fwd(**p, eps=1e-5, prenorm=prenorm, is_rms_norm=rms)
    want_y = want[0] if prenorm else want
    np.testing.assert_allclose(y.detach().numpy(), want_y, rtol=1e-12, atol=1e-12)
    if prenorm and residual:
        np.testing.assert_allclose(r.detach().numpy(), want[1], rtol=0, atol=0)
    elif prenorm:
        assert r is args[0]                        # residual_out is x itself


def test_torch_dtypes_and_returns_cpu():
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    w = torch.randn(16)
    y = sttorch.layer_norm_fn(x, w, None)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == x.shape
    y, r = sttorch.rms_norm_fn(x, w, None, prenorm=True)
    assert r is x
    y, r = sttorch.rms_norm_fn(x, w, None, prenorm=True, residual_in_fp32=True)
    assert r.dtype == torch.float32 and torch.equal(r, x.float())
    res16 = torch.randn(2, 3, 16).to(torch.bfloat16)
    y, r = sttorch.rms_norm_fn(x, w, None, residual=res16, prenorm=True, residual_in_fp32=True)
    assert r.dtype == torch.bfloat16                 # the residual's dtype wins
    res32 = torch.randn(2, 3, 16)
    y, r = sttorch.layer_norm_fn(x, w, torch.zeros(16), residual=res32, prenorm=True)
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    torch.testing.assert_close(r, x.float() + res32)
    # bf16 on the CPU: values as the float64 reference on the rounded inputs
    want = ref_fwd(x.double().numpy(), w.double().numpy(), np.zeros(16), residual=res32.double().numpy())
    assert_close("y", y.float().numpy(), want, "bfloat16")


def test_torch_grad_dtypes_cpu():
    x = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    res = torch.randn(4, 16).requires_grad_()
    w = torch.randn(16).requires_grad_()
    b = torch.randn(16).requires_grad_()
    y, r = sttorch.layer_norm_fn(x, w, b, residual=res, prenorm=True)
    (y.float().square().sum() + r.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and res.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), res.grad, atol=1e-2, rtol=1e-2)   # dresidual = dx
    # fp16 weights with bf16 x are cast to fp32 (as upstream reads them); the grads come back in fp16
    w16 = torch.randn(16).half().requires_grad_()
    y = sttorch.rms_norm_fn(x.detach(), w16, None)
    y.float().sum().backward()
    assert w16.grad.dtype == torch.float16 and y.dtype == torch.bfloat16


def test_torch_unsupported_features():
    x, w = torch.randn(2, 8), torch.randn(8)
    for kw, name in ((dict(dropout_p=0.1), "dropout_p > 0"), (dict(x1=x), "x1"), (dict(weight1=w), "weight1"),
                     (dict(bias1=w), "bias1"), (dict(rowscale=torch.ones(2)), "rowscale"),
                     (dict(return_dropout_mask=True), "return_dropout_mask")):
        with pytest.raises(NotImplementedError, match=name):
            sttorch.layer_norm_fn(x, w, None, **kw)
    with pytest.raises(NotImplementedError, match="x1, rowscale"):
        sttorch.rms_norm_fn(x, w, None, x1=x, rowscale=torch.ones(2))


def test_torch_errors_name_arguments():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="'residual' must have shape"):
        sttorch.layer_norm_fn(x, w, None, residual=torch.randn(2, 7))
    with pytest.raises(TypeError, match="'residual' must have dtype"):
        sttorch.layer_norm_fn(x, w, None, residual=torch.randn(2, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="'weight'"):
        sttorch.layer_norm_fn(x, torch.randn(7), None)
    with pytest.raises(ValueError, match="'weight' is on meta"):
        sttorch.layer_norm_fn(x, w.to("meta"), None)


def test_rms_norm_module_cpu():
    m = sttorch.RMSNorm(16, dtype=torch.float64)
    assert m.eps == 1e-5 and m.bias is None and torch.equal(m.weight, torch.ones(16, dtype=torch.float64))
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    x, r = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    y, res = m(x, residual=r, prenorm=True)
    s = x + r
    torch.testing.assert_close(y, s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(res, s)
    md = sttorch.RMSNorm(16, dropout_p=0.1)
    md.eval()
    assert md(torch.randn(2, 16)).shape == (2, 16)
    md.train()
    with pytest.raises(NotImplementedError, match="dropout_p"):
        md(torch.randn(2, 16))


def test_autocast_keeps_x_dtype_cpu():
    """As upstream (layer_norm_fn is not an autocast op): out has x's dtype under autocast."""
    x, w, r = torch.randn(2, 8), torch.randn(8), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, res = sttorch.layer_norm_fn(x, w, None, residual=r, prenorm=True)
        y2 = torch.compile(lambda a, b: sttorch.rms_norm_fn(a, b, None), fullgraph=True, backend="aot_eager")(x, w)
    assert y.dtype == torch.float32 and res.dtype == torch.float32 and y2.dtype == torch.float32


def _block_like(x, r, w, b, w2):
    """Two prenorm layers in the Mamba block pattern (residual stream in fp32)."""
    h, res = sttorch.layer_norm_fn(x, w, b, residual=None, prenorm=True, residual_in_fp32=True)
    h, res = sttorch.rms_norm_fn(h * 2, w2, None, residual=res, prenorm=True)
    return h.float().square().sum() + res.sum()


def test_compile_fullgraph_cpu():
    args = [torch.randn(3, 5, 12, requires_grad=True), None, torch.randn(12, requires_grad=True),
            torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)]
    compiled = torch.compile(_block_like, fullgraph=True, backend="aot_eager")
    grads = [a for a in args if a is not None]
    r1 = compiled(*args)
    g1 = torch.autograd.grad(r1, grads)
    r0 = _block_like(*args)
    g0 = torch.autograd.grad(r0, grads)
    torch.testing.assert_close(r1, r0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


def test_opcheck_cpu():
    ops = torch.ops.ssmkit
    x16 = torch.randn(2, 3, 8).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    r = torch.randn(2, 3, 8, requires_grad=True)
    cases = [(x, w, b, r, 1e-5, False, False, True, True), (x, w, None, None, 1e-5, True, False, False, True),
             (x16, w.detach(), None, None, 1e-6, True, True, True, False),
             (x16, w.detach(), None, None, 1e-6, False, True, False, True)]
    for args in cases:
        torch.library.opcheck(ops.layer_norm_fwd.default, args)
    y, rout, mean, rstd = ops.layer_norm_fwd(x16, w.detach(), None, None, 1e-6, False, True, False, True)
    torch.library.opcheck(ops.layer_norm_bwd.default, (torch.randn(2, 3, 8).to(torch.bfloat16), rout, w.detach(), None,
                                                       mean, rstd, torch.randn(2, 3, 8), False, False))
    torch.library.opcheck(ops.layer_norm_bwd.default, (torch.randn(2, 3, 8), r.detach(), w.detach(), b.detach(),
                                                       mean, rstd, None, True, False))


def test_gpu_code_path_plumbing_cpu(monkeypatch):
    """The CUDA branch of ln_forward / ln_backward (argument order into the host functions, outputs
    allocated by torch and passed as out=, results turned back into tensors, dresidual = dx) run on
    the CPU: 'cuda:0' is faked and NumPy views stand in for CuPy views."""
    from ssmkit.torch import _bridge

    monkeypatch.setattr(tmod, "device_of", lambda op_, names, ts: 0)
    monkeypatch.setattr(tmod, "gpu_context", lambda idx: contextlib.nullcontext())
    monkeypatch.setattr(tmod, "views", lambda op_, idx, names, ts: [_bridge.np_view(t) for t in ts])
    # out= views share the tensor's memory, as the CuPy views do (np_view copies)
    monkeypatch.setattr(tmod, "view", lambda t, name="?", idx=None: t.detach().numpy())
    monkeypatch.setattr(tmod, "to_torch", lambda a: None if a is None else _bridge.from_numpy(a))
    monkeypatch.setattr(tmod, "_torch_device", lambda idx: torch.device("cpu"))
    p = _problem((2, 3, 6), residual=True)
    args = (_t(p["x"], True), _t(p["weight"], True), _t(p["bias"], True), _t(p["residual"], True))
    for rms in (False, True):
        for prenorm in (False, True):
            f = lambda x, w, b, r: sttorch.layer_norm_fn(x, w, b, residual=r, prenorm=prenorm, is_rms_norm=rms)  # noqa: E731
            assert torch.autograd.gradcheck(f, args)
    y = sttorch.layer_norm_fn(*(a.detach() for a in args[:3]), residual=args[3].detach())
    np.testing.assert_allclose(y.numpy(), ref_fwd(**p), rtol=1e-12, atol=1e-12)
    compiled = torch.compile(lambda x, w, b, r: sttorch.rms_norm_fn(x, w, b, residual=r, prenorm=True),
                             fullgraph=True, backend="aot_eager")
    out, res = compiled(*args)
    g = torch.autograd.grad(out.sum() + res.square().sum(), args)
    out0, res0 = sttorch.rms_norm_fn(*args[:3], residual=args[3], prenorm=True)
    g0 = torch.autograd.grad(out0.sum() + res0.square().sum(), args)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b)


# ============================================================================ GPU

def _gpu():
    pytest.importorskip("cupy")
    from gpu_util import as64, poison, rounded, sync_check, to_device

    return as64, poison, rounded, sync_check, to_device


def _place(a, layout):
    """A device copy of host array ``a`` (..., H) in ``layout``: "c" contiguous, "unaligned" (base
    one element past a 16-byte boundary), "strided" (rows of a wider buffer), "copy" (leading
    dims not one stride: copied per call)."""
    import cupy

    if a is None:
        return None
    if layout == "c":
        return cupy.asarray(a)
    if layout == "unaligned":
        flat = cupy.empty(a.size + 1, a.dtype)
        d = flat[1:].reshape(a.shape)
        d[...] = cupy.asarray(a)
        return d
    if layout == "strided":
        wide = cupy.zeros(a.shape[:-1] + (a.shape[-1] + 8,), a.dtype)
        d = wide[..., 3:3 + a.shape[-1]]
        d[...] = cupy.asarray(a)
        return d
    if layout == "copy":
        assert a.ndim == 3
        t = cupy.empty((a.shape[1], a.shape[0], a.shape[2]), a.dtype)
        d = t.transpose(1, 0, 2)
        d[...] = cupy.asarray(a)
        return d
    raise ValueError(layout)


def _check(shape, dt, wdt, rdt, rms, bias=True, residual=True, rif32=False, layout="c", poison_out=True,
           bwd=True, drout=True, seed=0):
    """Forward (inference and training) and backward of one configuration against the float64
    reference on the same rounded inputs. ``rdt``: the residual's dtype (``residual``)."""
    as64, poison, rounded, sync_check, to_device = _gpu()
    rng = np.random.default_rng(seed)
    H = shape[-1]
    xh = rounded(rng.standard_normal(shape) * 2 + 0.5, dt)
    wh = rounded(1 + 0.5 * rng.standard_normal(H), wdt)
    bh = rounded(rng.standard_normal(H), wdt) if bias else None
    rh = rounded(rng.standard_normal(shape), rdt) if residual else None
    x, r = _place(xh, layout), _place(rh, layout)
    w, b = to_device(wh), to_device(bh)
    eps = 1e-5
    out = poison(shape, dt) if poison_out else None
    got = ssmkit.layer_norm(x, w, b, residual=r, eps=eps, prenorm=True, residual_in_fp32=rif32, is_rms_norm=rms,
                            out=out)
    sync_check()
    x64, r64 = as64(xh), as64(rh)
    want_y, want_r = ref_fwd(x64, as64(wh), as64(bh), residual=r64, eps=eps, prenorm=True, is_rms_norm=rms)
    if poison_out:
        assert got[0] is out
    assert got[0].dtype == x.dtype and got[0].shape == shape
    assert_close("y", got[0], want_y, dt)
    want_rdt = op.residual_dtype(dt, rdt if residual else None, rif32)
    if residual or want_rdt != dt:
        assert op._np_dtype(want_rdt, r, x) == got[1].dtype
        assert_close("residual_out", got[1], want_r, want_rdt)
    else:
        assert got[1] is x
    # training forward: statistics, then the backward
    y2, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w, b, residual=r, eps=eps, residual_in_fp32=rif32,
                                                 is_rms_norm=rms)
    sync_check()
    assert np.array_equal(as64(y2), as64(got[0]))       # the same kernel with statistics kept
    # the kernel normalizes the sum as residual_out stores it (rounded to want_rdt), and the
    # backward reads that: the statistics and the gradients' reference use the same rounded sum
    s64 = x64 if r64 is None else as64(rounded(x64 + r64, want_rdt))
    m64, rs64 = layer_norm_stats(s64, eps, rms)
    acc = "float64" if dt == "float64" else "float32"
    assert_close("rstd", rstd, rs64, acc)
    if not rms:
        assert_close("mean", mean, m64, acc)
    if not bwd:
        return
    gyh = rounded(rng.standard_normal(shape), dt)
    grh = rounded(rng.standard_normal(shape), want_rdt) if drout else None
    gy, gr = _place(gyh, layout), (_place(grh, layout) if drout else None)
    dx, dw, db, dres = ssmkit.layer_norm_bwd(gy, rout, w, b, mean, rstd, gr, has_residual=residual, is_rms_norm=rms)
    sync_check()
    wdx, wdw, wdb, _ = ref_bwd(as64(gyh), s64, as64(wh), as64(bh), eps=eps, dresidual_out=as64(grh),
                               is_rms_norm=rms)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    # the tolerance of dt (residual_out, which both sides normalize, is dt or fp32)
    assert_close("dx", dx, wdx, dt, grad=True)
    # dweight/dbias: sums over rows; the tolerance is relative to their RMS, which grows with the rows
    assert_close("dweight", dw, wdw, wdt if wdt != "float32" else dt, grad=True)
    if bias:
        assert_close("dbias", db, wdb, wdt if wdt != "float32" else dt, grad=True)
    else:
        assert db is None
    if residual:
        if rdt == dt:
            assert dres is dx
        else:
            assert dres.dtype == r.dtype
            assert_close("dresidual", dres, wdx, rdt if rdt != "float32" else dt, grad=True)
    else:
        assert dres is None


DTYPE_SETS = [  # (x, weight, residual)
    ("float32", "float32", "float32"), ("bfloat16", "float32", "float32"), ("bfloat16", "bfloat16", "bfloat16"),
    ("float16", "float16", "float32"), ("float16", "float32", "float16"), ("float64", "float64", "float64"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dts", DTYPE_SETS, ids=lambda d: "-".join(d))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("H", [1, 7, 64, 1000, 2048, 2051])
def test_gpu_dtypes_and_sizes(dts, rms, H):
    _check((3, 11, H), *dts, rms=rms, seed=H)


@pytest.mark.gpu
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("bias, residual, rif32, drout", [
    (False, False, False, False), (True, False, True, False), (False, True, False, True), (True, True, True, True),
    (False, False, True, True)])
@pytest.mark.parametrize("dts", [("bfloat16", "float32", "float32"), ("float32", "float32", "float32"),
                                 ("float16", "float16", "float16")], ids=lambda d: "-".join(d))
def test_gpu_flags(rms, bias, residual, rif32, drout, dts):
    _check((4, 9, 520), *dts, rms=rms, bias=bias, residual=residual, rif32=rif32, drout=drout, seed=17)


@st.composite
def gpu_ln_cases(draw):
    """One configuration for ``_check``: shape (1-3 leading dims, H from 1 to 4100, the vector
    widths' edges included), dtypes, flags and layout."""
    layout = draw(st.sampled_from(["c", "unaligned", "strided", "copy"]))
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=2 if layout == "copy" else 1, max_size=2)))
    H = draw(st.one_of(st.integers(1, 300), st.sampled_from([511, 512, 1024, 2048, 2051, 4096, 4100])))
    return dict(shape=lead + (H,), dts=draw(st.sampled_from(DTYPE_SETS)), rms=draw(st.booleans()),
                bias=draw(st.booleans()), residual=draw(st.booleans()), rif32=draw(st.booleans()), layout=layout,
                drout=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(40))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gpu_ln_cases())
def test_gpu_property(shard, case):
    """Hypothesis over shapes, dtypes, flags and layouts: forward, statistics and backward against
    the float64 reference (issue 13: >= 1000 GPU examples per op, ``gpu_examples``)."""
    _check(case["shape"], *case["dts"], rms=case["rms"], bias=case["bias"], residual=case["residual"],
           rif32=case["rif32"], layout=case["layout"], drout=case["drout"], seed=case["seed"])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["unaligned", "strided", "copy"])
@pytest.mark.parametrize("H", [8, 130, 2048])
def test_gpu_layouts(layout, H):
    _check((3, 5, H), "bfloat16", "float32", "float32", rms=True, layout=layout, seed=H)
    _check((3, 5, H), "float32", "float32", "float32", rms=False, layout=layout, seed=H + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dt, H", [("bfloat16", 8192), ("bfloat16", 8200), ("bfloat16", 16384), ("float16", 24575),
                                   ("bfloat16", 32768), ("float32", 4100), ("float32", 16384), ("float64", 8192)])
def test_gpu_large_h(dt, H):
    """kIters = 2 and 4 (several chunks per thread, groups of up to 1024 threads)."""
    wdt = "float64" if dt == "float64" else "float32"
    _check((2, 3, H), dt, wdt, wdt, rms=True, seed=H)
    _check((5, H), dt, wdt, dt, rms=False, bias=False, seed=H + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(70001, 64), (3, 9000, 130), (12000, 1024)])
def test_gpu_many_rows(shape):
    """More rows than resident blocks: the backward walks several rows per group and folds many
    partial rows; the forward runs many blocks of several groups."""
    _check(shape, "bfloat16", "float32", "float32", rms=True, seed=3)
    _check(shape, "float32", "float32", "float32", rms=False, residual=False, seed=4)


@pytest.mark.gpu
def test_gpu_zero_rows():
    import cupy

    x = cupy.empty((0, 3, 16), cupy.float32)
    w = cupy.ones(16, cupy.float32)
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w, w, residual=x)
    assert y.shape == rout.shape == (0, 3, 16) and rstd.shape == (0, 3)
    dx, dw, db, dres = ssmkit.layer_norm_bwd(x, rout, w, w, mean, rstd, has_residual=True)
    assert dx.shape == (0, 3, 16) and (dw == 0).all() and (db == 0).all()


@pytest.mark.gpu
def test_gpu_backward_bitwise_deterministic():
    import cupy

    from gpu_util import rounded

    rng = np.random.default_rng(5)
    shape, H = (4096, 2048), 2048
    x = cupy.asarray(rounded(rng.standard_normal(shape), "bfloat16"))
    r = cupy.asarray(rng.standard_normal(shape).astype(F32))
    w = cupy.asarray(rng.standard_normal(H).astype(F32))
    b = cupy.asarray(rng.standard_normal(H).astype(F32))
    _, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w, b, residual=r)
    dy = cupy.asarray(rounded(rng.standard_normal(shape), "bfloat16"))
    a = ssmkit.layer_norm_bwd(dy, rout, w, b, mean, rstd, has_residual=True)
    c = ssmkit.layer_norm_bwd(dy, rout, w, b, mean, rstd, has_residual=True)
    for u, v in zip(a, c):
        assert u.get().tobytes() == v.get().tobytes()


@pytest.mark.gpu
def test_gpu_in_place_out_is_x():
    """out=x: every element is read and written by the same thread."""
    import cupy

    rng = np.random.default_rng(6)
    xh = rng.standard_normal((33, 520)).astype(F32)
    x = cupy.asarray(xh)
    w = cupy.asarray(rng.standard_normal(520).astype(F32))
    got = ssmkit.layer_norm(x, w, out=x)
    assert got is x
    assert_close("y", x, ref_fwd(xh.astype(F64), w.get().astype(F64)), "float32")


# ---- torch on the GPU ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")


def gpu(fn):
    return pytest.mark.gpu(needs_cuda(fn))


@gpu
@pytest.mark.parametrize("rms", [False, True])
def test_torch_gradcheck_gpu(rms):
    p = _problem((3, 4, 40), residual=True)
    args = tuple(_t(p[k], True, device="cuda") for k in ("x", "weight", "bias", "residual"))
    f = lambda x, w, b, r: sttorch.layer_norm_fn(x, w, b, residual=r, prenorm=True, is_rms_norm=rms)  # noqa: E731
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_block_pattern_vs_reference_gpu(dtype):
    """The Mamba block pattern: prenorm, residual stream in fp32, weights fp32; forward values and
    every gradient against the float64 reference (dresidual = dx + the residual_out gradient)."""
    rng = np.random.default_rng(7)
    shape, H = (2, 300, 1024), 1024
    xh = torch.tensor(rng.standard_normal(shape)).to(dtype)
    rh = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
    wh = torch.tensor(1 + 0.3 * rng.standard_normal(H), dtype=torch.float32)
    x, r, w = (t.cuda().requires_grad_() for t in (xh, rh, wh))
    y, res = sttorch.rms_norm_fn(x, w, None, residual=r, prenorm=True, residual_in_fp32=True)
    assert y.dtype == dtype and res.dtype == torch.float32
    gy = torch.tensor(rng.standard_normal(shape)).to(dtype)
    gr = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
    torch.autograd.backward((y, res), (gy.cuda(), gr.cuda()))
    x64, r64, w64 = xh.double().numpy(), rh.double().numpy(), wh.double().numpy()
    wy, wr = ref_fwd(x64, w64, None, residual=r64, prenorm=True, is_rms_norm=True)
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert_close("y", y.detach().float().cpu().numpy(), wy, name)
    assert_close("residual_out", res.detach().cpu().numpy(), wr, "float32")
    dx, dw, _, dres = ref_bwd(gy.double().numpy(), x64, w64, None, residual=r64,
                              dresidual_out=gr.double().numpy(), is_rms_norm=True)
    assert x.grad.dtype == dtype and r.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert_close("dx", x.grad.float().cpu().numpy(), dx, name, grad=True)
    assert_close("dresidual", r.grad.cpu().numpy(), dres, name, grad=True)
    assert_close("dweight", w.grad.cpu().numpy(), dw, name, grad=True)


@gpu
def test_torch_compile_and_autocast_gpu():
    x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
    w = torch.randn(256, device="cuda", requires_grad=True)
    b = torch.randn(256, device="cuda", requires_grad=True)
    args = (x, None, w, b, torch.randn(256, device="cuda", requires_grad=True))
    compiled = torch.compile(_block_like, fullgraph=True, backend="aot_eager")
    r1 = compiled(*args)
    g1 = torch.autograd.grad(r1, (x, w, b))
    r0 = _block_like(*args)
    g0 = torch.autograd.grad(r0, (x, w, b))
    torch.testing.assert_close(r1, r0)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sttorch.layer_norm_fn(x, w, b)
    assert y.dtype == torch.float32


@gpu
def test_rms_norm_module_gpu():
    m = sttorch.RMSNorm(512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    want = ref_fwd(x.double().cpu().numpy(), np.ones(512), None, eps=1e-5, is_rms_norm=True)
    assert y.dtype == torch.bfloat16
    assert_close("y", y.detach().float().cpu().numpy(), want, "bfloat16")

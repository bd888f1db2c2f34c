"""layer_norm: fused residual add + LayerNorm / RMSNorm over the last axis (mamba_ssm's Triton
``layer_norm_fn`` / ``rms_norm_fn``), forward and backward. Kernels: kernels_cu/layer_norm.cu.

Shapes: x, residual, out, residual_out (..., H); weight, bias (H,); mean, rstd (...,) (the rows:
the leading dims). H <= 65536 bytes of x's dtype per row (32768 fp16/bf16, 16384 fp32, 8192 fp64),
as upstream.

    s = x + residual;  residual_out = s (in the residual stream's dtype)
    LayerNorm: y = (s - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var(s) + eps)
    RMSNorm:   y = s * rstd * weight + bias,            rstd = 1 / sqrt(mean(s^2) + eps)

Dtypes: x fp16 / bf16 / fp32 (or fp64); weight and bias (one dtype) in x's dtype or fp32 (fp64
with fp64); residual in x's dtype or fp32 (fp64 with fp64). y in x's dtype. The residual stream
(residual_out) has the residual's dtype when one is given, else fp32 with ``residual_in_fp32``
(16-bit x), else x's dtype, and then residual_out is x itself (nothing is written), as upstream.
Math in fp32 (fp64 for fp64); mean and rstd are kept in that type.

Layouts: H must have unit stride and the leading dims one row stride (any view that reshapes to
(rows, H) without a copy); other inputs are copied per call (as upstream's reshape/contiguous).
Arrays whose base and row stride are 16-byte aligned move as 16-byte vectors (the last, partial
chunk of a row element by element); odd H or unaligned views take scalar accesses (correct, slower).

NumPy inputs run the float64 reference (``ssmkit.reference.layer_norm``); CuPy inputs run the
kernels on the current stream without synchronizing. The first call of each layout (shapes,
dtypes, strides, 16-byte alignment, flags) validates and prepares the launch; later calls with
that layout only allocate the outputs and launch (a model calls this twice per layer per token).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._arrays import CUPY, backend_of, check_current_device, dtype_name
from .._compile import KernelRef, get_kernel
from .._launch import MAX_GRID_X, prepare
from .._params import Params
from .._plan import PlanCache, layout_key
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_written

OP = "layer_norm"
OP_BWD = "layer_norm_bwd"
KERNEL_FILE = "layer_norm.cu"

_CTYPE = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
IN_DTYPES = ("float16", "bfloat16", "float32", "float64")
# x's dtype -> accepted weight/bias dtypes, and residual (stream) dtypes.
WEIGHT_DTYPES = {"float16": ("float16", "float32"), "bfloat16": ("bfloat16", "float32"),
                 "float32": ("float32",), "float64": ("float64",)}
RESIDUAL_DTYPES = WEIGHT_DTYPES
ACC_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
# Mirror of LnTraits::kVec: x's elements per 16-byte load (a "chunk").
VEC_ELEMS = {"float16": 8, "bfloat16": 8, "float32": 4, "float64": 2}
# Chunks per thread (the kIters template parameter): a row of H needs ceil(H / kVec) chunks over
# a group of at most MAX_GROUP threads, so kIters = 4 reaches 4096 chunks = 64 KB of x (upstream's
# limit). The smallest that fits is taken (kIters = 1 up to H = 8192 in 16-bit): the most threads
# per row and the fewest registers (bf16 forward, kIters = 1: 54 registers on sm_90).
ITERS = (1, 2, 4)
MAX_GROUP = 1024          # kLnMaxThreads
# Smallest kIters to consider: benchmarks/bench_layer_norm.py --sweep changes it between calls.
MIN_ITERS = 1
# Forward block: groups of one row each, at least this many threads (small H: several rows per
# block, so blocks do not shrink to one warp).
FWD_BLOCK = 256
# Backward block: a block folds its groups' dweight/dbias sums into one partial row, so the
# partial rows number grid = resident blocks; 512 threads = 2 rows of H = 2048 bf16 per block:
# ~530 partial rows of H fp32 on an H100/H200 (4 MB, ~1 us of traffic) against 4x that with
# one-row blocks. bench_layer_norm.py --sweep tries 256 and 1024.
BWD_BLOCK = 512
REDUCE_ROWS = 32          # kLnReduceRows: partial-row slices per reduce block (32 x 32 threads)

PARAMS_FWD = Params("ssm::LayerNormFwdParams", [
    ("x", "ptr"), ("residual", "ptr"), ("weight", "ptr"), ("bias", "ptr"), ("y", "ptr"),
    ("residual_out", "ptr"), ("mean", "ptr"), ("rstd", "ptr"),
    ("rows", "int64_t"), ("hidden", "int64_t"),
    ("x_row", "int64_t"), ("res_row", "int64_t"), ("y_row", "int64_t"), ("rout_row", "int64_t"),
    ("eps", "double"), ("group", "int32_t"),
    ("vec_x", "int32_t"), ("vec_res", "int32_t"), ("vec_y", "int32_t"), ("vec_rout", "int32_t"),
    ("vec_w", "int32_t"),
])
PARAMS_BWD = Params("ssm::LayerNormBwdParams", [
    ("x", "ptr"), ("weight", "ptr"), ("dy", "ptr"), ("dres_out", "ptr"), ("mean", "ptr"), ("rstd", "ptr"),
    ("dx", "ptr"), ("dres", "ptr"), ("dw_part", "ptr"), ("db_part", "ptr"),
    ("rows", "int64_t"), ("hidden", "int64_t"), ("part_row", "int64_t"),
    ("x_row", "int64_t"), ("dy_row", "int64_t"), ("drout_row", "int64_t"), ("dx_row", "int64_t"),
    ("dres_row", "int64_t"),
    ("group", "int32_t"), ("vec_x", "int32_t"), ("vec_w", "int32_t"), ("vec_dy", "int32_t"),
    ("vec_drout", "int32_t"), ("vec_dx", "int32_t"), ("vec_dres", "int32_t"),
])
PARAMS_REDUCE = Params("ssm::LayerNormReduceParams", [
    ("dw_part", "ptr"), ("db_part", "ptr"), ("dweight", "ptr"), ("dbias", "ptr"),
    ("parts", "int64_t"), ("hidden", "int64_t"), ("part_row", "int64_t"),
])
ALL_PARAMS = (PARAMS_FWD, PARAMS_BWD, PARAMS_REDUCE)


# ---- kernel choice: the one place a problem becomes template parameters ---------------------

def max_hidden(dtype: str) -> int:
    """Largest H for x's dtype: MAX_GROUP threads x ITERS[-1] chunks x VEC_ELEMS."""
    return MAX_GROUP * ITERS[-1] * VEC_ELEMS[dtype]


def launch_shape(dtype: str, hidden: int, min_iters: int | None = None) -> tuple[int, int]:
    """(kIters, group threads) for a row of ``hidden`` elements of x's ``dtype``: the smallest
    kIters >= ``min_iters`` (default MIN_ITERS) whose group fits MAX_GROUP; the group is the
    chunks per row over kIters, rounded up to whole warps."""
    lo = MIN_ITERS if min_iters is None else min_iters
    chunks = -(-hidden // VEC_ELEMS[dtype])
    for iters in ITERS:
        if iters < lo and iters != ITERS[-1]:
            continue
        per = -(-chunks // iters)
        if per <= MAX_GROUP:
            return iters, max(32, -(-per // 32) * 32)
    raise ValueError(f"{OP}: H = {hidden} exceeds the largest supported {max_hidden(dtype)} for {dtype} "
                     "(64 KB per row, as upstream)")


def kernel_ref(kind: str, dtype: str, wdtype: str | None = None, rdtype: str | None = None,
               rms: bool = False, iters: int = 1) -> KernelRef:
    """kind "fwd" / "bwd" (x's dtype, weight dtype, residual-stream dtype, RMSNorm, kIters) or
    "reduce" (the weight dtype as ``dtype``)."""
    if kind == "reduce":
        return KernelRef(KERNEL_FILE, f"ssm::layer_norm_bwd_reduce<{_CTYPE[dtype]}>")
    return KernelRef(KERNEL_FILE, f"ssm::layer_norm_{kind}<{_CTYPE[dtype]}, {_CTYPE[wdtype]}, "
                                  f"{_CTYPE[rdtype]}, {int(bool(rms))}, {int(iters)}>")


@register(OP)
def variants(dtype: str | None = None, rms: bool | None = None, kind: str | None = None) -> list[KernelRef]:
    """Every instantiation (filters: x ``dtype``, ``rms``, ``kind`` as in ``kernel_ref``)."""
    refs: list[KernelRef] = []
    for xd in IN_DTYPES:
        if dtype not in (None, xd):
            continue
        for wd in WEIGHT_DTYPES[xd]:
            for rd in RESIDUAL_DTYPES[xd]:
                for k in ("fwd", "bwd"):
                    if kind not in (None, k):
                        continue
                    for r in (False, True):
                        if rms in (None, r):
                            refs += [kernel_ref(k, xd, wd, rd, r, it) for it in ITERS]
        if kind in (None, "reduce"):
            refs += [kernel_ref("reduce", wd) for wd in WEIGHT_DTYPES[xd] if wd == xd]
    return refs


# ---- validation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerNormSpec:
    """One forward call: shapes, dtypes, flags (array-library independent)."""

    shape: tuple
    rows: int
    hidden: int
    dtype: str
    wdtype: str
    rdtype: str           # the residual stream: residual's dtype, or fp32 / x's
    has_bias: bool
    has_residual: bool
    materialize: bool     # residual_out is a new array (else it is x itself)
    rms: bool
    eps: float


@dataclass(frozen=True)
class LayerNormBwdSpec:
    shape: tuple
    rows: int
    hidden: int
    dtype: str            # dy and dx
    wdtype: str
    rdtype: str           # the saved input x (residual_out), dresidual_out and dresidual
    has_bias: bool
    has_residual: bool
    has_dres_out: bool
    rms: bool


def residual_dtype(dtype: str, res_dtype: str | None, residual_in_fp32: bool) -> str:
    """The residual stream's dtype: the residual's, else fp32 with ``residual_in_fp32`` for 16-bit x,
    else x's."""
    if res_dtype is not None:
        return res_dtype
    return "float32" if residual_in_fp32 and dtype in ("float16", "bfloat16") else dtype


def _check_eps(op, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)) or eps < 0:
        raise ValueError(f"{op}: argument 'eps' must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_x(op, name, x):
    check_ndim(op, name, x, range(1, 64), "(..., H)")
    check_array(op, name, x, tuple(x.shape), dtypes=IN_DTYPES)
    H = int(x.shape[-1])
    if H < 1:
        raise ValueError(f"{op}: argument '{name}' must have H = shape[-1] >= 1, got shape {tuple(x.shape)}")
    dt = dtype_name(x)
    if H > max_hidden(dt):
        raise ValueError(f"{op}: argument '{name}' has H = {H}, more than the largest supported "
                         f"{max_hidden(dt)} for {dt} (64 KB per row, as upstream)")
    return tuple(int(s) for s in x.shape), H, dt


def _check_weights(op, weight, bias, H, dt):
    check_ndim(op, "weight", weight, (1,), "(H,)")
    check_array(op, "weight", weight, (H,), "H", dtypes=WEIGHT_DTYPES[dt])
    wd = dtype_name(weight)
    if bias is not None:
        check_array(op, "bias", bias, (H,), "H", dtypes=(wd,))
    return wd


def validate(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
             is_rms_norm=False, out=None) -> LayerNormSpec:
    """Check every forward argument once; raise ValueError/TypeError naming it."""
    for name, v in (("prenorm", prenorm), ("residual_in_fp32", residual_in_fp32), ("is_rms_norm", is_rms_norm)):
        check_flag(OP, name, v)
    eps = _check_eps(OP, eps)
    shape, H, dt = _check_x(OP, "x", x)
    wd = _check_weights(OP, weight, bias, H, dt)
    res_dt = None
    if residual is not None:
        check_array(OP, "residual", residual, shape, dtypes=RESIDUAL_DTYPES[dt])
        res_dt = dtype_name(residual)
    rd = residual_dtype(dt, res_dt, residual_in_fp32)
    if out is not None:
        check_array(OP, "out", out, shape, dtypes=(dt,))
        check_written(OP, "out", out)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return LayerNormSpec(shape, rows, H, dt, wd, rd, bias is not None, residual is not None,
                         residual is not None or rd != dt, bool(is_rms_norm), eps)


def validate_bwd(dout, x, weight, bias, mean, rstd, dresidual_out=None, has_residual=False,
                 is_rms_norm=False) -> LayerNormBwdSpec:
    """Check every backward argument once. ``x`` is the normalized input (the forward's
    residual_out); dout has y's (x's input) dtype."""
    op = OP_BWD
    check_flag(op, "has_residual", has_residual)
    check_flag(op, "is_rms_norm", is_rms_norm)
    shape, H, dt = _check_x(op, "dout", dout)
    check_array(op, "x", x, shape, dtypes=RESIDUAL_DTYPES[dt])
    rd = dtype_name(x)
    wd = _check_weights(op, weight, bias, H, dt)
    acc = ACC_DTYPE[dt]
    check_array(op, "rstd", rstd, shape[:-1], dtypes=(acc,))
    if not is_rms_norm:
        check_array(op, "mean", mean, shape[:-1], dtypes=(acc,))
    if dresidual_out is not None:
        check_array(op, "dresidual_out", dresidual_out, shape, dtypes=(rd,))
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return LayerNormBwdSpec(shape, rows, H, dt, wd, rd, bias is not None, bool(has_residual),
                            dresidual_out is not None, bool(is_rms_norm))


# ---- layouts ----------------------------------------------------------------------------------

def row_stride(arr) -> int | None:
    """Element stride between the rows of ``arr`` viewed as (rows, H) without a copy, or None
    when no single stride does it (or H has no unit stride)."""
    item = arr.dtype.itemsize
    shape, strides = arr.shape, arr.strides
    H = shape[-1]
    if H > 1 and strides[-1] != item:
        return None
    lead = [(n, s) for n, s in zip(shape[:-1], strides[:-1]) if n != 1]
    if not lead:
        return H
    for (_, s0), (n1, s1) in zip(lead, lead[1:]):
        if s0 != s1 * n1:
            return None
    if lead[-1][1] % item:
        return None
    return lead[-1][1] // item


class _Layout:
    """How one (..., H) array enters a kernel: copied per call or not, row stride, 16-byte flag."""

    __slots__ = ("copy", "row", "vec")

    def __init__(self, arr, rows: int, H: int):
        rs = row_stride(arr)
        item = arr.dtype.itemsize
        self.copy = rs is None
        if self.copy:                               # a fresh C-contiguous copy (256-byte aligned)
            rs, aligned = H, True
        else:
            aligned = arr.data.ptr % 16 == 0
        self.row = rs
        self.vec = int(aligned and (rows <= 1 or (rs * item) % 16 == 0))


def _fresh_vec(rows: int, H: int, itemsize: int) -> int:
    """The 16-byte flag of a C-contiguous array we allocate (CuPy's pool aligns to 256 bytes)."""
    return int(rows <= 1 or (H * itemsize) % 16 == 0)


def _weights_vec(weight, bias) -> int:
    return int(all(a is None or (a.data.ptr % 16 == 0 and (a.shape[0] == 1 or a.strides[0] == a.dtype.itemsize))
                   for a in (weight, bias)))


def _unit(a) -> bool:
    return a is None or a.shape[0] == 1 or a.strides[0] == a.dtype.itemsize


# The few CuPy calls of the host code, as module functions (the fake-device tests replace them).
def _device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _alloc(shape, dtype):
    import cupy

    return cupy.empty(shape, dtype)


def _contiguous(a):
    import cupy

    return cupy.ascontiguousarray(a)


_SM_COUNT: dict = {}


def _sm_count() -> int:
    dev = _device()
    n = _SM_COUNT.get(dev)
    if n is None:
        import cupy

        n = _SM_COUNT[dev] = int(cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, dev))
    return n


def _resident_blocks(kernel, block: int) -> int:
    """Blocks of ``block`` threads of ``kernel`` resident per SM (the driver's occupancy answer)."""
    try:
        from cupy.cuda import driver

        return max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, block, 0)))
    except Exception:  # a kernel double without a CUfunction, or an old CuPy
        return max(1, 2048 // block)


def _check_device(named: dict) -> None:
    check_current_device(OP, named, _device())


# ---- forward --------------------------------------------------------------------------------

class _FwdPlan:
    """A validated forward layout: allocates the outputs and launches with pointers only."""

    __slots__ = ("spec", "launch", "row", "copy_x", "copy_res", "copy_w", "store_rout", "save",
                 "acc", "empty", "I")

    def __init__(self, spec: LayerNormSpec, x, weight, bias, residual, out, save: bool, want_rout: bool):
        self.spec = spec
        M, H = spec.rows, spec.hidden
        self.save = save
        self.store_rout = spec.materialize and (save or want_rout)
        self.acc = np.dtype(ACC_DTYPE[spec.dtype])
        lx = _Layout(x, M, H)
        lr = _Layout(residual, M, H) if residual is not None else None
        self.copy_x, self.copy_res = lx.copy, lr is not None and lr.copy
        self.copy_w = not (_unit(weight) and _unit(bias))
        if out is not None:
            o_row = row_stride(out)
            if o_row is None or (M > 1 and abs(o_row) < H):
                raise ValueError(f"{OP}: argument 'out' must be a (..., H) array whose rows are one "
                                 f"non-overlapping stride apart with unit stride along H, got strides "
                                 f"{tuple(out.strides)} for shape {tuple(out.shape)}")
            o_vec = int(out.data.ptr % 16 == 0 and (M <= 1 or (o_row * out.dtype.itemsize) % 16 == 0))
        else:
            o_row, o_vec = H, _fresh_vec(M, H, np.dtype(x.dtype).itemsize)
        r_item = np.dtype(_np_dtype(spec.rdtype, residual, x)).itemsize
        iters, group = launch_shape(spec.dtype, H)
        rpb = max(1, FWD_BLOCK // group)
        self.empty = M == 0
        grid = max(1, min(-(-M // rpb), MAX_GRID_X))
        self.row = PARAMS_FWD.row(
            rows=M, hidden=H, x_row=lx.row, res_row=lr.row if lr else 0, y_row=o_row, rout_row=H,
            eps=spec.eps, group=group, vec_x=lx.vec, vec_res=lr.vec if lr else 0, vec_y=o_vec,
            vec_rout=_fresh_vec(M, H, r_item),
            vec_w=1 if self.copy_w else _weights_vec(weight, bias))
        self.I = [PARAMS_FWD.index(n) for n in ("x", "residual", "weight", "bias", "y", "residual_out",
                                                 "mean", "rstd")]
        self.launch = prepare(kernel_ref("fwd", spec.dtype, spec.wdtype, spec.rdtype, spec.rms, iters),
                              grid=(grid,), block=(rpb * group,))

    def __call__(self, x, weight, bias, residual, out):
        """(y, residual_out or None, mean or None, rstd or None)."""
        spec = self.spec
        if self.copy_x:
            x = _contiguous(x)
        if self.copy_res:
            residual = _contiguous(residual)
        if self.copy_w:
            weight = _contiguous(weight)
            bias = None if bias is None else _contiguous(bias)
        y = _alloc(spec.shape, x.dtype) if out is None else out
        rout = _alloc(spec.shape, _np_dtype(spec.rdtype, residual, x)) if self.store_rout else None
        mean = rstd = None
        if self.save:
            rstd = _alloc(spec.shape[:-1], self.acc)
            if not spec.rms:
                mean = _alloc(spec.shape[:-1], self.acc)
        if not self.empty:
            row = self.row[:]
            for i, a in zip(self.I, (x, residual, weight, bias, y, rout, mean, rstd)):
                if a is not None:
                    row[i] = a.data.ptr
            self.launch.row(PARAMS_FWD, row)
        return y, rout, mean, rstd


_NP_DTYPES: dict = {}


def _np_dtype(name: str, *likes):
    """The NumPy/CuPy dtype object for ``name`` (bfloat16 taken from an array that has it)."""
    dt = _NP_DTYPES.get(name)
    if dt is None:
        for a in likes:
            if a is not None and dtype_name(a) == name:
                dt = a.dtype
                break
        else:
            dt = np.dtype(name)          # every name but bfloat16 is a NumPy dtype
        _NP_DTYPES[name] = dt
    return dt


_FWD_PLANS = PlanCache()
_FWD_NAMES = ("x", "weight", "bias", "residual", "out")


def _forward(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, out, save: bool):
    """(y, residual_out or None (not materialized, or not asked for), mean, rstd) on either backend."""
    if type(eps) is int:
        eps = float(eps)
    if (type(eps) is float and type(prenorm) is bool and type(residual_in_fp32) is bool
            and type(is_rms_norm) is bool):
        key, _ = layout_key((x, weight, bias, residual, out), (eps, prenorm, residual_in_fp32, is_rms_norm, save))
        plan = _FWD_PLANS.get(key) if key is not None else None
        if plan is not None:
            return plan(x, weight, bias, residual, out)
    backend, arr = backend_of(OP, dict(zip(_FWD_NAMES, (x, weight, bias, residual, out))))
    x, weight, bias, residual, out = (arr[n] for n in _FWD_NAMES)
    spec = validate(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, out)
    if backend != CUPY:
        return _numpy_forward(spec, x, weight, bias, residual, out, save, prenorm)
    _check_device(arr)
    plan = _FwdPlan(spec, x, weight, bias, residual, out, save, prenorm)
    key, _ = layout_key((x, weight, bias, residual, out), (spec.eps, prenorm, residual_in_fp32, is_rms_norm, save))
    _FWD_PLANS.put(key, plan)
    return plan(x, weight, bias, residual, out)


def _numpy_forward(spec, x, weight, bias, residual, out, save, want_rout):
    from ..reference import layer_norm as ref
    from ..reference.layer_norm import layer_norm_stats

    y, rout = ref(x, weight, bias, residual, spec.eps, prenorm=True,
                  residual_in_fp32=spec.rdtype != spec.dtype and residual is None, is_rms_norm=spec.rms)
    if out is not None:
        out[...] = y
        y = out
    mean = rstd = None
    if save:
        # The statistics of the sum as residual_out stores it (rounded to its dtype), as the
        # reference and the kernel normalize it.
        s = x.astype(np.float64) if residual is None else rout.astype(np.float64)
        m, r = layer_norm_stats(s, spec.eps, spec.rms)
        acc = ACC_DTYPE[spec.dtype]
        rstd = np.asarray(r, dtype=acc)              # 0-d arrays (not scalars) for a 1-D x
        mean = None if m is None else np.asarray(m, dtype=acc)
    keep = spec.materialize and (save or want_rout)
    return y, (rout if keep else None), mean, rstd


def layer_norm(x, weight, bias=None, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
               is_rms_norm=False, out=None):
    """Residual add + LayerNorm (RMSNorm with ``is_rms_norm``) over the last axis, for inference.

    x: (..., H) fp16/bf16/fp32 (fp64); weight, bias: (H,) in x's dtype or fp32 (one dtype; bias
    optional); residual: x's shape, in x's dtype or fp32. Returns out (x's shape and dtype), or
    with ``prenorm`` (out, residual_out): residual_out = x + residual in the residual's dtype, or
    fp32 with ``residual_in_fp32`` (16-bit x, no residual), else x itself (as upstream).
    ``out``: optional preallocated (..., H) array of x's dtype (rows one stride apart, unit
    stride along H; writeable, no elements sharing memory). Keeps nothing
    for a backward (see ``layer_norm_fwd``).

    Edge inputs: a leading dim of 0 (no rows) gives empty outputs and launches nothing; H must
    be >= 1 (the statistics of an empty row are undefined). Inputs may have any strides,
    negative ones included (those that are not one row stride apart with unit stride along H are
    copied per call). NaN and inf propagate row-wise: a NaN in x (or residual) at (r, h) makes
    row r of out NaN and residual_out[r, h] NaN; a NaN in weight[h] or bias[h] makes out[..., h]
    NaN.
    """
    y, rout, _, _ = _forward(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, out, False)
    if not prenorm:
        return y
    return y, (x if rout is None else rout)


def layer_norm_fwd(x, weight, bias=None, residual=None, eps=1e-6, residual_in_fp32=False, is_rms_norm=False,
                   out=None):
    """Forward for training: (out, residual_out, mean, rstd), what ``layer_norm_bwd`` needs.

    residual_out: the normalized input s = x + residual in the residual stream's dtype (x itself
    when nothing new is made: no residual, and fp32 not asked for or x already fp32+). mean
    (LayerNorm; None for RMSNorm) and rstd: (...,) (x's leading dims) fp32 (fp64 for fp64).
    Arguments as ``layer_norm``."""
    y, rout, mean, rstd = _forward(x, weight, bias, residual, eps, False, residual_in_fp32, is_rms_norm, out, True)
    return y, (x if rout is None else rout), mean, rstd


# ---- backward -------------------------------------------------------------------------------

class _BwdPlan:
    """A validated backward layout: two launches (rows, then the fold of the partial rows)."""

    __slots__ = ("spec", "launch", "reduce", "row", "rrow", "I", "RI", "copies", "parts", "part_row",
                 "acc", "dx_dtype", "dres_dtype", "w_dtype", "jobs", "empty")

    def __init__(self, spec: LayerNormBwdSpec, dy, x, weight, bias, mean, rstd, drout):
        self.spec = spec
        M, H = spec.rows, spec.hidden
        iters, group = launch_shape(spec.dtype, H)
        rpb = max(1, BWD_BLOCK // group)
        block = rpb * group
        ref = kernel_ref("bwd", spec.dtype, spec.wdtype, spec.rdtype, spec.rms, iters)
        # Persistent: as many blocks as are resident at once, each walking its share of the rows.
        blocks = max(1, min(-(-M // rpb), _sm_count() * _resident_blocks(get_kernel(ref), block)))
        self.launch = prepare(ref, grid=(blocks,), block=(block,))
        self.empty = M == 0
        self.parts = blocks
        kvec = VEC_ELEMS[spec.dtype]
        self.part_row = -(-H // kvec) * kvec
        self.acc = np.dtype(ACC_DTYPE[spec.dtype])
        self.jobs = 2 if spec.has_bias else 1
        self.dx_dtype = dy.dtype
        self.dres_dtype = x.dtype if spec.has_residual and spec.rdtype != spec.dtype else None
        self.w_dtype = weight.dtype
        lx, ldy = _Layout(x, M, H), _Layout(dy, M, H)
        ld = _Layout(drout, M, H) if drout is not None else None
        # stats: (M,) contiguous (copied otherwise); weight: unit stride (copied otherwise)
        stats_ok = all(a is None or a.size <= 1 or a.flags.c_contiguous for a in (mean, rstd))
        self.copies = (lx.copy, ldy.copy, ld is not None and ld.copy, not _unit(weight), not stats_ok)
        fresh = _fresh_vec(M, H, np.dtype(dy.dtype).itemsize)
        self.row = PARAMS_BWD.row(
            rows=M, hidden=H, part_row=self.part_row, x_row=lx.row, dy_row=ldy.row,
            drout_row=ld.row if ld else 0, dx_row=H, dres_row=H, group=group, vec_x=lx.vec,
            vec_w=1 if self.copies[3] else _weights_vec(weight, None), vec_dy=ldy.vec,
            vec_drout=ld.vec if ld else 0, vec_dx=fresh,
            vec_dres=_fresh_vec(M, H, np.dtype(x.dtype).itemsize))
        self.I = [PARAMS_BWD.index(n) for n in ("x", "weight", "dy", "dres_out", "mean", "rstd", "dx", "dres",
                                                 "dw_part", "db_part")]
        self.rrow = PARAMS_REDUCE.row(parts=blocks, hidden=H, part_row=self.part_row)
        self.RI = [PARAMS_REDUCE.index(n) for n in ("dw_part", "db_part", "dweight", "dbias")]
        self.reduce = prepare(kernel_ref("reduce", spec.wdtype), grid=(-(-H // 32), self.jobs),
                              block=(32 * REDUCE_ROWS,))

    def __call__(self, dy, x, weight, bias, mean, rstd, drout):
        spec = self.spec
        cx, cdy, cd, cw, cs = self.copies
        if cx:
            x = _contiguous(x)
        if cdy:
            dy = _contiguous(dy)
        if cd:
            drout = _contiguous(drout)
        if cw:
            weight = _contiguous(weight)
        if cs:
            rstd = _contiguous(rstd)
            mean = None if mean is None else _contiguous(mean)
        dx = _alloc(spec.shape, self.dx_dtype)
        dres = _alloc(spec.shape, self.dres_dtype) if self.dres_dtype is not None else None
        dweight = _alloc((spec.hidden,), self.w_dtype)
        dbias = _alloc((spec.hidden,), self.w_dtype) if spec.has_bias else None
        if self.empty:                               # no rows: zero sums
            dweight.fill(0)
            if dbias is not None:
                dbias.fill(0)
        else:
            part = _alloc((self.jobs, self.parts, self.part_row), self.acc)
            row = self.row[:]
            for i, a in zip(self.I, (x, weight, dy, drout, mean, rstd, dx, dres, part[0],
                                     part[1] if self.jobs == 2 else None)):
                if a is not None:
                    row[i] = a.data.ptr
            self.launch.row(PARAMS_BWD, row)
            r = self.rrow[:]
            for i, a in zip(self.RI, (part[0], part[1] if self.jobs == 2 else None, dweight, dbias)):
                if a is not None:
                    r[i] = a.data.ptr
            self.reduce.row(PARAMS_REDUCE, r)
        if spec.has_residual and dres is None:
            dres = dx                                # same dtype: one array, as upstream
        return dx, dweight, dbias, dres


_BWD_PLANS = PlanCache()
_BWD_NAMES = ("dout", "x", "weight", "bias", "mean", "rstd", "dresidual_out")


def layer_norm_bwd(dout, x, weight, bias, mean, rstd, dresidual_out=None, has_residual=False,
                   is_rms_norm=False):
    """Gradients of ``layer_norm_fwd``: (dx, dweight, dbias, dresidual).

    dout: (..., H), the gradient of out (x's input dtype); x: the forward's residual_out (the
    normalized input); weight, bias: the forward's (bias None without one); mean (LayerNorm) and
    rstd from ``layer_norm_fwd``; dresidual_out: the gradient of residual_out (prenorm), in its
    dtype, or None. dx in dout's dtype; dresidual (``has_residual``: a residual was added) in
    x's dtype, the same array as dx when the dtypes agree (as upstream), else None; dweight and
    dbias in weight's dtype, summed over rows in a fixed order (bitwise reproducible: per-block
    partial rows, then one pass over them).
    """
    args = (dout, x, weight, bias, mean, rstd, dresidual_out)
    if type(has_residual) is bool and type(is_rms_norm) is bool:
        key, _ = layout_key(args, (has_residual, is_rms_norm))
        plan = _BWD_PLANS.get(key) if key is not None else None
        if plan is not None:
            return plan(*args)
    backend, arr = backend_of(OP_BWD, dict(zip(_BWD_NAMES, args)))
    args = tuple(arr[n] for n in _BWD_NAMES)
    spec = validate_bwd(*args[:6], dresidual_out=args[6], has_residual=has_residual, is_rms_norm=is_rms_norm)
    if backend != CUPY:
        return _numpy_backward(spec, *args)
    _check_device(arr)
    plan = _BwdPlan(spec, *args)
    key, _ = layout_key(args, (has_residual, is_rms_norm))
    _BWD_PLANS.put(key, plan)
    return plan(*args)


def _numpy_backward(spec, dy, x, weight, bias, mean, rstd, drout):
    from ..reference import layer_norm_bwd as ref

    x64 = x.astype(np.float64)
    ds, dweight, dbias, _ = ref(dy, x64, weight, bias, dresidual_out=drout, is_rms_norm=spec.rms,
                                mean=None if spec.rms else mean, rstd=rstd)
    dx = ds.astype(dy.dtype)
    dres = None
    if spec.has_residual:
        dres = dx if x.dtype == dy.dtype else ds.astype(x.dtype)
    return dx, dweight, dbias, dres


__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "kernel_ref", "variants", "validate",
           "validate_bwd", "launch_shape", "ALL_PARAMS"]

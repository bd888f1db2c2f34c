"""selective_state_update: one decode step of the Mamba selective SSM, in place on the state.

Shapes (B batch, D channels, N state, H heads, P head dim, G groups):

    Mamba-1:  state (B_pool, D, N); x, dt, z, out (B, D); A (D, N); B, C (B, N); D, dt_bias (D,)
    Mamba-2:  state (B_pool, H, P, N); x, dt, z, out (B, H, P); A (H, P, N); B, C (B, G, N)
              with G dividing H (head h reads group h // (H / G)); D, dt_bias (H, P)

Math: dt' = dt + dt_bias (softplus'ed with ``dt_softplus``); state = state * exp(A dt') +
B dt' x; out = sum_n state C + D x; out *= silu(z). Kernel: kernels_cu/selective_state_update.cu.

Three ways to call it, from most convenient to cheapest per call:

* ``selective_state_update(...)``: validates the first call of each layout and caches a prepared
  launch keyed by the arrays' shapes, dtypes, strides, device and alignment; later calls with the
  same layout only read pointers and launch.
* ``SelectiveStateUpdatePlan(...)``: validated once, bound to arrays; ``plan()`` relaunches and
  ``plan(x=..., state=...)`` rebinds arrays of the same layout (pointers only).
* Many layers inside one captured CUDA graph: one plan per layer over static buffers, captured
  once, replayed per token (see ``SelectiveStateUpdatePlan``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .._arrays import CUPY, FLOAT_NAMES, backend_of, check_current_device, dtype_name
from .._compile import KernelRef, get_kernel
from .._launch import MAX_GRID_X
from .._params import Params
from .._plan import layout_key, loaded_ndarray_type, ndarray_type
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_same_dtype

OP = "selective_state_update"
KERNEL_FILE = "selective_state_update.cu"

_CTYPE = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
# Input dtype (x, dt, z, B, C, out) -> accepted state dtypes. fp64 inputs run fully in fp64.
STATE_DTYPES = {
    "float16": ("float32", "float16", "bfloat16"),
    "bfloat16": ("float32", "float16", "bfloat16"),
    "float32": ("float32", "float16", "bfloat16"),
    "float64": ("float64",),
}
# Input dtype -> dtype of A, D and dt_bias.
WEIGHT_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
INDEX_DTYPES = ("int32", "int64")
# Mirrors of SsuTraits in the kernel: state elements per 16-byte access, rows per lane group.
VEC_ELEMS = {"float32": 4, "float16": 8, "bfloat16": 8, "float64": 2}


def rows_per_group(state_dtype: str, tie: bool) -> int:
    """Mirror of SsuTraits::kRows: consecutive p rows owned by one lane group."""
    return 4 if tie or state_dtype == "float32" else 2


# Block sizes, largest first: the largest that still gives >= 2 blocks per SM, else 32 (small
# batches then spread over every SM). Must not exceed kMaxThreads in the kernel.
BLOCKS = (128, 64, 32)

ARG_NAMES = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices", "out")
# Arguments that may get vectorized (8/16-byte) accesses: state, A, B, C.
_ALIGN_ARGS = (0, 3, 4, 5)

PARAMS = Params("ssm::SelectiveStateUpdateParams", [
    ("state", "ptr"), ("x", "ptr"), ("dt", "ptr"), ("A", "ptr"), ("B", "ptr"), ("C", "ptr"),
    ("D", "ptr"), ("z", "ptr"), ("dt_bias", "ptr"), ("indices", "ptr"), ("out", "ptr"),
    ("batch", "int64_t"), ("heads", "int64_t"), ("headdim", "int64_t"), ("dstate", "int64_t"),
    ("heads_per_group", "int64_t"), ("pool", "int64_t"), ("tiles_per_head", "int64_t"),
    ("total_groups", "int64_t"),
    ("state_b", "int64_t"), ("state_h", "int64_t"), ("state_p", "int64_t"), ("state_n", "int64_t"),
    ("x_b", "int64_t"), ("x_h", "int64_t"), ("x_p", "int64_t"),
    ("dt_b", "int64_t"), ("dt_h", "int64_t"), ("dt_p", "int64_t"),
    ("z_b", "int64_t"), ("z_h", "int64_t"), ("z_p", "int64_t"),
    ("out_b", "int64_t"), ("out_h", "int64_t"), ("out_p", "int64_t"),
    ("A_h", "int64_t"), ("A_p", "int64_t"), ("A_n", "int64_t"),
    ("B_b", "int64_t"), ("B_g", "int64_t"), ("B_n", "int64_t"),
    ("C_b", "int64_t"), ("C_g", "int64_t"), ("C_n", "int64_t"),
    ("D_h", "int64_t"), ("D_p", "int64_t"),
    ("bias_h", "int64_t"), ("bias_p", "int64_t"),
    ("idx_stride", "int64_t"),
    ("lanes", "int32_t"), ("n_chunks", "int32_t"), ("dt_softplus", "int32_t"), ("idx_is_int64", "int32_t"),
    ("vec_state", "int32_t"), ("vec_A", "int32_t"), ("vec_B", "int32_t"), ("vec_C", "int32_t"),
])
# The 11 pointers lead the struct, in ARG_NAMES order: a launch packs them in one struct call
# in front of the per-layout tail.
_PTR_FIELDS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "indices", "out")
_PTRS = struct.Struct("<11Q")
assert tuple(PARAMS.names[:11]) == _PTR_FIELDS
assert all(PARAMS.dtype.fields[n][1] == 8 * i for i, n in enumerate(_PTR_FIELDS))


def kernel_ref(state_dtype: str, dtype: str, tie: bool) -> KernelRef:
    """The one place that turns a spec into a template instantiation."""
    return KernelRef(KERNEL_FILE,
                     f"ssm::selective_state_update<{_CTYPE[state_dtype]}, {_CTYPE[dtype]}, {int(bool(tie))}>")


@register(OP)
def variants(state_dtype: str | None = None, dtype: str | None = None, tie: bool | None = None) -> list[KernelRef]:
    refs = []
    for d, states in STATE_DTYPES.items():
        if dtype not in (None, d):
            continue
        for s in states:
            if state_dtype not in (None, s):
                continue
            for t in (False, True):
                if tie in (None, t):
                    refs.append(kernel_ref(s, d, t))
    return refs


# ---- validation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SsuSpec:
    """Shapes, dtypes and flags of one call (array-library independent)."""

    mamba2: bool
    batch: int
    heads: int
    headdim: int
    dstate: int
    groups: int
    pool: int
    state_dtype: str
    dtype: str
    has_D: bool
    has_z: bool
    has_dt_bias: bool
    has_indices: bool
    index_dtype: str | None
    dt_softplus: bool
    has_out: bool


def validate(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             state_batch_indices=None, out=None) -> SsuSpec:
    """Check every argument once; raise ValueError/TypeError naming it, expected vs got."""
    check_flag(OP, "dt_softplus", dt_softplus)
    check_ndim(OP, "state", state, (3, 4), "(B_pool, D, N) (Mamba-1) or (B_pool, H, P, N) (Mamba-2)")
    mamba2 = len(state.shape) == 4
    if mamba2:
        pool, H, P, N = (int(v) for v in state.shape)
        chan, letters = (H, P), "HP"
    else:
        pool, P, N = (int(v) for v in state.shape)
        H = 1
        chan, letters = (P,), "D"
    check_ndim(OP, "x", x, (len(chan) + 1,), f"({', '.join('B' + letters)})")
    batch = int(x.shape[0])
    act = (batch,) + chan
    act_letters = "B" + letters
    check_array(OP, "x", x, act, act_letters, FLOAT_NAMES)
    dtype = dtype_name(x)
    check_array(OP, "dt", dt, act, act_letters, FLOAT_NAMES)
    if z is not None:
        check_array(OP, "z", z, act, act_letters, FLOAT_NAMES)
    if N < 1:
        raise ValueError(f"{OP}: N (the last axis of 'state') must be >= 1, got shape {tuple(state.shape)}")
    if mamba2:
        check_ndim(OP, "B", B, (3,), "(B, G, N)")
        groups = int(B.shape[1])
        check_array(OP, "B", B, (batch, None, N), "BGN", FLOAT_NAMES)
        check_array(OP, "C", C, (batch, groups, N), "BGN", FLOAT_NAMES)
        if groups < 1 or H % groups != 0:
            raise ValueError(f"{OP}: the groups G = {groups} of 'B' (shape {tuple(B.shape)}) must divide "
                             f"H = {H} heads (and be >= 1)")
    else:
        groups = 1
        check_array(OP, "B", B, (batch, N), "BN", FLOAT_NAMES)
        check_array(OP, "C", C, (batch, N), "BN", FLOAT_NAMES)
    check_same_dtype(OP, ("x", "dt", "z", "B", "C"), (x, dt, z, B, C))
    wdt = WEIGHT_DTYPE[dtype]
    check_array(OP, "A", A, chan + (N,), letters + "N", (wdt,))
    if D is not None:
        check_array(OP, "D", D, chan, letters, (wdt,))
    if dt_bias is not None:
        check_array(OP, "dt_bias", dt_bias, chan, letters, (wdt,))
    check_array(OP, "state", state, state.shape, dtypes=STATE_DTYPES[dtype])
    index_dtype = None
    if state_batch_indices is None:
        check_array(OP, "state", state, act + (N,), act_letters + "N")
    else:
        check_array(OP, "state_batch_indices", state_batch_indices, (batch,), "B", INDEX_DTYPES)
        index_dtype = dtype_name(state_batch_indices)
    if out is not None:
        check_array(OP, "out", out, act, act_letters, (dtype,))
    for name, arr in (("state", state), ("out", out)):
        if arr is not None and any(s == 0 and n > 1 for s, n in zip(arr.strides, arr.shape)):
            raise ValueError(f"{OP}: argument '{name}' is written and must not have zero strides "
                             f"(a broadcast view), got strides {tuple(arr.strides)} for shape {tuple(arr.shape)}")
    return SsuSpec(mamba2, batch, H, P, N, groups, pool, dtype_name(state), dtype, D is not None,
                   z is not None, dt_bias is not None, state_batch_indices is not None, index_dtype,
                   bool(dt_softplus), out is not None)


# ---- layout: strides in head form, vector flags, the tied fast path ----------------------------

def _head_strides(spec: SsuSpec, arr, kind: str) -> tuple[int, ...]:
    """Element strides of ``arr`` in head form. kind: 'state' (b, h, p, n), 'act' (b, h, p),
    'chan' (h, p), 'A' (h, p, n), 'bc' (b, g, n), 'idx' (b,)."""
    if arr is None:
        return {"state": (0, 0, 0, 0), "act": (0, 0, 0), "chan": (0, 0), "A": (0, 0, 0),
                "bc": (0, 0, 0), "idx": (0,)}[kind]
    item = arr.dtype.itemsize
    s = tuple(int(v) // item for v in arr.strides)
    if spec.mamba2 or kind == "idx":
        return s
    if kind == "state":
        return (s[0], 0, s[1], s[2])
    if kind == "act":
        return (s[0], 0, s[1])
    if kind == "chan":
        return (0, s[0])
    if kind == "A":
        return (0, s[0], s[1])
    return (s[0], 0, s[1])  # bc: (B, N) -> (b, g = 0, n)


def _vector_align(arr, ptr: int, kvec: int, dstate: int) -> int:
    """The alignment (bytes) that lets every kVec-chunk of ``arr`` along its last axis (N) be
    accessed with one wide load/store, or 0 when the layout does not allow it."""
    item = arr.dtype.itemsize
    align = min(16, kvec * item)
    if dstate % kvec or arr.strides[-1] != item or ptr % align:
        return 0
    ok = all(s % align == 0 for s, n in zip(arr.strides[:-1], arr.shape[:-1]) if n > 1)
    return align if ok else 0


def _tied(spec: SsuSpec, A, dt, dt_bias) -> bool:
    """Mamba-2 fast path: A, dt, dt_bias constant along P (stride 0 there, e.g. from expand)."""
    if spec.headdim < 2:
        return False
    p_axis_A = 1 if spec.mamba2 else 0
    p_axis_act = 2 if spec.mamba2 else 1
    p_axis_chan = 1 if spec.mamba2 else 0
    return (A.strides[p_axis_A] == 0 and dt.strides[p_axis_act] == 0
            and (dt_bias is None or dt_bias.strides[p_axis_chan] == 0))


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


_sm_count: dict[int, int] = {}


def _num_sms(device: int) -> int:
    n = _sm_count.get(device)
    if n is None:
        import cupy

        n = _sm_count[device] = int(cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device))
    return n


@dataclass(frozen=True)
class LaunchConfig:
    """A launch of one layout, without pointers: what the kernel needs besides the 11 addresses."""

    tie: bool                  # constant-along-P fast path
    vec: tuple[int, ...]       # alignment needed by vectorized state/A/B/C (0: scalar accesses)
    grid: int
    block: int
    fields: dict               # the non-pointer fields of PARAMS

    @property
    def empty(self) -> bool:
        return self.fields["total_groups"] == 0


def launch_config(spec: SsuSpec, arrays, ptrs, sms: int) -> LaunchConfig:
    """Map a validated call onto the kernel: head-form strides, lane groups, grid, block."""
    state, x, dt, A, B, C, D, z, dt_bias, idx, out = arrays
    kvec = VEC_ELEMS[spec.state_dtype]
    tie = _tied(spec, A, dt, dt_bias)
    rows = rows_per_group(spec.state_dtype, tie)
    N = spec.dstate
    lanes = min(32, _next_pow2(-(-N // kvec)))
    n_chunks = -(-N // (lanes * kvec))
    tiles = -(-spec.headdim // rows)
    total_groups = spec.batch * spec.heads * tiles
    threads = total_groups * lanes
    block = BLOCKS[-1]
    for cand in BLOCKS:
        if -(-threads // cand) >= 2 * sms:
            block = cand
            break
    grid = max(1, -(-threads // block))
    if grid > MAX_GRID_X:
        raise ValueError(f"{OP}: {total_groups} lane groups need {grid} blocks, more than the grid "
                         f"limit {MAX_GRID_X}; split the batch")
    vec = tuple(_vector_align(arrays[i], ptrs[i], kvec, N) for i in _ALIGN_ARGS)
    sst = _head_strides(spec, state, "state")
    xs, dts, zs = (_head_strides(spec, a, "act") for a in (x, dt, z))
    if out is None:  # a fresh C-contiguous output per call
        outs = (spec.heads * spec.headdim, spec.headdim, 1)
    else:
        outs = _head_strides(spec, out, "act")
    As = _head_strides(spec, A, "A")
    Bs, Cs = _head_strides(spec, B, "bc"), _head_strides(spec, C, "bc")
    Ds, bs = _head_strides(spec, D, "chan"), _head_strides(spec, dt_bias, "chan")
    ids = _head_strides(spec, idx, "idx")
    fields = dict(
        batch=spec.batch, heads=spec.heads, headdim=spec.headdim, dstate=N,
        heads_per_group=max(1, spec.heads // spec.groups), pool=spec.pool, tiles_per_head=tiles,
        total_groups=total_groups,
        state_b=sst[0], state_h=sst[1], state_p=sst[2], state_n=sst[3],
        x_b=xs[0], x_h=xs[1], x_p=xs[2], dt_b=dts[0], dt_h=dts[1], dt_p=dts[2],
        z_b=zs[0], z_h=zs[1], z_p=zs[2], out_b=outs[0], out_h=outs[1], out_p=outs[2],
        A_h=As[0], A_p=As[1], A_n=As[2], B_b=Bs[0], B_g=Bs[1], B_n=Bs[2],
        C_b=Cs[0], C_g=Cs[1], C_n=Cs[2], D_h=Ds[0], D_p=Ds[1], bias_h=bs[0], bias_p=bs[1],
        idx_stride=ids[0], lanes=lanes, n_chunks=n_chunks, dt_softplus=int(spec.dt_softplus),
        idx_is_int64=int(spec.index_dtype == "int64"),
        vec_state=int(vec[0] > 0), vec_A=int(vec[1] > 0), vec_B=int(vec[2] > 0), vec_C=int(vec[3] > 0))
    return LaunchConfig(tie, vec, grid, block, fields)


class _Prepared:
    """Everything of one launch but the 11 pointers: kernel, grid, block, params tail."""

    __slots__ = ("spec", "cfg", "tie", "ref", "kernel", "grid", "block", "tail", "empty", "vec")

    def __init__(self, spec: SsuSpec, arrays: tuple, ptrs: list[int], device: int):
        cfg = launch_config(spec, arrays, ptrs, _num_sms(device))
        self.spec = spec
        self.cfg = cfg
        self.tie = cfg.tie
        self.vec = cfg.vec
        self.empty = cfg.empty
        self.tail = PARAMS.pack(**cfg.fields).tobytes()[_PTRS.size:]
        self.grid = (cfg.grid, 1, 1)
        self.block = (cfg.block, 1, 1)
        self.ref = kernel_ref(spec.state_dtype, spec.dtype, cfg.tie)
        self.kernel = get_kernel(self.ref)  # compile/load now, never inside a graph capture

    def params(self, ptrs) -> np.ndarray:
        """The params struct with these pointers: a 1-element structured array (passed by value)."""
        return np.frombuffer(_PTRS.pack(*ptrs) + self.tail, dtype=PARAMS.dtype)

    def launch(self, ptrs) -> None:
        if not self.empty:
            _call(self.kernel, self.grid, self.block, self.params(ptrs))

    def aligned(self, ptrs) -> bool:
        """Do these pointers keep the alignment the vector flags assumed?"""
        return all(not align or ptrs[i] % align == 0 for align, i in zip(self.vec, _ALIGN_ARGS))


_PARAM_AS_ARRAY = False  # the array route measured 70 us of host time per call at b1 (selective_scan, np.void: 19 us)


def _call(kernel, grid, block, prm: np.ndarray) -> None:
    """Launch with the params struct by value: CuPy copies a 1-element NumPy array's bytes
    (CNumpyArray); should a CuPy reject that, fall back to the structured scalar (np.void)."""
    global _PARAM_AS_ARRAY
    if _PARAM_AS_ARRAY:
        try:
            kernel(grid, block, (prm,))
            return
        except TypeError:
            _PARAM_AS_ARRAY = False
    kernel(grid, block, (prm[0],))


# ---- the cached functional path -------------------------------------------------------------

_CACHE: dict[tuple, _Prepared] = {}
_CACHE_MAX = 256
def _layout_key(arrays, dt_softplus, device):
    """(key, ptrs) for CuPy arrays, or (None, None) when some argument is not a cupy.ndarray
    (see ``ssmkit._plan.layout_key``: shapes, strides, dtypes, devices, alignment, flags)."""
    return layout_key(arrays, (dt_softplus, device))


def _run_cupy(arrays, dt_softplus):
    import cupy

    device = cupy.cuda.runtime.getDevice()
    key, ptrs = None, None
    if dt_softplus is True or dt_softplus is False:
        key, ptrs = _layout_key(arrays, dt_softplus, device)
    prep = _CACHE.get(key) if key is not None else None
    if prep is None:
        backend, named = backend_of(OP, dict(zip(ARG_NAMES, arrays)))
        arrays = tuple(named[n] for n in ARG_NAMES)
        spec = validate(*arrays[:9], dt_softplus=dt_softplus, state_batch_indices=arrays[9], out=arrays[10])
        _check_device(arrays, device)
        ptrs = [0 if a is None else int(a.data.ptr) for a in arrays]
        prep = _Prepared(spec, arrays, ptrs, device)
        key, _ = _layout_key(arrays, dt_softplus, device)
        if key is not None:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = prep
    out = arrays[10]
    if out is None:
        x = arrays[1]
        out = cupy.empty(x.shape, dtype=x.dtype)
        ptrs[10] = out.data.ptr
    prep.launch(ptrs)
    return out


def _check_device(arrays, device: int) -> None:
    check_current_device(OP, dict(zip(ARG_NAMES, arrays)), device)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
                           state_batch_indices=None, out=None):
    """One decode step of the selective SSM, updating ``state`` in place; returns ``out``.

    Mamba-1: state (B_pool, D, N); x, dt, z (B, D); A (D, N); B, C (B, N); D, dt_bias (D,).
    Mamba-2: state (B_pool, H, P, N); x, dt, z (B, H, P); A (H, P, N); B, C (B, G, N) with G
    dividing H; D, dt_bias (H, P). A, dt and dt_bias may be expanded views with stride 0 along P
    (as Mamba-2 passes them): the kernel then computes exp(A dt') once per (head, n).

        dt' = dt + dt_bias;  dt' = softplus(dt') if dt_softplus
        state = state * exp(A dt') + B dt' x          (broadcast over N)
        out = sum_n state C + D x;  out *= z sigmoid(z) if z is given

    D, z and dt_bias are optional. Without ``state_batch_indices`` state row b belongs to batch
    row b (B_pool = B). With it, (B,) int32/int64, batch row b uses state row
    ``state_batch_indices[b]``; a negative index marks padding: that row's state is not touched
    and its output is 0 (the GPU also treats an index >= B_pool as padding; the NumPy path
    raises). Indices must be distinct (as upstream, duplicates race).

    Dtypes: state fp32, fp16 or bf16 with x, dt, z, B, C one of fp32/fp16/bf16; A, D, dt_bias
    fp32; math in fp32. Or everything fp64 (state, inputs and weights), math in fp64.
    ``out`` (B, D) / (B, H, P) in x's dtype is written in full (allocated when None). Any strides.

    NumPy inputs run the float64 reference (``ssmkit.reference.selective_state_update``); CuPy
    inputs launch one kernel on the current stream without synchronizing. The first call of
    each layout (shapes, dtypes, strides, alignment) validates and prepares the launch; later
    calls with that layout only read pointers. Inside a CUDA graph capture pass ``out=`` (no
    allocation) after one eager call (so the kernel is compiled), or use
    ``SelectiveStateUpdatePlan``.
    """
    arrays = (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)
    nd = loaded_ndarray_type()
    if nd is not None and type(state) is nd:
        return _run_cupy(arrays, dt_softplus)
    backend, named = backend_of(OP, dict(zip(ARG_NAMES, arrays)))
    arrays = tuple(named[n] for n in ARG_NAMES)
    if backend == CUPY:
        return _run_cupy(arrays, dt_softplus)
    validate(*arrays[:9], dt_softplus=dt_softplus, state_batch_indices=arrays[9], out=arrays[10])
    return _run_numpy(arrays, dt_softplus)


def _run_numpy(arrays, dt_softplus):
    from ..reference import selective_state_update as ref

    state, x, dt, A, B, C, D, z, dt_bias, idx, out = arrays
    if idx is not None and idx.size and int(np.max(idx)) >= state.shape[0]:
        bad = int(np.max(idx))
        raise ValueError(f"{OP}: argument 'state_batch_indices' holds {bad}, outside the state pool "
                         f"of {state.shape[0]} rows (negative entries mark padding)")
    result = ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                 state_batch_indices=idx)
    if out is None:
        return result
    out[...] = result
    return out


# ---- the plan: validated once, pointers only per call ----------------------------------------

class SelectiveStateUpdatePlan:
    """``selective_state_update`` compiled and validated once for fixed shapes, dtypes and strides.

    ``plan = SelectiveStateUpdatePlan(state, x, dt, A, B, C, D=..., z=..., dt_bias=...,
    dt_softplus=True, state_batch_indices=..., out=...)`` takes CuPy arrays (the same arguments
    as ``selective_state_update``), validates them, compiles the kernel and binds the arrays
    (``out`` is allocated once when not given: ``plan.out``). Then:

    * ``plan()`` runs the step on the bound arrays and returns ``plan.out``;
    * ``plan(x=x2, state=s2, ...)`` first rebinds the named arrays (keyword only; the binding
      persists). Each must have the bound array's shape, dtype, strides and device (checked in
      a few hundred ns; ``check=False`` skips the check: only for callers that guarantee it).
      Optional arguments present at construction stay present; absent ones stay absent.

    The plan keeps references to its bound arrays, so their memory stays valid.

    Many layers in one CUDA graph: give each layer static buffers and a plan, capture the plans
    once on a non-default stream, then per token copy the new inputs into the static buffers
    and replay::

        plans = [SelectiveStateUpdatePlan(states[l], x[l], dt[l], A[l], B[l], C[l], D=D[l],
                                          z=z[l], dt_bias=dt_bias[l], dt_softplus=True,
                                          out=out[l]) for l in range(L)]
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for plan in plans:
                plan()
            graph = stream.end_capture()
        ...  # per token: fill x, dt, B, C, z in place, then
        graph.launch(stream)   # all L steps, updating states and writing out[l]

    (Construct the plans before the capture: construction compiles and may allocate.)
    """

    def __init__(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
                 state_batch_indices=None, out=None):
        import cupy

        named = dict(zip(ARG_NAMES, (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)))
        backend, named = backend_of(OP, named)
        arrays = [named[n] for n in ARG_NAMES]
        if backend != CUPY:
            raise TypeError(f"{OP}: SelectiveStateUpdatePlan needs CuPy (GPU) arrays; "
                            "NumPy inputs run the reference through selective_state_update")
        self.spec = validate(*arrays[:9], dt_softplus=dt_softplus, state_batch_indices=arrays[9], out=arrays[10])
        device = cupy.cuda.runtime.getDevice()
        _check_device(arrays, device)
        if arrays[10] is None:
            with cupy.cuda.Device(device):
                arrays[10] = cupy.empty(arrays[1].shape, dtype=arrays[1].dtype)
        self._device = device
        self._arrays = arrays
        self._ptrs = [0 if a is None else int(a.data.ptr) for a in arrays]
        self._sigs = [None if a is None else (a.shape, a.strides, a.dtype, a.device.id) for a in arrays]
        self._prep = _Prepared(self.spec, tuple(arrays), self._ptrs, device)
        # The params struct lives in one buffer: a call passes it as is; a rebind rewrites the
        # pointers in place (the driver copies kernel parameters at launch, and at capture).
        self._buf = bytearray(_PTRS.pack(*self._ptrs) + self._prep.tail)
        self._prm = np.frombuffer(self._buf, dtype=PARAMS.dtype)

    @property
    def out(self):
        return self._arrays[10]

    @property
    def tied(self) -> bool:
        """True when the constant-along-P fast path (Mamba-2 expand) is used."""
        return self._prep.tie

    @property
    def kernel(self) -> KernelRef:
        return self._prep.ref

    def arrays(self) -> dict:
        """The bound arrays by argument name."""
        return dict(zip(ARG_NAMES, self._arrays))

    def __call__(self, *, state=None, x=None, dt=None, A=None, B=None, C=None, D=None, z=None,
                 dt_bias=None, state_batch_indices=None, out=None, check: bool = True):
        if not (state is None and x is None and dt is None and A is None and B is None and C is None
                and D is None and z is None and dt_bias is None and state_batch_indices is None
                and out is None):
            self._rebind((state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out), check)
        prep = self._prep
        if not prep.empty:
            _call(prep.kernel, prep.grid, prep.block, self._prm)
        return self._arrays[10]

    def _rebind(self, new, check: bool) -> None:
        ptrs = list(self._ptrs)
        for i, a in enumerate(new):
            if a is None:
                continue
            name = ARG_NAMES[i]
            if check:
                sig = self._sigs[i]
                if sig is None:
                    raise ValueError(f"{OP}: plan was built without '{name}'; build a new plan to add it")
                if type(a) is not ndarray_type():
                    raise TypeError(f"{OP}: argument '{name}' must be a cupy.ndarray, got {type(a).__name__}")
                got = (a.shape, a.strides, a.dtype, a.device.id)
                if got != sig:
                    raise ValueError(f"{OP}: argument '{name}' must match the plan's layout "
                                     f"(shape, strides, dtype, device) {sig}, got {got}")
            ptrs[i] = a.data.ptr
        if check and not self._prep.aligned(ptrs):
            raise ValueError(f"{OP}: a rebound state/A/B/C array is not 16-byte aligned like the one the "
                             "plan was built for; build a new plan")
        for i, a in enumerate(new):
            if a is not None:
                self._arrays[i] = a
        self._ptrs = ptrs
        _PTRS.pack_into(self._buf, 0, *ptrs)


selective_state_update.plan = SelectiveStateUpdatePlan  # type: ignore[attr-defined]

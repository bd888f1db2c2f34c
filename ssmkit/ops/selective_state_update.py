"""selective_state_update: one decode step of the Mamba selective SSM, in place on the state.

Shapes (B batch, D channels, N state, H heads, P head dim, G groups):

    Mamba-1:  state (B_pool, D, N); x, dt, z, out (B, D); A (D, N); B, C (B, N); D, dt_bias (D,)
    Mamba-2:  state (B_pool, H, P, N); x, dt, z, out (B, H, P); A (H, P, N); B, C (B, G, N)
              with G dividing H (head h reads group h // (H / G)); D, dt_bias (H, P)

Math: dt' = dt + dt_bias (softplus'ed with ``dt_softplus``); state = state * exp(A dt') +
B dt' x; out = sum_n state C + D x; out *= silu(z). Kernel: kernels_cu/selective_state_update.cu.

Dtypes (``dtype_rules``): every argument is read in its own dtype and the math runs in fp32
(fp64 for fp64 x), as upstream's Triton kernel loads each argument in its own dtype. The kernel
reads x, dt, z, out in x's dtype; B, C in x's dtype or fp32; A in fp32; D and dt_bias each in
fp32, fp16 or bf16 (its own, chosen per call); the state in fp32, fp16 or bf16 (fp64 x: fp64
state, A, B, C). An argument the kernel does not read in its own dtype but can hold exactly in a
wider one (a 16-bit A; 16-bit dt, z, B, C with fp32 x; 16-bit B/C not both in x's dtype) is
widened on the host, one extra copy per call; nothing is ever narrowed: the rest raises TypeError.

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

from .. import _fork
from .._arrays import CUPY, FLOAT_NAMES, backend_of, check_current_device, dtype_name
from .._compile import KernelRef, get_kernel
from .._launch import MAX_GRID_X
from .._params import Params
from .._plan import layout_key, loaded_ndarray_type, ndarray_type
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_written

OP = "selective_state_update"
KERNEL_FILE = "selective_state_update.cu"

_CTYPE = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
# x's dtype (x, dt, z, out) -> accepted state dtypes (the state is written in place: never
# converted). fp64 x runs fully in fp64.
STATE_DTYPES = {
    "float16": ("float32", "float16", "bfloat16"),
    "bfloat16": ("float32", "float16", "bfloat16"),
    "float32": ("float32", "float16", "bfloat16"),
    "float64": ("float64",),
}
# x's dtype -> the compute type, which is also the kernel's type of A (and the B/C type when
# B/C are not both in x's dtype).
COMPUTE_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
# x's dtype -> the kernel's B/C types (template parameter TBC): x's own, or the compute type.
BC_DTYPES = {"float16": ("float16", "float32"), "bfloat16": ("bfloat16", "float32"),
             "float32": ("float32",), "float64": ("float64",)}
# dtype -> the wider dtypes that hold each of its values exactly (a lossless widening).
WIDENS_TO = {"float16": ("float32", "float64"), "bfloat16": ("float32", "float64"),
             "float32": ("float64",), "float64": ()}
# Storage type codes of D and dt_bias (kScalar* in the kernel).
SCALAR_CODE = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
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
    ("D_type", "int32_t"), ("bias_type", "int32_t"),
])
# The 11 pointers lead the struct, in ARG_NAMES order: a launch packs them in one struct call
# in front of the per-layout tail.
_PTR_FIELDS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "indices", "out")
_PTRS = struct.Struct("<11Q")
assert tuple(PARAMS.names[:11]) == _PTR_FIELDS
assert all(PARAMS.dtype.fields[n][1] == 8 * i for i, n in enumerate(_PTR_FIELDS))


def kernel_ref(state_dtype: str, dtype: str, tie: bool, bc_dtype: str | None = None) -> KernelRef:
    """The one place that turns a spec into a template instantiation: state type, x's type
    (x, dt, z, out), B/C type (None: x's), tied fast path. D and dt_bias are typed per call."""
    bc = dtype if bc_dtype is None else bc_dtype
    return KernelRef(KERNEL_FILE, f"ssm::selective_state_update<{_CTYPE[state_dtype]}, {_CTYPE[dtype]}, "
                                  f"{_CTYPE[bc]}, {int(bool(tie))}>")


@register(OP)
def variants(state_dtype: str | None = None, dtype: str | None = None, tie: bool | None = None,
             bc_dtype: str | None = None) -> list[KernelRef]:
    """Every instantiation (30 + 2 fp64): 3 state types x the 5 (x, B/C) type pairs x tie."""
    refs = []
    for d, states in STATE_DTYPES.items():
        if dtype not in (None, d):
            continue
        for s in states:
            if state_dtype not in (None, s):
                continue
            for bc in BC_DTYPES[d]:
                if bc_dtype not in (None, bc):
                    continue
                for t in (False, True):
                    if tie in (None, t):
                        refs.append(kernel_ref(s, d, t, bc))
    return refs


# ---- dtype rules ----------------------------------------------------------------------------

def _accepted(target: str) -> tuple[str, ...]:
    """Dtypes that are ``target`` or widen to it exactly."""
    return tuple(t for t in FLOAT_NAMES if t == target or target in WIDENS_TO[t])


@dataclass(frozen=True)
class DtypeRules:
    """How a call's dtypes map onto the kernel: its template types, the per-call types of D and
    dt_bias, and the arguments widened on the host first (argument index in ARG_NAMES, dtype)."""

    state: str
    x: str
    bc: str
    D: str | None
    dt_bias: str | None
    widen: tuple[tuple[int, str], ...]


def dtype_rules(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> DtypeRules:
    """The dtype half of ``validate`` (shapes are checked there): raises TypeError naming the
    argument, its dtype and the dtypes it may have.

    * x: fp16, bf16, fp32 or fp64; it fixes the compute type (fp32; fp64 for fp64 x).
    * state: fp32, fp16 or bf16 (fp64 with fp64 x); written in place, so never converted.
    * dt, z: x's dtype, or a narrower float that widens to it exactly (16-bit with fp32 x).
    * B, C: both in x's dtype (read as such), else each the compute type or narrower.
    * A: the compute type or narrower.  D, dt_bias: each the compute type or narrower, read in
      its own dtype (no copy).
    Anything wider than what the kernel reads (fp32 dt with bf16 x, fp64 A with fp32 x) would
    have to be narrowed: refused.
    """
    xd = dtype_name(x)
    if xd not in FLOAT_NAMES:
        raise TypeError(f"{OP}: argument 'x' must have dtype in {FLOAT_NAMES}, got {xd}")
    comp = COMPUTE_DTYPE[xd]
    sd = dtype_name(state)
    if sd not in STATE_DTYPES[xd]:
        raise TypeError(f"{OP}: argument 'state' must have dtype in {STATE_DTYPES[xd]} (with {xd} x; the state "
                        f"is updated in place, never converted), got {sd}")
    widen = []
    for name, arr in (("dt", dt), ("z", z)):
        if arr is None:
            continue
        got, ok = dtype_name(arr), _accepted(xd)
        if got not in ok:
            raise TypeError(f"{OP}: argument '{name}' must have dtype in {ok} (x is {xd}: x, dt, z and out share "
                            f"one dtype; a narrower float is widened, a wider one never narrowed), got {got}")
        if got != xd:
            widen.append((ARG_NAMES.index(name), xd))
    bd, cd = dtype_name(B), dtype_name(C)
    bc = xd if bd == xd and cd == xd else comp
    for name, got in (("B", bd), ("C", cd)):
        ok = _accepted(comp)
        if got not in ok:
            raise TypeError(f"{OP}: argument '{name}' must have dtype in {ok} (with {xd} x), got {got}")
        if got != bc:
            widen.append((ARG_NAMES.index(name), bc))
    got = dtype_name(A)
    if got not in _accepted(comp):
        raise TypeError(f"{OP}: argument 'A' must have dtype in {_accepted(comp)} (with {xd} x), got {got}")
    if got != comp:
        widen.append((ARG_NAMES.index("A"), comp))
    scalar = {}
    for name, arr in (("D", D), ("dt_bias", dt_bias)):
        if arr is None:
            scalar[name] = None
            continue
        got = dtype_name(arr)
        if got not in _accepted(comp):
            raise TypeError(f"{OP}: argument '{name}' must have dtype in {_accepted(comp)} (with {xd} x), got {got}")
        scalar[name] = got
    return DtypeRules(sd, xd, bc, scalar["D"], scalar["dt_bias"], tuple(sorted(widen)))


def _widen(arr, dtype: str):
    """``arr`` copied into the wider ``dtype`` (every value exact), C-contiguous. Axes of stride 0
    (A, dt expanded along P) stay broadcast, so the tied fast path still applies."""
    import cupy

    if any(s == 0 and n > 1 for s, n in zip(arr.strides, arr.shape)):
        core = arr[tuple(slice(0, 1) if s == 0 and n > 1 else slice(None) for s, n in zip(arr.strides, arr.shape))]
        return cupy.broadcast_to(core.astype(dtype, order="C"), arr.shape)
    return arr.astype(dtype, order="C")


def _widened(widen, arrays: tuple) -> tuple:
    """The call's arrays with the listed ones widened (one copy each)."""
    if not widen:
        return arrays
    out = list(arrays)
    for i, dtype in widen:
        out[i] = _widen(arrays[i], dtype)
    return tuple(out)


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
    bc_dtype: str | None = None               # the kernel's B/C type (None: x's dtype)
    D_dtype: str | None = None                # D's dtype, read as such (None: fp32 or absent)
    bias_dtype: str | None = None             # dt_bias's dtype, likewise
    widen: tuple[tuple[int, str], ...] = ()   # (index in ARG_NAMES, dtype): widened per call


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
    check_array(OP, "dt", dt, act, act_letters)
    if z is not None:
        check_array(OP, "z", z, act, act_letters)
    if N < 1:
        raise ValueError(f"{OP}: N (the last axis of 'state') must be >= 1, got shape {tuple(state.shape)}")
    if mamba2:
        check_ndim(OP, "B", B, (3,), "(B, G, N)")
        groups = int(B.shape[1])
        check_array(OP, "B", B, (batch, None, N), "BGN")
        check_array(OP, "C", C, (batch, groups, N), "BGN")
        if groups < 1 or H % groups != 0:
            raise ValueError(f"{OP}: the groups G = {groups} of 'B' (shape {tuple(B.shape)}) must divide "
                             f"H = {H} heads (and be >= 1)")
    else:
        groups = 1
        check_array(OP, "B", B, (batch, N), "BN")
        check_array(OP, "C", C, (batch, N), "BN")
    check_array(OP, "A", A, chan + (N,), letters + "N")
    if D is not None:
        check_array(OP, "D", D, chan, letters)
    if dt_bias is not None:
        check_array(OP, "dt_bias", dt_bias, chan, letters)
    rules = dtype_rules(state, x, dt, A, B, C, D, z, dt_bias)
    index_dtype = None
    if state_batch_indices is None:
        check_array(OP, "state", state, act + (N,), act_letters + "N")
    else:
        check_array(OP, "state", state, (pool,) + chan + (N,), "B" + letters + "N")
        check_array(OP, "state_batch_indices", state_batch_indices, (batch,), "B", INDEX_DTYPES)
        index_dtype = dtype_name(state_batch_indices)
    check_written(OP, "state", state)
    if out is not None:
        check_array(OP, "out", out, act, act_letters, (dtype,))
        check_written(OP, "out", out)
    return SsuSpec(mamba2, batch, H, P, N, groups, pool, rules.state, dtype, D is not None,
                   z is not None, dt_bias is not None, state_batch_indices is not None, index_dtype,
                   bool(dt_softplus), out is not None, rules.bc, rules.D, rules.dt_bias, rules.widen)


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
        vec_state=int(vec[0] > 0), vec_A=int(vec[1] > 0), vec_B=int(vec[2] > 0), vec_C=int(vec[3] > 0),
        D_type=SCALAR_CODE[spec.D_dtype or "float32"], bias_type=SCALAR_CODE[spec.bias_dtype or "float32"])
    return LaunchConfig(tie, vec, grid, block, fields)


class _Prepared:
    """Everything of one launch but the 11 pointers: kernel, grid, block, params tail."""

    __slots__ = ("spec", "cfg", "tie", "ref", "kernel", "grid", "block", "tail", "empty", "vec", "widen")

    def __init__(self, spec: SsuSpec, arrays: tuple, ptrs: list[int], device: int):
        """``arrays``/``ptrs``: what the kernel reads, i.e. after ``_widened`` (spec.widen)."""
        cfg = launch_config(spec, arrays, ptrs, _num_sms(device))
        self.spec = spec
        self.widen = spec.widen
        self.cfg = cfg
        self.tie = cfg.tie
        self.vec = cfg.vec
        self.empty = cfg.empty
        self.tail = PARAMS.pack(**cfg.fields).tobytes()[_PTRS.size:]
        self.grid = (cfg.grid, 1, 1)
        self.block = (cfg.block, 1, 1)
        self.ref = kernel_ref(spec.state_dtype, spec.dtype, cfg.tie, spec.bc_dtype)
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

    if _fork.FORKED:          # a forked child: one clear error before the first CUDA call
        _fork.check()
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
        key, _ = _layout_key(arrays, dt_softplus, device)
        arrays = _widened(spec.widen, arrays)
        ptrs = [0 if a is None else int(a.data.ptr) for a in arrays]
        prep = _Prepared(spec, arrays, ptrs, device)
        if key is not None:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = prep
    elif prep.widen:
        # Fresh widened copies each call: the prepared strides and vector flags still hold (the
        # copies are C-contiguous, broadcast axes kept) unless the pool hands out an address the
        # vector flags cannot use; then this call gets its own launch.
        arrays = _widened(prep.widen, arrays)
        for i, _ in prep.widen:
            ptrs[i] = int(arrays[i].data.ptr)
        if not prep.aligned(ptrs):
            prep = _Prepared(prep.spec, arrays, ptrs, device)
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

    Edge inputs: B, D (H or P) may be 0: nothing is launched, the state is untouched and out is
    empty; N must be >= 1. Every argument may have any strides, negative ones included; ``state``
    and ``out`` are written: they must be writeable, with no elements sharing memory. NaN and inf
    propagate, never turned into finite numbers: a NaN in x, dt or dt_bias makes that channel's
    new state and output NaN (in B: the whole group's; in A[.., n]: state[.., n] and the output);
    padding rows are neither read nor written.

    Dtypes (math in fp32; in fp64 for fp64 x), each argument read in its own dtype as upstream:

    * x fp16, bf16, fp32 or fp64; ``out`` (B, D) / (B, H, P) in x's dtype, written in full
      (allocated when None);
    * state fp32, fp16 or bf16 (fp64 with fp64 x), updated in its dtype;
    * dt, z in x's dtype; B, C in x's dtype or fp32; A fp32; D and dt_bias each fp32, fp16 or
      bf16 independently (fp64 x: fp64 state, A, B, C; D, dt_bias any float). This covers
      upstream's Mamba-1 step (bf16 state, x, dt, z, B, C, D, dt_bias with fp32 A), transformers'
      Mamba (bf16 D with fp32 dt_bias) and fp32 states with 16-bit inputs;
    * exact widenings done here, one extra copy kernel per widened argument per call: a 16-bit
      A; 16-bit dt, z (or B, C) with fp32 x; B/C in mixed or other 16-bit dtypes (to fp32);
      anything narrower than fp64 with fp64 x. Such calls allocate: pass those arguments in the
      kernel's dtype for CUDA-graph capture (``SelectiveStateUpdatePlan`` refuses them).
    * refused (TypeError naming the argument, its dtype and the accepted ones), since reading
      them would round: dt or z wider than x (fp32 dt with bf16 x) or in the other 16-bit
      dtype; an fp64 state, A, B, C, D or dt_bias with non-fp64 x; a non-fp64 state with fp64 x.

    Any strides.

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

    The plan keeps references to its bound arrays, so their memory stays valid. It reads every
    array in place: arguments ``selective_state_update`` would widen on each call (a 16-bit A,
    fp16 dt with fp32 x, ...; see its Dtypes) raise TypeError here; pass them in the kernel's
    dtype. The dtypes models pass (bf16 state, x, B, C, D and dt_bias with fp32 A; fp32 dt_bias
    with bf16 D; fp32 state with 16-bit inputs) need no copy.

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
        named = dict(zip(ARG_NAMES, (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)))
        backend, named = backend_of(OP, named)
        arrays = [named[n] for n in ARG_NAMES]
        if backend != CUPY:
            raise TypeError(f"{OP}: SelectiveStateUpdatePlan needs CuPy (GPU) arrays; "
                            "NumPy inputs run the reference through selective_state_update")
        import cupy

        self.spec = validate(*arrays[:9], dt_softplus=dt_softplus, state_batch_indices=arrays[9], out=arrays[10])
        if self.spec.widen:
            i, want = self.spec.widen[0]
            name = ARG_NAMES[i]
            raise TypeError(f"{OP}: SelectiveStateUpdatePlan does not convert arguments: '{name}' is "
                            f"{dtype_name(arrays[i])} but the kernel reads it as {want} (a widening copy on every "
                            f"call, which a plan or a captured graph would not redo); pass '{name}' as {want}")
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
        if _fork.FORKED:
            _fork.check()
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

"""selective_scan: Mamba-1's selective scan, forward and backward. Kernels:
kernels_cu/selective_scan_fwd.cu and kernels_cu/selective_scan_bwd.cu.

Shapes: u, delta, z, out (B, D, L); A (D, N) real or complex; B and C each constant (D, N) or
variable (B, N, L) / (B, G, N, L) with G dividing D; D, delta_bias (D,); initial_state and
last_state (B, D, N). Complex A takes complex B/C (complex64/complex128 arrays, not upstream's
real/imaginary interleaving along L) and reads out y = 2 Re(sum_n C h).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._arrays import CUPY, backend_of, check_current_device, dtype_name
from .._compile import KernelRef
from .._launch import prepare
from .._plan import PlanCache, layout_key
from .reduce_partials import FoldPlan
from .._params import Params, ptr, strides_elems
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_range, check_written

OP = "selective_scan"
IN_DTYPES = ("float16", "bfloat16", "float32", "float64")
_IN_C = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
_W_C = {"float32": "float", "complex64": "ssm::complex<float>",
        "float64": "double", "complex128": "ssm::complex<double>"}
_ITEMSIZE = {"float32": 4, "complex64": 8, "float64": 8, "complex128": 16}
MAX_N = 2048           # bounded only by shared memory: 4 N state values per warp in the backward

SAVE_EVERY = 256       # kSaveEvery in selective_scan_fwd.cu: saved-state spacing = backward chunk
BWD_ITEMS = 8          # kBwdItems in selective_scan_bwd.cu
# 8 channels (warps) per block: the warps of a block read the same variable B/C rows, so 7 of
# 8 reads hit L1. The backward with 16 warps per block halves its dB/dC partials but one
# 512-thread block per SM idles at every per-state barrier: b8 d1536 l2048 n16 bf16 kernel
# 1.80 ms with 16, 1.61 ms with 8 (two blocks per SM).
WARPS_PER_BLOCK = 8
# Default of selective_scan_bwd(deterministic=None). False: variable dB/dC are added with fp32
# atomics (block sums, one atomic per (l, n) per block), 4-8% faster fwd+bwd than the fixed-order
# partials on the anchor rows (benchmarks/probe_scan_bwd.py, NOTES.md).
DETERMINISTIC_DEFAULT = False
# Backward split along time (segments after a cheap carry pass) when the grid fills the GPU in a
# poor number of waves: the carry pass costs about this fraction of a full backward over the same
# steps. Measured (ncu, b1 d5120 l8192 n16, 2 segments): carry 0.297 ms over half the steps
# against 2.94 ms for the main pass over all of them (fp32; bf16 0.276 / 2.52): 0.20.
CARRY_COST = 0.20
MAX_SEGMENTS = 16
SM_RESERVED_SMEM = 1024 + 2688     # per block: the driver's reservation + the backward's static smem (ptxas)
SM_SMEM = 228 * 1024
SMEM_LIMIT = 227 * 1024  # sm_80/sm_90 opt-in limit; blocks shrink (fewer warps) above it


def weight_dtypes(in_dtype: str) -> tuple[str, str]:
    """(real, complex) weight/state dtypes for an input dtype: fp32 state, fp64 for fp64 inputs."""
    return ("float64", "complex128") if in_dtype == "float64" else ("float32", "complex64")


@dataclass(frozen=True)
class KernelConfig:
    in_dtype: str
    w_dtype: str
    var_b: bool
    var_c: bool
    items: int        # forward steps per lane


def kernel_config(in_dtype: str, w_dtype: str, var_b: bool, var_c: bool) -> KernelConfig:
    """The one place where a problem becomes template parameters."""
    # Real fp16/bf16/fp32: 16 steps per lane (chunk 512): half the warp-scan work per element.
    # Measured at b8 d1536 l2048 n16, kernel alone: bf16 0.454 -> 0.370 ms, fp32 0.692 -> 0.661.
    # Complex and fp64 values are twice as wide: 8 (registers).
    items = 8 if (w_dtype.startswith("complex") or in_dtype == "float64") else 16
    return KernelConfig(in_dtype, w_dtype, var_b, var_c, items)


def fwd_ref(cfg: KernelConfig) -> KernelRef:
    return KernelRef("selective_scan_fwd.cu",
                     f"ssm::selective_scan_fwd<{_IN_C[cfg.in_dtype]}, {_W_C[cfg.w_dtype]}, "
                     f"{str(cfg.var_b).lower()}, {str(cfg.var_c).lower()}, {cfg.items}>")


def bwd_ref(cfg: KernelConfig) -> KernelRef:
    return KernelRef("selective_scan_bwd.cu",
                     f"ssm::selective_scan_bwd<{_IN_C[cfg.in_dtype]}, {_W_C[cfg.w_dtype]}, "
                     f"{str(cfg.var_b).lower()}, {str(cfg.var_c).lower()}>")


def fwd_smem(cfg: KernelConfig, warps: int, N: int) -> int:
    """Bytes of dynamic shared memory, mirroring selective_scan_fwd.cu: the carried state."""
    return warps * N * _ITEMSIZE[cfg.w_dtype]


def bwd_smem(cfg: KernelConfig, warps: int, N: int) -> int:
    """Bytes of dynamic shared memory, mirroring the layout in selective_scan_bwd.cu."""
    s = _ITEMSIZE[cfg.w_dtype]
    n_var = int(cfg.var_b) + int(cfg.var_c)
    pad = max(16 // s, 1)
    slices = (2 * 2 * warps * 32 * (BWD_ITEMS + pad) * s) if n_var else 0   # padded rows
    per_warp = warps * N * s * (2 + (not cfg.var_b) + (not cfg.var_c))
    return slices + per_warp


def _all_configs(dtype=None):
    for in_dt in IN_DTYPES:
        if dtype not in (None, in_dt):
            continue
        for w_dt in weight_dtypes(in_dt):
            for var_b in (False, True):
                for var_c in (False, True):
                    yield kernel_config(in_dt, w_dt, var_b, var_c)


@register(OP)
def variants(dtype: str | None = None) -> list[KernelRef]:
    out = []
    for cfg in _all_configs(dtype):
        out += [fwd_ref(cfg), bwd_ref(cfg)]
    return out


PARAMS = Params("ssm::SelectiveScanParams", [
    *[(n, "ptr") for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state",
                           "out", "last_state", "saved_states", "y_saved", "dout", "dlast_state", "du",
                           "ddelta", "dz", "dinitial_state", "dA_part", "dB_part", "dC_part",
                           "dD_part", "ddelta_bias_part")],
    *[(n, "int64_t") for n in ("batch", "dim", "seqlen", "dstate", "n_groups", "dim_per_group",
                               "n_saved", "blocks_per_group",
                               "u_b", "u_d", "u_l", "delta_b", "delta_d", "delta_l", "z_b", "z_d",
                               "z_l", "out_b", "out_d", "out_l", "A_d", "A_n", "B_b", "B_g", "B_n",
                               "B_l", "C_b", "C_g", "C_n", "C_l", "D_s", "delta_bias_s", "init_b",
                               "init_d", "init_n", "dout_b", "dout_d", "dout_l", "dlast_b",
                               "dlast_d", "dlast_n", "du_b", "du_d", "du_l", "ddelta_b", "ddelta_d",
                               "ddelta_l", "dz_b", "dz_d", "dz_l")],
    ("delta_softplus", "int32_t"), ("vec_ok", "int32_t"), ("bc_atomic", "int32_t"),
    ("carry", "ptr"), ("n_seg", "int64_t"), ("seg_chunks", "int64_t"), ("carry_pass", "int32_t"),
])


@dataclass(frozen=True)
class SelectiveScanSpec:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    groups: int
    in_dtype: str
    w_dtype: str
    var_b: bool
    var_c: bool
    has_D: bool
    has_z: bool
    has_delta_bias: bool
    delta_softplus: bool
    has_initial: bool

    @property
    def complex(self) -> bool:
        return self.w_dtype.startswith("complex")

    @property
    def empty(self) -> bool:
        """A zero-size B, D or L: nothing to compute, no kernel launch."""
        return self.batch * self.dim * self.seqlen == 0

    @property
    def n_saved(self) -> int:
        return -(-self.seqlen // SAVE_EVERY)

    @property
    def config(self) -> KernelConfig:
        return kernel_config(self.in_dtype, self.w_dtype, self.var_b, self.var_c)


def _bc_layout(name, X, Bsz, Dsz, N, L, w_dtype, in_dtype):
    """Validate B or C: constant (D, N) or variable (B, N, L) / (B, G, N, L). Returns (var, G)."""
    complex_ = w_dtype.startswith("complex")
    check_ndim(OP, name, X, (2, 3, 4), f"constant (D, N) = ({Dsz}, {N}) or variable (B, N, L) = "
                                       f"({Bsz}, {N}, {L}) or (B, G, N, L)")
    if X.ndim == 2:
        check_array(OP, name, X, (Dsz, N), "DN", dtypes=(w_dtype,))
        return False, 1
    var_dtype = w_dtype if complex_ else in_dtype
    if X.ndim == 3:
        check_array(OP, name, X, (Bsz, N, L), "BNL", dtypes=(var_dtype,))
        return True, 1
    G = X.shape[1]
    check_array(OP, name, X, (Bsz, G, N, L), "BGNL", dtypes=(var_dtype,))
    if G < 1 or Dsz % G:
        raise ValueError(f"{OP}: groups G = {G} of argument '{name}' must divide D = {Dsz}")
    return True, G


def validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out=None) -> SelectiveScanSpec:
    """Check every forward argument once (``out``: the optional preallocated output)."""
    check_flag(OP, "delta_softplus", delta_softplus)
    check_ndim(OP, "u", u, (3,), "(B, D, L)")
    Bsz, Dsz, L = (int(s) for s in u.shape)
    check_array(OP, "u", u, (Bsz, Dsz, L), "BDL", dtypes=IN_DTYPES)
    in_dt = dtype_name(u)
    check_array(OP, "delta", delta, (Bsz, Dsz, L), "BDL", dtypes=(in_dt,))
    real_w, complex_w = weight_dtypes(in_dt)
    check_ndim(OP, "A", A, (2,), "(D, N)")
    check_array(OP, "A", A, (Dsz, None), "DN", dtypes=(real_w, complex_w))
    N = int(A.shape[1])
    check_range(OP, "N (A.shape[1])", N, 1, MAX_N)
    w_dt = dtype_name(A)
    var_b, gb = _bc_layout("B", B, Bsz, Dsz, N, L, w_dt, in_dt)
    var_c, gc = _bc_layout("C", C, Bsz, Dsz, N, L, w_dt, in_dt)
    if var_b and var_c and gb != gc:
        raise ValueError(f"{OP}: B and C must have the same number of groups, got G = {gb} and {gc}")
    groups = gb if var_b else gc
    if D is not None:
        check_array(OP, "D", D, (Dsz,), "D", dtypes=(real_w,))
    if delta_bias is not None:
        check_array(OP, "delta_bias", delta_bias, (Dsz,), "D", dtypes=(real_w,))
    if z is not None:
        check_array(OP, "z", z, (Bsz, Dsz, L), "BDL", dtypes=(in_dt,))
    if initial_state is not None:
        check_array(OP, "initial_state", initial_state, (Bsz, Dsz, N), "BDN", dtypes=(w_dt,))
    if out is not None:
        check_array(OP, "out", out, (Bsz, Dsz, L), "BDL", dtypes=(in_dt,))
        check_written(OP, "out", out)
    return SelectiveScanSpec(Bsz, Dsz, L, N, groups, in_dt, w_dt, var_b, var_c, D is not None,
                             z is not None, delta_bias is not None, delta_softplus,
                             initial_state is not None)


def _bc_strides(X, var):
    s = strides_elems(X)
    if not var:                      # constant (D, N): the channel plays the group's role
        return {"b": 0, "g": s[0], "n": s[1], "l": 0}
    if X.ndim == 3:
        return {"b": s[0], "g": 0, "n": s[1], "l": s[2]}
    return {"b": s[0], "g": s[1], "n": s[2], "l": s[3]}


def _launch_shape(spec: SelectiveScanSpec, smem_fn) -> tuple[int, int, int]:
    """(warps per block, blocks per group, shared bytes), shrinking the block to fit shared memory."""
    cfg = spec.config
    dpg = spec.dim // spec.groups
    warps = WARPS_PER_BLOCK
    while warps > 1 and (smem_fn(cfg, warps, spec.dstate) > SMEM_LIMIT or warps >= 2 * dpg):
        warps //= 2
    smem = smem_fn(cfg, warps, spec.dstate)
    if smem > SMEM_LIMIT:
        raise ValueError(f"{OP}: N = {spec.dstate} needs {smem} bytes of shared memory per block, "
                         f"more than the {SMEM_LIMIT} available")
    return warps, -(-dpg // warps), smem


def _common_fields(spec, u, delta, A, B, C, D, z, delta_bias, initial_state):
    su, sd, sa = strides_elems(u), strides_elems(delta), strides_elems(A)
    sb, sc = _bc_strides(B, spec.var_b), _bc_strides(C, spec.var_c)
    f = dict(u=ptr(u), delta=ptr(delta), A=ptr(A), B=ptr(B), C=ptr(C), D=ptr(D), z=ptr(z),
             delta_bias=ptr(delta_bias), initial_state=ptr(initial_state),
             batch=spec.batch, dim=spec.dim, seqlen=spec.seqlen, dstate=spec.dstate,
             n_groups=spec.groups, dim_per_group=spec.dim // spec.groups, n_saved=spec.n_saved,
             u_b=su[0], u_d=su[1], u_l=su[2], delta_b=sd[0], delta_d=sd[1], delta_l=sd[2],
             A_d=sa[0], A_n=sa[1], B_b=sb["b"], B_g=sb["g"], B_n=sb["n"], B_l=sb["l"],
             C_b=sc["b"], C_g=sc["g"], C_n=sc["n"], C_l=sc["l"],
             delta_softplus=int(spec.delta_softplus))
    if z is not None:
        sz = strides_elems(z)
        f.update(z_b=sz[0], z_d=sz[1], z_l=sz[2])
    if D is not None:
        f["D_s"] = strides_elems(D)[0]
    if delta_bias is not None:
        f["delta_bias_s"] = strides_elems(delta_bias)[0]
    if initial_state is not None:
        si = strides_elems(initial_state)
        f.update(init_b=si[0], init_d=si[1], init_n=si[2])
    return f


def _rows_aligned(X) -> bool:
    """Unit stride along the last axis and every row start on a 16-byte boundary."""
    if X is None:
        return True
    item = X.dtype.itemsize
    if X.shape[-1] > 1 and X.strides[-1] != item:
        return False
    if ptr(X) % 16:
        return False
    return all(st % 16 == 0 for st, n in zip(X.strides[:-1], X.shape[:-1]) if n > 1)


def _contiguous_rows_aligned(L: int, itemsize: int) -> bool:
    """Rows of an output we allocate contiguously (CuPy's pool aligns every block to 512 B)."""
    return (L * itemsize) % 16 == 0


def vec_ok(spec, arrays: dict, extra=()) -> bool:
    """Whether every (B, D, L)-like row the kernels stream is vector-loadable (host-side, once)."""
    rows = [arrays.get(k) for k in ("u", "delta", "z")] + list(extra)
    if spec.var_b:
        rows.append(arrays["B"])
    if spec.var_c:
        rows.append(arrays["C"])
    return all(_rows_aligned(x) for x in rows)


def _bc_to_stage(spec, arrays: dict) -> tuple:
    """Names of the variable B/C whose rows are not 16-byte loadable (an odd L, or a strided view
    such as a slice of x_dbl). Plans copy them into aligned rows on every call, as upstream makes
    B/C contiguous before its kernel: one pass over B/C (1/(D/G) of an activation's bytes) turns
    the state loop's per-element B/C loads (every state, every warp) into 16-byte ones."""
    return tuple(n for n, var in (("B", spec.var_b), ("C", spec.var_c))
                 if var and not _rows_aligned(arrays[n]))


def _aligned_copy(X):
    """X (B, N, L) or (B, G, N, L) copied into rows padded to 16 bytes; same shape as X."""
    import cupy

    per = max(16 // X.dtype.itemsize, 1)
    L = X.shape[-1]
    buf = cupy.empty(X.shape[:-1] + (-(-L // per) * per,), X.dtype)
    rows = buf[..., :L]
    rows[...] = X
    return rows


def _staged(arrays: dict, names: tuple) -> dict:
    return dict(arrays, **{n: _aligned_copy(arrays[n]) for n in names}) if names else arrays


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_PTR_FIELDS = _NAMES
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


def _check_device(arrays: dict) -> None:
    import cupy

    check_current_device(OP, arrays, cupy.cuda.runtime.getDevice())


class _FwdPlan:
    """A validated forward layout: launches with pointers only."""

    def __init__(self, spec: SelectiveScanSpec, arrays: dict, out, want_last: bool, want_saved: bool):
        self.spec = spec
        self.want_last, self.want_saved = want_last, want_saved
        B, D, L, N = spec.batch, spec.dim, spec.seqlen, spec.dstate
        self.out_shape, self.state_shape, self.saved_shape = (B, D, L), (B, D, N), (B, D, spec.n_saved, N)
        self.in_dtype = arrays["u"].dtype
        self.save_y = want_saved and spec.has_z
        self.launch = None
        if spec.empty:                       # a zero-size dimension: outputs only, no launch
            return
        self.stage = [(_NAMES.index(n), n) for n in _bc_to_stage(spec, arrays)]
        arrays = _staged(arrays, tuple(n for _, n in self.stage))
        f = _common_fields(spec, *(arrays[k] for k in _NAMES))
        if out is not None:
            so = strides_elems(out)
            out_ok = _rows_aligned(out)
        else:
            so = (D * L, L, 1)
            out_ok = _contiguous_rows_aligned(L, self.in_dtype.itemsize)
        warps, bpg, smem = _launch_shape(spec, fwd_smem)
        if self.save_y:
            out_ok = out_ok and _contiguous_rows_aligned(L, self.in_dtype.itemsize)
        f.update(out_b=so[0], out_d=so[1], out_l=so[2], blocks_per_group=bpg,
                 vec_ok=int(out_ok and vec_ok(spec, arrays)))
        self.row = PARAMS.row(**f)
        self.ptr_index = [PARAMS.index(n) for n in _PTR_FIELDS]
        self.i_out, self.i_last, self.i_saved, self.i_y = (
            PARAMS.index(n) for n in ("out", "last_state", "saved_states", "y_saved"))
        self.launch = prepare(fwd_ref(spec.config), grid=(B * spec.groups * bpg,), block=(32, warps),
                              shared_mem=smem)

    def __call__(self, ptrs, out, args):
        import cupy

        if self.launch is None:
            return self._empty(out, args[_NAMES.index("initial_state")])
        row = self.row[:]
        for i, p in zip(self.ptr_index, ptrs):
            row[i] = p
        # Staged B/C: freed after the launch is queued (CuPy's pool is stream-ordered).
        staged = [_aligned_copy(args[i]) for i, _ in self.stage]
        for (i, _), a in zip(self.stage, staged):
            row[self.ptr_index[i]] = a.data.ptr
        if out is None:
            out = cupy.empty(self.out_shape, self.in_dtype)
        row[self.i_out] = out.data.ptr
        last = saved = y = None
        if self.save_y:
            y = cupy.empty(self.out_shape, self.in_dtype)
            row[self.i_y] = y.data.ptr
        if self.want_last:
            last = cupy.empty(self.state_shape, self.spec.w_dtype)
            row[self.i_last] = last.data.ptr
        if self.want_saved:
            saved = cupy.empty(self.saved_shape, self.spec.w_dtype)
            row[self.i_saved] = saved.data.ptr
        self.launch.row(PARAMS, row)
        return out, last, (saved, y)

    def _empty(self, out, initial_state):
        """A zero-size B, D or L: empty outputs; with L = 0 the last state is the initial state
        (a copy; zeros without one), as a scan of length 0 leaves the state where it was."""
        import cupy

        w = self.spec.w_dtype
        if out is None:
            out = cupy.empty(self.out_shape, self.in_dtype)
        last = None
        if self.want_last:
            last = cupy.zeros(self.state_shape, w) if initial_state is None else initial_state.copy()
        saved = cupy.empty(self.saved_shape, w) if self.want_saved else None
        y = cupy.empty(self.out_shape, self.in_dtype) if self.save_y else None
        return out, last, (saved, y)


def _forward(args: tuple, delta_softplus, out, want_last: bool, want_saved: bool):
    """(backend, spec or None, result) for the forward. CuPy layouts seen before skip validation."""
    key, ptrs = layout_key(args + (out,), (delta_softplus, want_last, want_saved))
    plan = _FWD_PLANS.get(key) if key is not None else None
    if plan is not None:
        return CUPY, plan.spec, plan(ptrs[:-1], out, args)
    backend, arr = backend_of(OP, dict(zip(_NAMES + ("out",), args + (out,))))
    out = arr.pop("out")
    spec = validate(*(arr[k] for k in _NAMES[:7]), arr["delta_bias"], delta_softplus, arr["initial_state"], out)
    if backend != CUPY:
        from ..reference import selective_scan as ref

        res = ref(*(arr[k] for k in _NAMES[:5]), D=arr["D"], z=arr["z"], delta_bias=arr["delta_bias"],
                  delta_softplus=delta_softplus, initial_state=arr["initial_state"], return_last_state=True)
        if out is not None:
            out[...] = res[0]
            res = (out, res[1])
        return backend, spec, res + ((None, None),)
    _check_device(dict(arr, out=out))
    plan = _FwdPlan(spec, arr, out, want_last, want_saved)
    key, ptrs = layout_key(tuple(arr[k] for k in _NAMES) + (out,), (delta_softplus, want_last, want_saved))
    _FWD_PLANS.put(key, plan)
    args = tuple(arr[k] for k in _NAMES)
    return CUPY, spec, plan([0 if a is None else a.data.ptr for a in args], out, args)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, out=None):
    """Selective scan forward (inference: saves nothing for a backward).

    u, delta, z: (B, D, L) float16/bfloat16/float32/float64. A: (D, N) float32 or complex64
    (float64/complex128 with float64 inputs). B, C: constant (D, N) in A's dtype, or variable
    (B, N, L) / (B, G, N, L) in u's dtype (complex64/complex128 when A is complex).
    D, delta_bias: (D,) float32 (float64). initial_state: (B, D, N) in A's dtype.
    Returns out (B, D, L) in u's dtype, and last_state (B, D, N) in A's dtype when
    ``return_last_state``. ``out`` may be a preallocated (B, D, L) array of u's dtype.
    NumPy inputs run the float64 reference; CuPy inputs run the CUDA kernel (the first call of
    each layout validates; later calls only launch). Variable B/C whose rows are not 16-byte
    aligned with unit stride (odd L, or a strided view) are copied into aligned rows for the
    call (a temporary of B/C's size), as upstream makes them contiguous: the kernel reads B/C
    for every state, and element-wise reads of them made b8 d1536 l2047 1.6x (bf16) to 1.8x
    (fp32) slower.

    Edge inputs: B, D or L may be 0 (nothing is launched; out is empty). With L = 0 the last
    state is the initial state (a copy), zeros without one: a scan of length 0 leaves the state
    where it was, so scanning L1 then L2 steps from that state equals one scan of L1 + L2.
    N must be >= 1. Every argument may have any strides, negative ones included (the kernels take
    int64 element strides); ``out`` (written) must be writeable, with no elements sharing memory.
    NaN and inf propagate, never turned into finite numbers: a NaN in u or delta at step t makes
    out[t:] of that channel NaN (a NaN in a variable B at step t: every channel of its group from
    t on; in a variable C at step t: out[t] of the group's channels only).
    """
    check_flag(OP, "return_last_state", return_last_state)
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    _, _, (o, last, _) = _forward(args, delta_softplus, out, return_last_state, False)
    return (o, last) if return_last_state else o


@dataclass
class ScanSaved:
    """What the forward keeps for the backward: the state every 256 steps, (B, D, ceil(L/256), N)
    in A's dtype, i.e. B*D*ceil(L/256)*N*itemsize bytes (8*1536*8*16*4 = 6.3 MB at B=8, D=1536,
    L=2048, N=16 in fp32; never the (B, D, L, N) states), and with z the un-gated output
    (B, D, L) in u's dtype (as upstream keeps it; 50 MB at that shape in bf16)."""

    states: object
    spec: SelectiveScanSpec
    y: object = None      # with z: the un-gated output y + D u, (B, D, L) in u's dtype

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.states, self.y) if a is not None)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, out=None):
    """Forward for training: returns (out, last_state, saved) where ``saved`` (a ScanSaved)
    holds the chunk-boundary states the backward recomputes from. Shapes as ``selective_scan``.
    Bytes kept per call (``saved.nbytes``): B * D * ceil(L / 256) * N * itemsize(A), plus
    B * D * L * itemsize(u) when z is given (the un-gated output, for dz).
    On NumPy inputs ``saved.states`` is None (the reference backward recomputes everything).
    Edge inputs as ``selective_scan`` (a zero-size B, D or L launches nothing; with L = 0
    last_state is the initial state)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    _, spec, (o, last, (states, y)) = _forward(args, delta_softplus, out, True, True)
    return o, last, ScanSaved(states, spec, y)


_SM_COUNT: dict = {}


def _sm_count() -> int:
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    n = _SM_COUNT.get(dev)
    if n is None:
        n = _SM_COUNT[dev] = int(cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, dev))
    return n


def _block_slots(spec: SelectiveScanSpec, smem: int) -> int:
    """Backward blocks resident at once on this GPU: 2 per SM for real fp32 state (128-register
    cap, selective_scan_bwd.cu BwdMaxThreads), 1 for complex or fp64; fewer if shared memory binds."""
    by_regs = 2 if spec.w_dtype == "float32" else 1
    by_smem = max(1, SM_SMEM // (smem + SM_RESERVED_SMEM))
    return _sm_count() * min(by_regs, by_smem)


def bwd_segments(blocks: int, n_chunks: int, slots: int) -> tuple[int, int]:
    """(segments, chunks per segment) for the backward: split time when the blocks would fill
    the GPU in a poor number of waves (e.g. 640 blocks on 264 slots = 2.42 waves: the last wave
    runs 42% full); a split costs a carry pass over all but the first segment (CARRY_COST)."""
    best, best_eff = 1, 0.0
    for s in range(1, min(MAX_SEGMENTS, n_chunks) + 1):
        waves = blocks * s / slots
        eff = waves / math.ceil(waves) / (1 + CARRY_COST * (s - 1) / s)
        if eff > best_eff * 1.03:          # fewer segments unless clearly better
            best, best_eff = s, eff
    seg_chunks = -(-n_chunks // best)
    return -(-n_chunks // seg_chunks), seg_chunks


def _carve(mem, layout):
    """Arrays over one allocation: ``layout`` is [(shape, dtype, byte offset)]."""
    import cupy

    return [cupy.ndarray(shape, dt, memptr=mem + off) for shape, dt, off in layout]


def _layout(items, align: int = 256):
    """Byte offsets packing ``items`` [(shape, dtype)] into one allocation; returns (layout, bytes)."""
    out, off = [], 0
    for shape, dt in items:
        out.append((shape, dt, off))
        off += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // align) * align
    return out, max(off, align)


class _BwdMode:
    """One way of summing variable dB/dC (atomic or not) for a backward plan: the temporaries'
    layout and the folds that turn them into dA, dB, dC, dD, ddelta_bias."""

    def __init__(self, plan: "_BwdPlan", atomic: int):
        spec = plan.spec
        Bsz, Dsz, L, N, G = spec.batch, spec.dim, spec.seqlen, spec.dstate, spec.groups
        wdt, real_w = spec.w_dtype, weight_dtypes(spec.in_dtype)[0]
        bpg = 1 if atomic else plan.bpg
        self.atomic = atomic
        # Small per-(b, d) partials share one allocation; variable dB/dC partials another (zeroed
        # in one memset when the kernel adds into them atomically).
        # Per-(b, d) partials come per time segment: (n_seg * B, D, ...).
        SB = plan.n_seg * Bsz
        small = [("dA_part", (SB, Dsz, N), wdt)]
        var = []
        for name, is_var in (("dB_part", spec.var_b), ("dC_part", spec.var_c)):
            (var if is_var else small).append((name, (Bsz, G, bpg, N, L) if is_var else (SB, Dsz, N), wdt))
        if spec.has_D:
            small.append(("dD_part", (SB, Dsz), real_w))
        if spec.has_delta_bias:
            small.append(("ddelta_bias_part", (SB, Dsz), real_w))
        if plan.n_seg > 1:
            small.append(("carry", (Bsz, Dsz, plan.n_seg, 2, N), wdt))
        self.small_names = [n for n, _, _ in small]
        self.small_layout, self.small_bytes = _layout([(sh, dt) for _, sh, dt in small])
        self.var_names = [n for n, _, _ in var]
        self.var_layout, self.var_bytes = _layout([(sh, dt) for _, sh, dt in var]) if var else ([], 0)
        self.slot = {n: plan.out_slot[n] for n in self.small_names + self.var_names}
        # Folds: (gradient, partial, (outer, K, inner), out shape, out dtype), all in one FoldPlan
        # launch. Each gradient gets its own allocation, also where K = 1 (a copy): returning
        # views of the shared temporaries would alias the returns (custom ops forbid it) and keep
        # the temporaries alive.
        folds = [("dA", "dA_part", SB, (Dsz, N), plan.A_dtype)]
        for g, part, is_var, shape, dt in (("dB", "dB_part", spec.var_b, plan.B_shape, plan.B_dtype),
                                           ("dC", "dC_part", spec.var_c, plan.C_shape, plan.C_dtype)):
            folds.append((g, part, bpg if is_var else SB, shape, dt))
        if spec.has_D:
            folds.append(("dD", "dD_part", SB, (Dsz,), real_w))
        if spec.has_delta_bias:
            folds.append(("ddelta_bias", "ddelta_bias_part", SB, (Dsz,), real_w))
        self.kernel_folds = []
        for g, part, K, shape, dt in folds:
            size = int(np.prod(shape))
            outer = Bsz * G if part in self.var_names else 1      # variable: per (b, g) rows
            part_dt = real_w if part in ("dD_part", "ddelta_bias_part") else wdt
            self.kernel_folds.append((g, part, (outer, K, size // outer), part_dt, shape, dt))
        self.fold = FoldPlan([(three, part_dt, dt) for _, _, three, part_dt, _, dt in self.kernel_folds])


class _BwdPlan:
    """A validated backward layout: allocates the gradients and launches with pointers only."""

    _OUT_PTRS = ("du", "ddelta", "dz", "dinitial_state", "dA_part", "dB_part", "dC_part", "dD_part",
                 "ddelta_bias_part", "carry")

    def __init__(self, spec: SelectiveScanSpec, arrays: dict):
        self.spec = spec
        Bsz, Dsz, L, N, G = spec.batch, spec.dim, spec.seqlen, spec.dstate, spec.groups
        warps, bpg, smem = _launch_shape(spec, bwd_smem)
        self.bpg = bpg
        n_chunks = -(-L // SAVE_EVERY)
        blocks = Bsz * G * bpg
        self.n_seg, seg_chunks = bwd_segments(blocks, n_chunks, _block_slots(spec, smem))
        self.in_dtype = arrays["u"].dtype
        wdt = spec.w_dtype
        act = (Bsz, Dsz, L)
        # Returned as they are: one allocation each.
        self.direct = [(n, sh, dt) for n, sh, dt in (
            ("du", act, self.in_dtype), ("ddelta", act, self.in_dtype),
            ("dz", act, self.in_dtype) if spec.has_z else (None, None, None),
            ("dinitial_state", (Bsz, Dsz, N), wdt) if spec.has_initial else (None, None, None)) if n]
        self.B_shape, self.C_shape = arrays["B"].shape, arrays["C"].shape
        self.B_dtype, self.C_dtype, self.A_dtype = arrays["B"].dtype, arrays["C"].dtype, arrays["A"].dtype
        self.stage = [(_NAMES.index(n), n) for n in _bc_to_stage(spec, arrays)]
        arrays = _staged(arrays, tuple(n for _, n in self.stage))
        f = _common_fields(spec, *(arrays[k] for k in _NAMES))
        sdo = strides_elems(arrays["dout"])
        c = (Dsz * L, L, 1)
        f.update(blocks_per_group=bpg, n_seg=self.n_seg, seg_chunks=seg_chunks, dout_b=sdo[0], dout_d=sdo[1], dout_l=sdo[2],
                 du_b=c[0], du_d=c[1], du_l=c[2], ddelta_b=c[0], ddelta_d=c[1], ddelta_l=c[2],
                 dz_b=c[0], dz_d=c[1], dz_l=c[2],
                 vec_ok=int(vec_ok(spec, arrays, (arrays["dout"],))
                            and _contiguous_rows_aligned(L, self.in_dtype.itemsize)))
        if arrays["dlast_state"] is not None:
            sl = strides_elems(arrays["dlast_state"])
            f.update(dlast_b=sl[0], dlast_d=sl[1], dlast_n=sl[2])
        self.row = PARAMS.row(**f)
        self.ptr_index = [PARAMS.index(n) for n in _NAMES + ("dout", "dlast_state", "saved_states", "y_saved")]
        self.out_slot = {n: PARAMS.index(n) for n in self._OUT_PTRS}
        self.atomic_index = PARAMS.index("bc_atomic")
        self.carry_pass_index = PARAMS.index("carry_pass")
        self.launch = prepare(bwd_ref(spec.config), grid=(self.n_seg * blocks,), block=(32, warps), shared_mem=smem)
        self.modes = {}

    def __call__(self, ptrs, deterministic: bool, args):
        import cupy

        spec = self.spec
        atomic = 0 if deterministic or not (spec.var_b or spec.var_c) else 1
        mode = self.modes.get(atomic)
        if mode is None:
            mode = self.modes[atomic] = _BwdMode(self, atomic)
        row = self.row[:]
        for i, p in zip(self.ptr_index, ptrs):
            row[i] = p
        staged = [_aligned_copy(args[i]) for i, _ in self.stage]
        for (i, _), a in zip(self.stage, staged):
            row[self.ptr_index[i]] = a.data.ptr
        row[self.atomic_index] = atomic
        outs = {}
        for name, shape, dt in self.direct:
            a = outs[name] = cupy.empty(shape, dt)
            row[self.out_slot[name]] = a.data.ptr
        mem = cupy.cuda.alloc(mode.small_bytes)
        parts = dict(zip(mode.small_names, _carve(mem, mode.small_layout)))
        if mode.var_names:
            vmem = cupy.cuda.alloc(mode.var_bytes)
            if atomic:                                  # every block adds into one slab
                vmem.memset_async(0, mode.var_bytes)
            parts.update(zip(mode.var_names, _carve(vmem, mode.var_layout)))
        for name, a in parts.items():
            row[mode.slot[name]] = a.data.ptr
        if self.n_seg > 1:                              # segments' carries first
            row[self.carry_pass_index] = 1
            self.launch.row(PARAMS, row)
            row[self.carry_pass_index] = 0
        self.launch.row(PARAMS, row)
        grads, fold_parts, fold_outs = {}, [], []
        for g, part, _, _, shape, dt in mode.kernel_folds:
            fold_parts.append(parts[part])
            fold_outs.append(cupy.empty(shape, dt))
            grads[g] = fold_outs[-1]
        mode.fold(fold_parts, fold_outs)
        return (outs["du"], outs["ddelta"], grads["dA"], grads["dB"], grads["dC"], grads.get("dD"),
                outs.get("dz"), grads.get("ddelta_bias"), outs.get("dinitial_state"))


def _empty_bwd(arr: dict) -> tuple:
    """Gradients of a zero-size problem (see ``selective_scan_bwd``), without a launch."""
    import cupy

    def zeros(name):
        a = arr[name]
        return None if a is None else cupy.zeros(a.shape, a.dtype)

    def empty(name):
        a = arr[name]
        return None if a is None else cupy.empty(a.shape, a.dtype)

    dinit = None
    if arr["initial_state"] is not None:
        dlast = arr["dlast_state"]
        dinit = zeros("initial_state") if dlast is None else dlast.copy()
    return (empty("u"), empty("delta"), zeros("A"), zeros("B"), zeros("C"), zeros("D"), empty("z"),
            zeros("delta_bias"), dinit)


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None, saved=None, dlast_state=None,
                       deterministic=None):
    """Gradients of the selective scan: returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state), each in the shape and dtype of its input (None where the input was None).

    ``saved`` is the ScanSaved from ``selective_scan_fwd`` (required on CuPy inputs);
    ``dlast_state`` (B, D, N) is the gradient flowing into last_state, if any.
    ``deterministic``: None takes ``DETERMINISTIC_DEFAULT`` (False). With True, no floating-point
    atomics: every sum has a fixed order, so repeated calls are bitwise identical; variable dB/dC
    then take per-block partials of B * G * ceil(D / G / 8) * N * L * 4 bytes each (fp32),
    folded on the device (cost: see benchmarks/NOTES.md). With False, variable dB/dC are added
    with fp32 atomics into B * G * N * L * 4 bytes each: faster, but the last bits of dB/dC can
    differ run to run. Every other gradient is deterministic either way.

    Zero-size B, D or L: nothing is launched and ``saved`` is not needed; du, ddelta, dz are
    empty, dA, dB, dC, dD, ddelta_bias are zeros (sums over nothing), and dinitial_state is
    dlast_state (a copy; zeros without it), since with L = 0 last_state is the initial state.
    """
    if deterministic is None:
        deterministic = DETERMINISTIC_DEFAULT
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, dout, dlast_state)
    states = getattr(saved, "states", None)
    ysaved = getattr(saved, "y", None)
    key, ptrs = layout_key(args + (states, ysaved), (delta_softplus,))
    plan = _BWD_PLANS.get(key) if key is not None else None
    if plan is not None and saved.spec == plan.spec:
        return plan(ptrs, deterministic, args)
    backend, arr = backend_of(OP, dict(zip(_NAMES + ("dout", "dlast_state"), args)))
    spec = validate(*(arr[k] for k in _NAMES[:7]), arr["delta_bias"], delta_softplus, arr["initial_state"])
    check_array(OP, "dout", arr["dout"], (spec.batch, spec.dim, spec.seqlen), "BDL", dtypes=(spec.in_dtype,))
    if arr["dlast_state"] is not None:
        check_array(OP, "dlast_state", arr["dlast_state"], (spec.batch, spec.dim, spec.dstate), "BDN",
                    dtypes=(spec.w_dtype,))
    if backend != CUPY:
        from ..reference import selective_scan_bwd as ref

        return ref(arr["dout"], *(arr[k] for k in _NAMES[:5]), D=arr["D"], z=arr["z"],
                   delta_bias=arr["delta_bias"], delta_softplus=delta_softplus,
                   initial_state=arr["initial_state"], dlast_state=arr["dlast_state"])
    if spec.empty:
        _check_device(arr)
        return _empty_bwd(arr)
    if states is None or (spec.has_z and ysaved is None):
        raise ValueError(f"{OP}: selective_scan_bwd needs the 'saved' states from selective_scan_fwd "
                         "on GPU inputs")
    if saved.spec != spec:
        raise ValueError(f"{OP}: 'saved' was produced for a different problem ({saved.spec}), "
                         f"not this one ({spec})")
    _check_device(arr)
    plan = _BWD_PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _BwdPlan(spec, arr)
        key, ptrs = layout_key(tuple(arr[k] for k in _NAMES + ("dout", "dlast_state")) + (states, ysaved),
                               (delta_softplus,))
        _BWD_PLANS.put(key, plan)
    args = tuple(arr[k] for k in _NAMES + ("dout", "dlast_state"))
    ptrs = [0 if a is None else a.data.ptr for a in args]
    return plan(ptrs + [states.data.ptr, 0 if ysaved is None else ysaved.data.ptr], deterministic, args)

"""selective_scan: Mamba-1's selective scan, forward and backward. Kernels:
kernels_cu/selective_scan_fwd.cu and kernels_cu/selective_scan_bwd.cu.

Shapes: u, delta, z, out (B, D, L); A (D, N) real or complex; B and C each constant (D, N) or
variable (B, N, L) / (B, G, N, L) with G dividing D; D, delta_bias (D,); initial_state and
last_state (B, D, N). Complex A takes complex B/C (complex64/complex128 arrays, not upstream's
real/imaginary interleaving along L) and reads out y = 2 Re(sum_n C h).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._arrays import CUPY, backend_of, dtype_name
from .._compile import KernelRef
from .._launch import launch
from .._params import Params, ptr, strides_elems
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_range

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
# 8 reads hit L1.
WARPS_PER_BLOCK = 8
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
    # 8 steps per lane (chunk 256). 16 halves the warp-scan work per element but needs ~160
    # registers with B/C prefetch (spills under the 128 cap of 2 blocks/SM): measured first.
    return KernelConfig(in_dtype, w_dtype, var_b, var_c, 8)


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
    slices = (2 * 2 * warps * 32 * BWD_ITEMS * s) if n_var else 0
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
                           "out", "last_state", "saved_states", "dout", "dlast_state", "du",
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
    ("delta_softplus", "int32_t"), ("vec_ok", "int32_t"),
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


def validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state) -> SelectiveScanSpec:
    check_flag(OP, "delta_softplus", delta_softplus)
    check_ndim(OP, "u", u, (3,), "(B, D, L)")
    Bsz, Dsz, L = (int(s) for s in u.shape)
    check_array(OP, "u", u, (Bsz, Dsz, L), "BDL", dtypes=IN_DTYPES)
    if L < 1 or Dsz < 1 or Bsz < 1:
        raise ValueError(f"{OP}: B, D and L must be >= 1, got u.shape = {tuple(u.shape)}")
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


def vec_ok(spec, arrays, extra=()) -> bool:
    """Whether every (B, D, L)-like row the kernels stream is vector-loadable (host-side, once)."""
    rows = [arrays.get(k) for k in ("u", "delta", "z")] + list(extra)
    if spec.var_b:
        rows.append(arrays["B"])
    if spec.var_c:
        rows.append(arrays["C"])
    return all(_rows_aligned(x) for x in rows)


def _gather(named):
    backend, arr = backend_of(OP, named)
    return backend, arr


def _fwd_gpu(spec, arrays, out, want_last, want_saved):
    import cupy

    u = arrays["u"]
    if out is None:
        out = cupy.empty(u.shape, dtype=u.dtype)
    else:
        check_array(OP, "out", out, u.shape, "BDL", dtypes=(spec.in_dtype,))
    last = cupy.empty((spec.batch, spec.dim, spec.dstate), dtype=spec.w_dtype) if want_last else None
    saved = (cupy.empty((spec.batch, spec.dim, spec.n_saved, spec.dstate), dtype=spec.w_dtype)
             if want_saved else None)
    f = _common_fields(spec, *(arrays[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                    "delta_bias", "initial_state")))
    so = strides_elems(out)
    warps, bpg, smem = _launch_shape(spec, fwd_smem)
    f.update(out=ptr(out), out_b=so[0], out_d=so[1], out_l=so[2], last_state=ptr(last),
             saved_states=ptr(saved), blocks_per_group=bpg, vec_ok=int(vec_ok(spec, arrays, (out,))))
    launch(fwd_ref(spec.config), grid=(spec.batch * spec.groups * bpg,), block=(32, warps),
           args=(PARAMS.pack(**f),), shared_mem=smem)
    return out, last, saved


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, out=None):
    """Selective scan forward (inference: saves nothing for a backward).

    u, delta, z: (B, D, L) float16/bfloat16/float32/float64. A: (D, N) float32 or complex64
    (float64/complex128 with float64 inputs). B, C: constant (D, N) in A's dtype, or variable
    (B, N, L) / (B, G, N, L) in u's dtype (complex64/complex128 when A is complex).
    D, delta_bias: (D,) float32 (float64). initial_state: (B, D, N) in A's dtype.
    Returns out (B, D, L) in u's dtype, and last_state (B, D, N) in A's dtype when
    ``return_last_state``. ``out`` may be a preallocated (B, D, L) array of u's dtype.
    NumPy inputs run the float64 reference; CuPy inputs run the CUDA kernel.
    """
    check_flag(OP, "return_last_state", return_last_state)
    backend, arr = backend_of(OP, dict(zip(_NAMES, (u, delta, A, B, C, D, z, delta_bias, initial_state))))
    spec = validate(*(arr[k] for k in _NAMES[:7]), arr["delta_bias"], delta_softplus, arr["initial_state"])
    if backend != CUPY:
        from ..reference import selective_scan as ref

        res = ref(*(arr[k] for k in _NAMES[:5]), D=arr["D"], z=arr["z"], delta_bias=arr["delta_bias"],
                  delta_softplus=delta_softplus, initial_state=arr["initial_state"],
                  return_last_state=return_last_state)
        if out is not None:
            o = res[0] if return_last_state else res
            out[...] = o
        return res
    o, last, _ = _fwd_gpu(spec, arr, out, return_last_state, False)
    return (o, last) if return_last_state else o


@dataclass
class ScanSaved:
    """What the forward keeps for the backward: the state every 256 steps, (B, D, ceil(L/256), N)
    in A's dtype, i.e. B*D*ceil(L/256)*N*itemsize bytes (8*1536*8*16*4 = 6.3 MB at B=8, D=1536,
    L=2048, N=16 in fp32; never the (B, D, L, N) states)."""

    states: object
    spec: SelectiveScanSpec

    @property
    def nbytes(self) -> int:
        return 0 if self.states is None else int(self.states.nbytes)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, out=None):
    """Forward for training: returns (out, last_state, saved) where ``saved`` (a ScanSaved)
    holds the chunk-boundary states the backward recomputes from. Shapes as ``selective_scan``.
    Bytes kept per call: B * D * ceil(L / 256) * N * itemsize(A) (``saved.nbytes``).
    On NumPy inputs ``saved.states`` is None (the reference backward recomputes everything)."""
    backend, arr = backend_of(OP, dict(zip(_NAMES, (u, delta, A, B, C, D, z, delta_bias, initial_state))))
    spec = validate(*(arr[k] for k in _NAMES[:7]), arr["delta_bias"], delta_softplus, arr["initial_state"])
    if backend != CUPY:
        from ..reference import selective_scan as ref

        o, last = ref(*(arr[k] for k in _NAMES[:5]), D=arr["D"], z=arr["z"], delta_bias=arr["delta_bias"],
                      delta_softplus=delta_softplus, initial_state=arr["initial_state"],
                      return_last_state=True)
        return o, last, ScanSaved(None, spec)
    o, last, saved = _fwd_gpu(spec, arr, out, True, True)
    return o, last, ScanSaved(saved, spec)


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None, saved=None, dlast_state=None):
    """Gradients of the selective scan: returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state), each in the shape and dtype of its input (None where the input was None).

    ``saved`` is the ScanSaved from ``selective_scan_fwd`` (required on CuPy inputs);
    ``dlast_state`` (B, D, N) is the gradient flowing into last_state, if any.
    Deterministic: no floating-point atomics; every sum has a fixed order, so repeated calls
    are bitwise identical. Temporary memory: variable dB/dC take per-block partials of
    B * G * ceil(D / G / 8) * N * L * 4 bytes each (fp32), summed on the device.
    """
    backend, arr = backend_of(OP, dict(zip(_NAMES + ("dout", "dlast_state"),
                                           (u, delta, A, B, C, D, z, delta_bias, initial_state,
                                            dout, dlast_state))))
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
    import cupy

    if saved is None or saved.states is None:
        raise ValueError(f"{OP}: selective_scan_bwd needs the 'saved' states from selective_scan_fwd "
                         "on GPU inputs")
    if saved.spec != spec:
        raise ValueError(f"{OP}: 'saved' was produced for a different problem ({saved.spec}), "
                         f"not this one ({spec})")
    u_, delta_, z_ = arr["u"], arr["delta"], arr["z"]
    du = cupy.empty(u_.shape, u_.dtype)
    ddelta = cupy.empty(delta_.shape, delta_.dtype)
    dz = cupy.empty(z_.shape, z_.dtype) if z_ is not None else None
    warps, bpg, smem = _launch_shape(spec, bwd_smem)
    Bsz, Dsz, L, N, G = spec.batch, spec.dim, spec.seqlen, spec.dstate, spec.groups
    wdt = spec.w_dtype
    real_w = weight_dtypes(spec.in_dtype)[0]
    dA_part = cupy.empty((Bsz, Dsz, N), wdt)
    dB_part = cupy.empty((Bsz, G, bpg, N, L) if spec.var_b else (Bsz, Dsz, N), wdt)
    dC_part = cupy.empty((Bsz, G, bpg, N, L) if spec.var_c else (Bsz, Dsz, N), wdt)
    dD_part = cupy.empty((Bsz, Dsz), real_w) if spec.has_D else None
    dbias_part = cupy.empty((Bsz, Dsz), real_w) if spec.has_delta_bias else None
    dinit = cupy.empty((Bsz, Dsz, N), wdt) if spec.has_initial else None
    f = _common_fields(spec, *(arr[k] for k in _NAMES))
    sdo, sdu, sdd = strides_elems(arr["dout"]), strides_elems(du), strides_elems(ddelta)
    f.update(saved_states=ptr(saved.states), dout=ptr(arr["dout"]), dlast_state=ptr(arr["dlast_state"]),
             du=ptr(du), ddelta=ptr(ddelta), dz=ptr(dz), dinitial_state=ptr(dinit),
             dA_part=ptr(dA_part), dB_part=ptr(dB_part), dC_part=ptr(dC_part), dD_part=ptr(dD_part),
             ddelta_bias_part=ptr(dbias_part), blocks_per_group=bpg,
             dout_b=sdo[0], dout_d=sdo[1], dout_l=sdo[2], du_b=sdu[0], du_d=sdu[1], du_l=sdu[2],
             ddelta_b=sdd[0], ddelta_d=sdd[1], ddelta_l=sdd[2],
             vec_ok=int(vec_ok(spec, arr, (arr["dout"], du, ddelta, dz))))
    if dz is not None:
        sdz = strides_elems(dz)
        f.update(dz_b=sdz[0], dz_d=sdz[1], dz_l=sdz[2])
    if arr["dlast_state"] is not None:
        sl = strides_elems(arr["dlast_state"])
        f.update(dlast_b=sl[0], dlast_d=sl[1], dlast_n=sl[2])
    launch(bwd_ref(spec.config), grid=(Bsz * G * bpg,), block=(32, warps),
           args=(PARAMS.pack(**f),), shared_mem=smem)
    dA = dA_part.sum(axis=0).astype(arr["A"].dtype, copy=False)

    def finish(part, X, var):
        if var:
            total = part.sum(axis=2)                       # (B, G, N, L)
            total = total.reshape(X.shape)
        else:
            total = part.sum(axis=0)                       # (D, N)
        return total.astype(X.dtype, copy=False)

    dB = finish(dB_part, arr["B"], spec.var_b)
    dC = finish(dC_part, arr["C"], spec.var_c)
    dD = dD_part.sum(axis=0) if dD_part is not None else None
    dbias = dbias_part.sum(axis=0) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dinit

"""causal_conv1d: depthwise causal 1-D convolution (Mamba's short conv), its backward and the
decode-time state update.

Shapes: B batch, D channels, L length, W width (2..8), S state length (>= W-1).

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * xx[b, d, t - (W-1) + k])

xx is x extended to negative time with ``initial_states`` (zeros when None). With ``seq_idx``
(B, L) int32, token t only sees tokens with the same id (tokens at negative time belong to
seq_idx[b, 0]); a negative id marks padding: output exactly 0, no contribution (forward and
backward). Activation None, "silu" or "swish" (= silu).

Dtypes: x fp16 / bf16 / fp32 / fp64; weight (and bias) in x's dtype or fp32 (fp64 with fp64);
the decode update takes any fp16 / bf16 / fp32 weight with 16/32-bit x, as upstream.
Outputs in x's dtype; dweight in weight's dtype; dbias in bias's dtype. Math in fp32 (fp64 for
fp64).

Layouts: any strides. x with a unit channel stride (a (B, D, L) view of a (B, L, D) array) runs
the channel-last kernel and gets channel-last outputs; everything else runs the channel-first
kernels (forward: a pipelined kernel for 16-bit types, a single-round one for fp32 / fp64; see
``_CF_FWD``). Vector loads are used where the vector axis has unit stride and the address is aligned
(checked on the device per row / per thread), scalar loads elsewhere.

NumPy inputs run the float64 reference (``ssmkit.reference``); CuPy inputs run
kernels_cu/causal_conv1d.cu on the current stream, without synchronizing.

Host overhead: the first call with a given signature (shapes, strides, dtypes, flags, device)
validates and builds a launch plan; later calls with the same signature reuse it and only pack
the pointers (a few microseconds; the decode update is launch-bound).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .. import _fork
from .._arrays import CUPY, FLOAT_NAMES, backend_of, check_current_device, dtype_name
from .._compile import KernelRef, get_kernel
from .._launch import MAX_GRID_X, MAX_THREADS_PER_BLOCK, Prepared
from .._params import Params, ptr, strides_elems
from .._registry import register
from .._validate import check_array, check_flag, check_ndim, check_range, check_written

OP = "causal_conv1d"
OP_BWD = "causal_conv1d_bwd"
OP_UPDATE = "causal_conv1d_update"
FILE = "causal_conv1d.cu"

_CTYPE = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
# weight / bias (and conv_state) dtypes allowed per x dtype
_WDTYPES = {"float16": ("float16", "float32"), "bfloat16": ("bfloat16", "float32"),
            "float32": ("float32",), "float64": ("float64",)}
_SDTYPES = _WDTYPES
# weight / bias dtypes of the decode update per x dtype: any fp16 / bf16 / fp32 with 16/32-bit x,
# as upstream causal_conv1d_update (it compiles all nine (x, weight) pairs of its update kernel);
# math in fp32, so every pairing is exact.
_UPDATE_WDTYPES = {"float16": ("float16", "float32", "bfloat16"), "bfloat16": ("bfloat16", "float32", "float16"),
                   "float32": ("float32", "float16", "bfloat16"), "float64": ("float64",)}
WIDTHS = tuple(range(2, 9))
ACTIVATIONS = (None, "silu", "swish")
LAYOUTS = ("cf", "cl")   # channel-first (time contiguous) / channel-last (channels contiguous)

# Launch geometry; must match ConvTraits and the k* constants in causal_conv1d.cu.
_THREADS = 128                 # fwd/bwd blocks: 4 warps
_CF_WARPS = 4                  # channel-first: channels per block
_CL_WARPS = 4                  # channel-last: time slices per block
_CF_BWD_ITERS = 4              # kConvCFBwdIters
_CL_BWD_ITERS = 8              # kConvCLBwdIters
_CL_FWD_STEPS = 16             # ConvTraits::kFwdSteps
_CL_BWD_STEPS = 8              # ConvTraits::kBwdSteps
_CF_BWD_ITEMS = 8              # ConvTraits::kBwdItems
_UPDATE_THREADS = 128          # kConvUpdateThreads
_REDUCE_THREADS = 256          # kConvReduceThreads


# Channel-first forward, per x dtype: (kernel kind, steps per lane = ConvTraits::kFwdItems,
# pipelined). 16-bit types run the pipelined kernel (a warp walks seg_iters segments of its row,
# loading the next while it computes the current one), fp32 / fp64 the single-round kernel (one
# segment per warp): the faster of the two per dtype, measured on the H200 (see ConvTraits in
# kernels_cu/causal_conv1d.cu).
_CF_FWD = {"float16": ("fwd_cf", 16, True), "bfloat16": ("fwd_cf", 16, True),
           "float32": ("fwd_cf_single", 8, False), "float64": ("fwd_cf_single", 8, False)}
# Segments per warp of the pipelined kernel (clamped to the row's segment count). Measured on the
# H200, bf16 width 4, call ms for b8 d3072 l2048 / b4 d8192 l2048 / b1 d10240 l8192: 1 segment
# 0.0916 / 0.1162 / 0.1475, 2: 0.0825 / 0.1032 / 0.1244, 4: 0.0838 / 0.1053 / 0.1257, 8 (last
# row): 0.1308; a heuristic of ~8 KB of x per warp and >= 16k warps (4 / 4 / 8 segments): 0.0845 /
# 0.1046 / 0.1314. benchmarks/probe_causal_conv1d.py changes it between calls.
_CF_FWD_SEGS = 2


def _with_ptrs(vals: list, index: dict, **arrays) -> list:
    """A copy of a prepared field list with the device pointers of the given arrays (None: 0)."""
    v = vals.copy()
    for name, a in arrays.items():
        if a is not None:
            v[index[name]] = a.data.ptr
    return v


def _cl_vec(itemsize: int) -> int:          # ConvTraits::kVec (8-byte vectors)
    return 8 // itemsize


def _cl_bwd_vec(itemsize: int) -> int:      # ConvTraits::kBwdVec
    return 1 if itemsize == 8 else 4 // itemsize


PARAMS_FWD = Params("ssm::ConvFwdParams", [
    ("x", "ptr"), ("weight", "ptr"), ("bias", "ptr"), ("seq_idx", "ptr"), ("initial_states", "ptr"),
    ("out", "ptr"), ("final_states", "ptr"),
    ("batch", "int64_t"), ("dim", "int64_t"), ("seqlen", "int64_t"),
    ("x_b", "int64_t"), ("x_d", "int64_t"), ("x_l", "int64_t"),
    ("w_d", "int64_t"), ("w_k", "int64_t"), ("bias_s", "int64_t"),
    ("seq_b", "int64_t"), ("seq_l", "int64_t"),
    ("init_b", "int64_t"), ("init_d", "int64_t"), ("init_k", "int64_t"),
    ("out_b", "int64_t"), ("out_d", "int64_t"), ("out_l", "int64_t"),
    ("fin_b", "int64_t"), ("fin_d", "int64_t"), ("fin_k", "int64_t"),
    ("n_seg", "int64_t"), ("n_dgroups", "int64_t"),
    ("silu", "int32_t"), ("x_vec", "int32_t"), ("out_vec", "int32_t"), ("seq_vec", "int32_t"),
    ("seg_iters", "int32_t"), ("pad_", "int32_t"),
])

PARAMS_BWD = Params("ssm::ConvBwdParams", [
    ("x", "ptr"), ("weight", "ptr"), ("bias", "ptr"), ("dout", "ptr"), ("seq_idx", "ptr"),
    ("initial_states", "ptr"), ("dfinal_states", "ptr"), ("dx", "ptr"), ("dinitial_states", "ptr"),
    ("partials", "ptr"),
    ("batch", "int64_t"), ("dim", "int64_t"), ("seqlen", "int64_t"),
    ("x_b", "int64_t"), ("x_d", "int64_t"), ("x_l", "int64_t"),
    ("w_d", "int64_t"), ("w_k", "int64_t"), ("bias_s", "int64_t"),
    ("dout_b", "int64_t"), ("dout_d", "int64_t"), ("dout_l", "int64_t"),
    ("seq_b", "int64_t"), ("seq_l", "int64_t"),
    ("init_b", "int64_t"), ("init_d", "int64_t"), ("init_k", "int64_t"),
    ("dfin_b", "int64_t"), ("dfin_d", "int64_t"), ("dfin_k", "int64_t"),
    ("dx_b", "int64_t"), ("dx_d", "int64_t"), ("dx_l", "int64_t"),
    ("dinit_b", "int64_t"), ("dinit_d", "int64_t"), ("dinit_k", "int64_t"),
    ("n_seg", "int64_t"), ("n_dgroups", "int64_t"),
    ("silu", "int32_t"), ("x_vec", "int32_t"), ("dout_vec", "int32_t"), ("dx_vec", "int32_t"),
    ("seq_vec", "int32_t"), ("pad_", "int32_t"),
])

PARAMS_REDUCE = Params("ssm::ConvReduceParams", [
    ("partials", "ptr"), ("dweight", "ptr"), ("dbias", "ptr"),
    ("dim", "int64_t"), ("n_partials", "int64_t"),
    ("w_d", "int64_t"), ("w_k", "int64_t"), ("bias_s", "int64_t"),
    ("width", "int32_t"), ("pad_", "int32_t"),
])

PARAMS_UPDATE = Params("ssm::ConvUpdateParams", [
    ("x", "ptr"), ("conv_state", "ptr"), ("weight", "ptr"), ("bias", "ptr"),
    ("cache_seqlens", "ptr"), ("state_indices", "ptr"), ("out", "ptr"),
    ("batch", "int64_t"), ("dim", "int64_t"), ("new_len", "int64_t"), ("state_len", "int64_t"),
    ("x_b", "int64_t"), ("x_d", "int64_t"), ("x_l", "int64_t"),
    ("st_b", "int64_t"), ("st_d", "int64_t"), ("st_s", "int64_t"),
    ("w_d", "int64_t"), ("w_k", "int64_t"), ("bias_s", "int64_t"),
    ("csl_s", "int64_t"), ("idx_s", "int64_t"),
    ("out_b", "int64_t"), ("out_d", "int64_t"), ("out_l", "int64_t"),
    ("n_dblocks", "int64_t"),
    ("width", "int32_t"), ("silu", "int32_t"),
])

ALL_PARAMS = (PARAMS_FWD, PARAMS_BWD, PARAMS_REDUCE, PARAMS_UPDATE)


# ---- kernel choice: the one place a spec becomes a template instantiation ---------------------

def kernel_ref(kind: str, dtype: str, wdtype: str | None = None, width: int | None = None,
               seq: bool = False, sdtype: str | None = None) -> KernelRef:
    """kind: "fwd_cf", "fwd_cl", "bwd_cf", "bwd_cl" (x dtype, weight dtype, width, seq_idx given),
    "bwd_reduce" (weight dtype only, passed as ``dtype``), "update" (x, state, weight dtypes).
    "fwd_cf" names the channel-first forward kernel of x's dtype (``_CF_FWD``)."""
    if kind == "fwd_cf":
        kind = _CF_FWD[dtype][0]
    if kind == "bwd_reduce":
        return KernelRef(FILE, f"ssm::causal_conv1d_bwd_reduce<{_CTYPE[dtype]}>")
    if kind == "update":
        return KernelRef(FILE, f"ssm::causal_conv1d_update<{_CTYPE[dtype]}, {_CTYPE[sdtype]}, {_CTYPE[wdtype]}>")
    return KernelRef(FILE, f"ssm::causal_conv1d_{kind}<{_CTYPE[dtype]}, {_CTYPE[wdtype]}, {int(width)}, "
                           f"{'true' if seq else 'false'}>")


@register(OP)
def variants(dtype: str | None = None, width: int | None = None, kind: str | None = None) -> list[KernelRef]:
    """Every instantiation (filters: x ``dtype``, ``width``, ``kind`` as in ``kernel_ref``)."""
    refs: list[KernelRef] = []
    for xd in FLOAT_NAMES:
        if dtype not in (None, xd):
            continue
        for wd in _WDTYPES[xd]:
            for k in ("fwd_cf", "fwd_cl", "bwd_cf", "bwd_cl"):
                if kind not in (None, k):
                    continue
                for w in WIDTHS:
                    if width not in (None, w):
                        continue
                    for seq in (False, True):
                        refs.append(kernel_ref(k, xd, wd, w, seq))
        if kind in (None, "update"):
            for wd in _UPDATE_WDTYPES[xd]:
                for sd in _SDTYPES[xd]:
                    refs.append(kernel_ref("update", xd, wd, sdtype=sd))
    if kind in (None, "bwd_reduce"):
        for wd in FLOAT_NAMES:
            if dtype is None or wd in _WDTYPES[dtype]:
                refs.append(kernel_ref("bwd_reduce", wd))
    return refs


# ---- validation ----------------------------------------------------------------------------

def _check_activation(op, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: argument 'activation' must be None, 'silu' or 'swish', got {activation!r}")


def _check_x3(op, x):
    check_ndim(op, "x", x, (3,), "(B, D, L)")
    check_array(op, "x", x, (None, None, None), "BDL", dtypes=FLOAT_NAMES)


def _check_weight(op, weight, D, xd, wdtypes=_WDTYPES):
    check_ndim(op, "weight", weight, (2,), "(D, W)")
    check_array(op, "weight", weight, (D, None), "DW", dtypes=wdtypes[xd])
    W = int(weight.shape[1])
    check_range(op, "W (weight.shape[1])", W, WIDTHS[0], WIDTHS[-1])
    return W


@dataclass(frozen=True)
class ConvSpec:
    batch: int
    dim: int
    seqlen: int
    width: int
    dtype: str
    wdtype: str
    has_bias: bool
    silu: bool
    has_seq: bool
    has_initial_states: bool

    @property
    def empty(self) -> bool:
        """A zero-size B, D or L: nothing to compute, no kernel launch."""
        return self.batch * self.dim * self.seqlen == 0


def validate(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None, op=OP,
             out=None) -> ConvSpec:
    """Checks shared by forward and backward (``out``: the forward's preallocated output);
    returns the frozen spec."""
    _check_x3(op, x)
    B, D, L = (int(s) for s in x.shape)
    xd = dtype_name(x)
    W = _check_weight(op, weight, D, xd)
    wd = dtype_name(weight)
    if bias is not None:
        check_array(op, "bias", bias, (D,), "D", dtypes=(wd,))
    _check_activation(op, activation)
    if seq_idx is not None:
        check_array(op, "seq_idx", seq_idx, (B, L), "BL", dtypes=("int32",))
    if initial_states is not None:
        check_array(op, "initial_states", initial_states, (B, D, W - 1), dtypes=(xd,))
    if out is not None:
        check_array(op, "out", out, (B, D, L), "BDL", dtypes=(xd,))
        check_written(op, "out", out)
    return ConvSpec(B, D, L, W, xd, wd, bias is not None, activation is not None, seq_idx is not None,
                    initial_states is not None)


def validate_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices, out):
    op = OP_UPDATE
    check_ndim(op, "x", x, (2, 3), "(B, D) or (B, D, L_new)")
    check_array(op, "x", x, (None,) * x.ndim, dtypes=FLOAT_NAMES)
    B, D = int(x.shape[0]), int(x.shape[1])
    xd = dtype_name(x)
    W = _check_weight(op, weight, D, xd, _UPDATE_WDTYPES)
    check_ndim(op, "conv_state", conv_state, (3,), "(B_pool, D, S)")
    check_array(op, "conv_state", conv_state, (None, D, None), dtypes=_SDTYPES[xd])
    S = int(conv_state.shape[2])
    check_written(op, "conv_state", conv_state)
    if S < W - 1:
        raise ValueError(f"{op}: argument 'conv_state' must have S >= W - 1 = {W - 1} (S = conv_state.shape[2]), "
                         f"got shape {tuple(conv_state.shape)}")
    if bias is not None:
        check_array(op, "bias", bias, (D,), "D", dtypes=(dtype_name(weight),))
    _check_activation(op, activation)
    if cache_seqlens is not None:
        check_array(op, "cache_seqlens", cache_seqlens, (B,), "B", dtypes=("int32",))
    if conv_state_indices is not None:
        check_array(op, "conv_state_indices", conv_state_indices, (B,), "B", dtypes=("int32",))
    elif conv_state.shape[0] < B:
        raise ValueError(f"{op}: without conv_state_indices, conv_state must have at least B = {B} rows "
                         f"(shape (B, D, S)), got shape {tuple(conv_state.shape)}")
    if out is not None:
        check_array(op, "out", out, tuple(x.shape), dtypes=(xd,))
        check_written(op, "out", out)
    return B, D, W, S


# ---- fast parameter packing -----------------------------------------------------------------

class _Packer:
    """Packs a Params mirror from a list of field values with ``struct`` (~0.6 us) instead of a
    structured-array constructor (~2.3 us); the result is the same NumPy void scalar."""

    _CODES = {np.dtype(np.uint64): "Q", np.dtype(np.int64): "q", np.dtype(np.int32): "i",
              np.dtype(np.float32): "f", np.dtype(np.float64): "d"}

    def __init__(self, params: Params):
        self.params = params
        self.dtype = params.dtype
        fmt, pos = "<", 0
        for name in params.names:
            ftype, off = self.dtype.fields[name][:2]
            if off > pos:
                fmt += f"{off - pos}x"
            fmt += self._CODES[ftype]
            pos = off + ftype.itemsize
        if self.dtype.itemsize > pos:
            fmt += f"{self.dtype.itemsize - pos}x"
        self.struct = struct.Struct(fmt)
        assert self.struct.size == self.dtype.itemsize
        self.index = {n: i for i, n in enumerate(params.names)}

    def template(self, **values) -> list:
        unknown = set(values) - set(self.index)
        if unknown:
            raise KeyError(f"{self.params.c_name}: unknown fields {sorted(unknown)}")
        return [int(values.get(n, 0)) for n in self.params.names]

    def pack(self, vals: list):
        return np.frombuffer(self.struct.pack(*vals), self.dtype)[0]

    pack_row = pack      # the interface _launch.Prepared.row packs through (with .struct)


_PACK_FWD = _Packer(PARAMS_FWD)
_PACK_BWD = _Packer(PARAMS_BWD)
_PACK_REDUCE = _Packer(PARAMS_REDUCE)
_PACK_UPDATE = _Packer(PARAMS_UPDATE)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _st(x, n: int):
    return strides_elems(x) if x is not None else (0,) * n


def _check_grid(name: str, blocks: int):
    if blocks > MAX_GRID_X:
        raise ValueError(f"{name}: the problem needs {blocks} thread blocks, more than the grid limit "
                         f"{MAX_GRID_X}; split the batch")


def _channel_last(x) -> bool:
    """Run the channel-last mapping: channels have unit stride and time does not (or L == 1)."""
    sb, sd, sl = strides_elems(x)
    return x.shape[1] > 1 and sd == 1 and (sl != 1 or x.shape[2] == 1)


# Launches: plans call the cached ``cupy.RawKernel`` directly on the current stream instead of
# going through ``_launch.launch``: the decode update is launch-bound and launch()'s per-call
# argument normalisation costs ~2 us. The same limits are checked once, when a plan is built.
assert max(_THREADS, _UPDATE_THREADS, _REDUCE_THREADS) <= MAX_THREADS_PER_BLOCK

# Plan caches: signature -> plan. The signature holds everything validation and the launch
# configuration depend on (array types, shapes, strides, dtypes, devices, flags), so a cache hit
# needs no re-validation; pointers are the only per-call inputs.
_CP_NDARRAY = None          # cupy.ndarray, once a CuPy plan exists
_cupy = None                # the cupy module, once imported
_get_device = None          # cupy.cuda.runtime.getDevice
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}
_UPDATE_PLANS: dict = {}
_MAX_PLANS = 4096


def _sig(a):
    return None if a is None else (type(a), a.shape, a.strides, a.dtype, a.data.device_id)


def _remember(cache: dict, key, plan):
    if len(cache) >= _MAX_PLANS:
        cache.clear()
    cache[key] = plan


def _current_device() -> int:
    if _fork.FORKED:          # a forked child: one clear error before the first CUDA call
        _fork.check()
    return _get_device()


def _note_cupy():
    global _CP_NDARRAY, _cupy, _get_device
    if _CP_NDARRAY is None:
        import cupy

        _cupy, _get_device = cupy, cupy.cuda.runtime.getDevice
        _CP_NDARRAY = cupy.ndarray


# ---- forward ---------------------------------------------------------------------------------

class _FwdPlan:
    __slots__ = ("kernel", "launch", "grid", "block", "vals", "out_alloc", "fin_shape", "dtype", "rfs", "I")

    def __init__(self, spec: ConvSpec, x, weight, bias, seq_idx, initial_states, out, rfs: bool):
        B, D, L, W = spec.batch, spec.dim, spec.seqlen, spec.width
        self.dtype, self.rfs, self.fin_shape = x.dtype, rfs, (B, D, W - 1)
        if spec.empty:                    # a zero-size dimension: outputs only, no launch
            self.launch = None
            self.out_alloc = None if out is not None else ((B, D, L), None)
            return
        item = np.dtype(x.dtype).itemsize
        cl = _channel_last(x)
        seg_iters = 1
        if cl:
            kv = _cl_vec(item)
            n_dgroups, n_seg = _cdiv(D, 32 * kv), _cdiv(L, _CL_WARPS * _CL_FWD_STEPS)
            blocks = B * n_seg * n_dgroups
        else:
            _, items, pipelined = _CF_FWD[spec.dtype]
            segs_row = _cdiv(L, 32 * items)
            seg_iters = max(1, min(_CF_FWD_SEGS, segs_row)) if pipelined else 1
            n_dgroups, n_seg = _cdiv(D, _CF_WARPS), _cdiv(segs_row, seg_iters)   # n_seg: segment groups
            blocks = B * n_dgroups * n_seg
        _check_grid(OP, blocks)
        ref = kernel_ref("fwd_cl" if cl else "fwd_cf", spec.dtype, spec.wdtype, W, spec.has_seq)
        self.kernel = get_kernel(ref)
        self.grid, self.block = (blocks, 1, 1), (_THREADS, 1, 1)
        self.launch = Prepared(self.kernel, self.grid, self.block, 0)
        self.dtype = x.dtype
        self.rfs = rfs
        # outputs: out in x's layout unless given; final_states (B, D, W-1) contiguous
        if out is None:
            self.out_alloc = ((B, L, D), (0, 2, 1)) if cl else ((B, D, L), None)
            o_st = (L * D, 1, D) if cl else (D * L, L, 1)
        else:
            self.out_alloc = None
            o_st = strides_elems(out)
        self.fin_shape = (B, D, W - 1)
        f_st = (D * (W - 1), W - 1, 1) if rfs else (0, 0, 0)
        xs, ws, bs = strides_elems(x), strides_elems(weight), _st(bias, 1)
        ss, ist = _st(seq_idx, 2), _st(initial_states, 3)
        self.vals = _PACK_FWD.template(
            batch=B, dim=D, seqlen=L, x_b=xs[0], x_d=xs[1], x_l=xs[2], w_d=ws[0], w_k=ws[1], bias_s=bs[0],
            seq_b=ss[0], seq_l=ss[1], init_b=ist[0], init_d=ist[1], init_k=ist[2],
            out_b=o_st[0], out_d=o_st[1], out_l=o_st[2], fin_b=f_st[0], fin_d=f_st[1], fin_k=f_st[2],
            n_seg=n_seg, n_dgroups=n_dgroups, silu=int(spec.silu),
            x_vec=int((xs[1] if cl else xs[2]) == 1), out_vec=int((o_st[1] if cl else o_st[2]) == 1),
            seq_vec=int(ss[1] == 1), seg_iters=seg_iters)
        self.I = _PACK_FWD.index

    def __call__(self, x, weight, bias, seq_idx, initial_states, out):
        cupy = _cupy
        if out is None:
            shape, perm = self.out_alloc
            out = cupy.empty(shape, self.dtype)
            if perm is not None:
                out = out.transpose(perm)
        if self.launch is None:           # zero-size: with L = 0 final_states = initial_states
            fin = None
            if self.rfs:
                fin = cupy.zeros(self.fin_shape, self.dtype) if initial_states is None else initial_states.copy()
            return (out, fin) if self.rfs else out
        fin = cupy.empty(self.fin_shape, self.dtype) if self.rfs else None
        v = _with_ptrs(self.vals, self.I, x=x, weight=weight, bias=bias, seq_idx=seq_idx,
                       initial_states=initial_states, out=out, final_states=fin)
        self.launch.row(_PACK_FWD, v)
        return (out, fin) if self.rfs else out


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                  return_final_states: bool = False, out=None):
    """Causal depthwise conv1d forward.

    x: (B, D, L); weight: (D, W), 2 <= W <= 8; bias: (D,) or None; activation: None, "silu",
    "swish"; seq_idx: (B, L) int32 or None; initial_states: (B, D, W-1) or None (x's dtype);
    out: optional preallocated (B, D, L) in x's dtype (any strides).
    Returns out (B, D, L) in x's dtype (channel-last when x is), and with
    ``return_final_states`` also final_states (B, D, W-1): the last W-1 steps of
    concat(initial_states or zeros, x) along time, raw (seq_idx does not apply).

    Edge inputs: B, D or L may be 0 (nothing is launched; out is empty); with L = 0,
    final_states is initial_states (a copy; zeros without it), by the rule above. Every argument
    may have any strides, negative ones included; ``out`` (written) must be writeable, with no
    elements sharing memory. NaN and inf propagate, never turned into finite numbers: a NaN in x
    at step t makes out[t:t+W] of that channel NaN, except outputs that seq_idx keeps from
    seeing step t (another sequence, or padding: exactly 0).
    """
    if type(return_final_states) is not bool:
        check_flag(OP, "return_final_states", return_final_states)
    plan = None
    if type(x) is _CP_NDARRAY:
        try:
            key = (_sig(x), _sig(weight), _sig(bias), _sig(seq_idx), _sig(initial_states), _sig(out),
                   activation, return_final_states, _current_device())
            plan = _FWD_PLANS.get(key)
        except (AttributeError, TypeError):
            plan = None
    if plan is None:
        backend, arr = backend_of(OP, {"x": x, "weight": weight, "bias": bias, "seq_idx": seq_idx,
                                       "initial_states": initial_states, "out": out})
        x, weight, bias, seq_idx, initial_states, out = (
            arr[k] for k in ("x", "weight", "bias", "seq_idx", "initial_states", "out"))
        if backend != CUPY:
            validate(x, weight, bias, activation, seq_idx, initial_states, out=out)
            from ..reference import causal_conv1d as ref

            res = ref(x, weight, bias=bias, activation=activation, seq_idx=seq_idx,
                      initial_states=initial_states, return_final_states=return_final_states)
            if out is not None:
                o = res[0] if return_final_states else res
                out[...] = o
                res = (out, res[1]) if return_final_states else out
            return res
        _note_cupy()
        key = (_sig(x), _sig(weight), _sig(bias), _sig(seq_idx), _sig(initial_states), _sig(out),
               activation, return_final_states, _current_device())
        plan = _FWD_PLANS.get(key)
        if plan is None:   # first call with this signature (or arrays converted from DLPack)
            spec = validate(x, weight, bias, activation, seq_idx, initial_states, out=out)
            check_current_device(OP, arr, key[-1])     # kernels launch on the current device
            plan = _FwdPlan(spec, x, weight, bias, seq_idx, initial_states, out, return_final_states)
            _remember(_FWD_PLANS, key, plan)
    return plan(x, weight, bias, seq_idx, initial_states, out)


# ---- backward --------------------------------------------------------------------------------

class _BwdPlan:
    __slots__ = ("kernel", "launch", "grid", "reduce_kernel", "reduce_launch", "reduce_grid", "vals", "rvals", "cl",
                 "shape",
                 "dtype", "wdtype", "bdtype", "W", "P", "acc", "has_init", "I", "RI")

    def __init__(self, spec: ConvSpec, x, weight, bias, dout, seq_idx, initial_states, dfinal_states):
        B, D, L, W = spec.batch, spec.dim, spec.seqlen, spec.width
        if spec.empty:                    # a zero-size dimension: outputs only, no launch
            self.launch, self.cl, self.shape, self.W = None, False, (B, D, L), W
            self.dtype, self.wdtype = x.dtype, weight.dtype
            self.bdtype = None if bias is None else bias.dtype
            self.has_init = initial_states is not None
            return
        item = np.dtype(x.dtype).itemsize
        cl = _channel_last(x)
        if cl:
            kv = _cl_bwd_vec(item)
            n_dgroups = _cdiv(D, 32 * kv)
            n_seg = _cdiv(L, _CL_BWD_ITERS * _CL_WARPS * _CL_BWD_STEPS)
            blocks = B * n_seg * n_dgroups
        else:
            n_dgroups = _cdiv(D, _CF_WARPS)
            n_seg = _cdiv(L, _CF_BWD_ITERS * 32 * _CF_BWD_ITEMS)
            blocks = B * n_dgroups * n_seg
        _check_grid(OP_BWD, blocks)
        self.kernel = get_kernel(kernel_ref("bwd_cl" if cl else "bwd_cf", spec.dtype, spec.wdtype, W, spec.has_seq))
        self.reduce_kernel = get_kernel(kernel_ref("bwd_reduce", spec.wdtype))
        self.grid = (blocks, 1, 1)
        self.launch = Prepared(self.kernel, self.grid, (_THREADS, 1, 1), 0)
        self.reduce_grid = (_cdiv(D * (W + 1), _REDUCE_THREADS), 1, 1)
        self.reduce_launch = Prepared(self.reduce_kernel, self.reduce_grid, (_REDUCE_THREADS, 1, 1), 0)
        self.cl, self.shape, self.W = cl, (B, D, L), W
        self.dtype, self.wdtype = x.dtype, weight.dtype
        self.bdtype = None if bias is None else bias.dtype
        self.P = B * n_seg
        self.acc = np.float64 if spec.dtype == "float64" else np.float32
        self.has_init = initial_states is not None
        dx_st = (L * D, 1, D) if cl else (D * L, L, 1)
        di_st = (D * (W - 1), W - 1, 1) if self.has_init else (0, 0, 0)
        xs, ws, bs, gs = strides_elems(x), strides_elems(weight), _st(bias, 1), strides_elems(dout)
        ss, ist, fs = _st(seq_idx, 2), _st(initial_states, 3), _st(dfinal_states, 3)
        unit = (lambda s: int(s[1] == 1)) if cl else (lambda s: int(s[2] == 1))
        self.vals = _PACK_BWD.template(
            batch=B, dim=D, seqlen=L, x_b=xs[0], x_d=xs[1], x_l=xs[2], w_d=ws[0], w_k=ws[1], bias_s=bs[0],
            dout_b=gs[0], dout_d=gs[1], dout_l=gs[2], seq_b=ss[0], seq_l=ss[1],
            init_b=ist[0], init_d=ist[1], init_k=ist[2], dfin_b=fs[0], dfin_d=fs[1], dfin_k=fs[2],
            dx_b=dx_st[0], dx_d=dx_st[1], dx_l=dx_st[2], dinit_b=di_st[0], dinit_d=di_st[1], dinit_k=di_st[2],
            n_seg=n_seg, n_dgroups=n_dgroups, silu=int(spec.silu), x_vec=unit(xs), dout_vec=unit(gs),
            dx_vec=unit(dx_st), seq_vec=int(ss[1] == 1))
        # dweight (D, W) and dbias (D,) are allocated contiguous
        self.rvals = _PACK_REDUCE.template(dim=D, n_partials=self.P, w_d=W, w_k=1, bias_s=1, width=W)
        self.I, self.RI = _PACK_BWD.index, _PACK_REDUCE.index

    def __call__(self, x, weight, bias, dout, seq_idx, initial_states, dfinal_states):
        cupy = _cupy
        B, D, L = self.shape
        W = self.W
        if self.launch is None:           # zero-size: sums over nothing; with L = 0 dinit = dfinal
            dinit = None
            if self.has_init:
                dinit = cupy.zeros((B, D, W - 1), self.dtype) if dfinal_states is None else dfinal_states.copy()
            return (cupy.empty((B, D, L), self.dtype), cupy.zeros((D, W), self.wdtype),
                    None if self.bdtype is None else cupy.zeros((D,), self.bdtype), dinit)
        dx = cupy.empty((B, L, D), self.dtype).transpose(0, 2, 1) if self.cl else cupy.empty((B, D, L), self.dtype)
        dweight = cupy.empty((D, W), self.wdtype)
        dbias = None if self.bdtype is None else cupy.empty((D,), self.bdtype)
        dinit = cupy.empty((B, D, W - 1), self.dtype) if self.has_init else None
        ws = cupy.empty((self.P, D, W + 1), self.acc)
        v = _with_ptrs(self.vals, self.I, x=x, weight=weight, bias=bias, dout=dout, seq_idx=seq_idx,
                       initial_states=initial_states, dinitial_states=dinit if initial_states is not None else None,
                       dfinal_states=dfinal_states, dx=dx, partials=ws)
        self.launch.row(_PACK_BWD, v)
        r = self.rvals.copy()
        r[self.RI["partials"]] = ws.data.ptr
        r[self.RI["dweight"]] = dweight.data.ptr
        if dbias is not None:
            r[self.RI["dbias"]] = dbias.data.ptr
        self.reduce_launch.row(_PACK_REDUCE, r)
        return dx, dweight, dbias, dinit


def causal_conv1d_bwd(x, weight, bias, dout, activation=None, seq_idx=None, initial_states=None,
                      dfinal_states=None, deterministic: bool = True):
    """Backward of ``causal_conv1d``: returns (dx, dweight, dbias, dinitial_states).

    dout: (B, D, L) in x's dtype; dfinal_states: optional (B, D, W-1) gradient of final_states.
    dx in x's dtype and layout; dweight (D, W) in weight's dtype; dbias (D,) in bias's dtype (None
    without bias); dinitial_states (B, D, W-1) in x's dtype (None without initial_states).

    dweight/dbias are reduced in two fixed-order stages (per-block partial sums, then one pass
    over the partials): the result is bitwise reproducible run to run with no atomics, at the
    cost of a (B * L / 1024, D, W+1) fp32 workspace (~1% of x's bytes) and a second tiny launch.
    ``deterministic`` is accepted for API compatibility; both values give this deterministic path.
    Zero-size B, D or L: nothing is launched; dx is empty, dweight and dbias are zeros, and with
    L = 0 dinitial_states is dfinal_states (zeros without it), as final_states = initial_states.
    """
    check_flag(OP_BWD, "deterministic", deterministic)
    plan = None
    if type(x) is _CP_NDARRAY:
        try:
            key = (_sig(x), _sig(weight), _sig(bias), _sig(dout), _sig(seq_idx), _sig(initial_states),
                   _sig(dfinal_states), activation, _current_device())
            plan = _BWD_PLANS.get(key)
        except (AttributeError, TypeError):
            plan = None
    if plan is None:
        backend, arr = backend_of(OP_BWD, {"x": x, "weight": weight, "bias": bias, "dout": dout,
                                           "seq_idx": seq_idx, "initial_states": initial_states,
                                           "dfinal_states": dfinal_states})
        x, weight, bias, dout, seq_idx, initial_states, dfinal_states = (
            arr[k] for k in ("x", "weight", "bias", "dout", "seq_idx", "initial_states", "dfinal_states"))
        key = None
        if backend == CUPY:
            _note_cupy()
            key = (_sig(x), _sig(weight), _sig(bias), _sig(dout), _sig(seq_idx), _sig(initial_states),
                   _sig(dfinal_states), activation, _current_device())
            plan = _BWD_PLANS.get(key)
        if plan is None:
            spec = validate(x, weight, bias, activation, seq_idx, initial_states, op=OP_BWD)
            check_array(OP_BWD, "dout", dout, (spec.batch, spec.dim, spec.seqlen), "BDL", dtypes=(spec.dtype,))
            if dfinal_states is not None:
                check_array(OP_BWD, "dfinal_states", dfinal_states, (spec.batch, spec.dim, spec.width - 1),
                            dtypes=(spec.dtype,))
            if backend != CUPY:
                from ..reference import causal_conv1d_bwd as ref

                return ref(x, weight, bias, dout, activation=activation, seq_idx=seq_idx,
                           initial_states=initial_states, dfinal_states=dfinal_states)
            check_current_device(OP_BWD, arr, key[-1])
            plan = _BwdPlan(spec, x, weight, bias, dout, seq_idx, initial_states, dfinal_states)
            _remember(_BWD_PLANS, key, plan)
    return plan(x, weight, bias, dout, seq_idx, initial_states, dfinal_states)


# ---- decode update ---------------------------------------------------------------------------

class _UpdatePlan:
    __slots__ = ("kernel", "launch", "grid", "vals", "out_shape", "dtype", "I")

    def __init__(self, x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices, out):
        B, D, W, S = validate_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                     conv_state_indices, out)
        self.out_shape, self.dtype = tuple(x.shape), x.dtype
        if x.size == 0:                   # a zero-size dimension: the state is untouched, no launch
            self.launch = None
            return
        xd = dtype_name(x)
        n_dblocks = _cdiv(D, _UPDATE_THREADS)
        _check_grid(OP_UPDATE, B * n_dblocks)
        self.kernel = get_kernel(kernel_ref("update", xd, dtype_name(weight), sdtype=dtype_name(conv_state)))
        self.grid = (B * n_dblocks, 1, 1)
        self.launch = Prepared(self.kernel, self.grid, (_UPDATE_THREADS, 1, 1), 0)
        three = x.ndim == 3
        xs = strides_elems(x)
        x_l = xs[2] if three else 0
        if out is None:
            os_ = (D * x.shape[2], x.shape[2], 1) if three else (D, 1, 0)
        else:
            o = strides_elems(out)
            os_ = o if three else (o[0], o[1], 0)
        cs, ws, bs = strides_elems(conv_state), strides_elems(weight), _st(bias, 1)
        self.vals = _PACK_UPDATE.template(
            batch=B, dim=D, new_len=x.shape[2] if three else 1, state_len=S,
            x_b=xs[0], x_d=xs[1], x_l=x_l, st_b=cs[0], st_d=cs[1], st_s=cs[2], w_d=ws[0], w_k=ws[1],
            bias_s=bs[0], csl_s=_st(cache_seqlens, 1)[0], idx_s=_st(conv_state_indices, 1)[0],
            out_b=os_[0], out_d=os_[1], out_l=os_[2], n_dblocks=n_dblocks, width=W,
            silu=int(activation is not None))
        self.I = _PACK_UPDATE.index

    def __call__(self, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out):
        if out is None:
            out = _cupy.empty(self.out_shape, self.dtype)
        if self.launch is None:
            return out
        v = self.vals.copy()
        v[0] = x.data.ptr
        v[1] = conv_state.data.ptr
        v[2] = weight.data.ptr
        if bias is not None:
            v[3] = bias.data.ptr
        if cache_seqlens is not None:
            v[4] = cache_seqlens.data.ptr
        if conv_state_indices is not None:
            v[5] = conv_state_indices.data.ptr
        v[6] = out.data.ptr
        self.launch.row(_PACK_UPDATE, v)
        return out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, out=None):
    """Decode step(s): convolve new tokens against ``conv_state``, updating it in place.

    x: (B, D) or (B, D, L_new); conv_state: (B_pool, D, S), S >= W-1, dtype x's or float32
    (fp64 with fp64); weight (D, W) fp16 / bf16 / fp32 with any 16/32-bit x (as upstream; fp64
    with fp64), bias (D,) in weight's dtype or None; math in fp32; activation None / "silu" /
    "swish".
    Without cache_seqlens the state is a shift register (afterwards: the last S steps of
    concat(state, x)); with cache_seqlens (B,) int32 it is a ring buffer: token t is written at
    (cache_seqlens[b] + t) % S and reads its W-1 predecessors at (cache_seqlens[b] + t - j) % S.
    conv_state_indices (B,) int32: batch row b uses pool row conv_state_indices[b] (default b); a
    negative index is a padding row (state untouched, output zeros).
    out: optional preallocated output (x's shape and dtype). Returns out.
    Zero-size B, D or L_new: nothing is launched, the state is untouched, out is empty.
    Any strides, negative ones included; conv_state and out are written: they must be
    writeable, with no elements sharing memory.
    """
    plan = None
    if type(x) is _CP_NDARRAY:
        try:
            key = (_sig(x), _sig(conv_state), _sig(weight), _sig(bias), activation, _sig(cache_seqlens),
                   _sig(conv_state_indices), _sig(out), _current_device())
            plan = _UPDATE_PLANS.get(key)
        except (AttributeError, TypeError):
            plan = None
    if plan is None:
        backend, arr = backend_of(OP_UPDATE, {"x": x, "conv_state": conv_state, "weight": weight, "bias": bias,
                                              "cache_seqlens": cache_seqlens,
                                              "conv_state_indices": conv_state_indices, "out": out})
        x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out = (
            arr[k] for k in ("x", "conv_state", "weight", "bias", "cache_seqlens", "conv_state_indices", "out"))
        if backend != CUPY:
            validate_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices, out)
            from ..reference import causal_conv1d_update as ref

            res = ref(x, conv_state, weight, bias=bias, activation=activation, cache_seqlens=cache_seqlens,
                      conv_state_indices=conv_state_indices)
            if out is not None:
                out[...] = res
                return out
            return res
        _note_cupy()
        key = (_sig(x), _sig(conv_state), _sig(weight), _sig(bias), activation, _sig(cache_seqlens),
               _sig(conv_state_indices), _sig(out), _current_device())
        plan = _UPDATE_PLANS.get(key)
        if plan is None:
            check_current_device(OP_UPDATE, arr, key[-1])     # kernels launch on the current device
            plan = _UpdatePlan(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices, out)
            _remember(_UPDATE_PLANS, key, plan)
    return plan(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out)


__all__ = ["causal_conv1d", "causal_conv1d_bwd", "causal_conv1d_update", "kernel_ref", "variants",
           "validate", "validate_update", "ALL_PARAMS"]

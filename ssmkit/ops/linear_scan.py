"""linear_scan: h_t = a_t * h_{t-1} + b_t along the last axis (forward or reverse), and its backward.

Shapes: a, b (..., L), same shape; initial (...) or None. Real (float16/bfloat16/float32/float64,
fp32 math for 16-bit) or complex (complex64/complex128). Kernel: kernels_cu/linear_scan.cu.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._arrays import CUPY, FLOAT_NAMES, COMPLEX_NAMES, backend_of, check_current_device, dtype_name
from .._compile import KernelRef
from .._launch import launch
from .._params import Params, ptr, strides_elems
from .._registry import register
from .._validate import check_array, check_flag, check_same_dtype

OP = "linear_scan"
DTYPES = FLOAT_NAMES + COMPLEX_NAMES
_CTYPE = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double",
          "complex64": "ssm::complex<float>", "complex128": "ssm::complex<double>"}
WARPS_PER_BLOCK = 4  # one row per warp; 4 warps keeps blocks small for short inputs

PARAMS = Params("ssm::LinearScanParams", [
    ("a", "ptr"), ("b", "ptr"), ("initial", "ptr"), ("h", "ptr"),
    ("rows", "int64_t"), ("L", "int64_t"),
    ("a_row_stride", "int64_t"), ("a_l_stride", "int64_t"),
    ("b_row_stride", "int64_t"), ("b_l_stride", "int64_t"),
    ("h_row_stride", "int64_t"), ("h_l_stride", "int64_t"),
    ("initial_stride", "int64_t"),
    ("reverse", "int32_t"), ("shift_gate", "int32_t"), ("conj_gate", "int32_t"), ("pad_", "int32_t"),
])


def kernel_ref(dtype: str) -> KernelRef:
    """The one place that turns a spec into a template instantiation."""
    return KernelRef("linear_scan.cu", f"ssm::linear_scan<{_CTYPE[dtype]}>")


@register(OP)
def variants(dtype: str | None = None) -> list[KernelRef]:
    return [kernel_ref(d) for d in DTYPES if dtype in (None, d)]


@dataclass(frozen=True)
class LinearScanSpec:
    shape: tuple[int, ...]
    dtype: str
    has_initial: bool
    reverse: bool


def validate(a, b, initial, reverse) -> LinearScanSpec:
    check_flag(OP, "reverse", reverse)
    if not hasattr(a, "shape") or len(a.shape) < 1:
        raise ValueError(f"{OP}: argument 'a' must have shape (..., L) (at least one axis), "
                         f"got {getattr(a, 'shape', type(a).__name__)}")
    shape = tuple(a.shape)
    check_array(OP, "a", a, shape, dtypes=DTYPES)
    check_array(OP, "b", b, shape, dtypes=DTYPES)
    check_same_dtype(OP, ("a", "b"), (a, b))
    if initial is not None:
        check_array(OP, "initial", initial, shape[:-1], dtypes=(dtype_name(a),))
    return LinearScanSpec(shape, dtype_name(a), initial is not None, reverse)


def _rows(x, L):
    return x.reshape(-1, L)  # a view when the leading axes collapse, else a copy


def _check_device(arr: dict) -> None:
    import cupy

    check_current_device(OP, arr, cupy.cuda.runtime.getDevice())


def _scan_gpu(a, b, initial, reverse, shift_gate=False, conj_gate=False, out=None):
    import cupy

    if a.size == 0:                     # a zero-size axis: nothing to scan, no launch
        return out if out is not None else cupy.empty(b.shape, dtype=b.dtype)
    L = a.shape[-1]
    a2, b2 = _rows(a, L), _rows(b, L)
    R = a2.shape[0]
    h = out if out is not None else cupy.empty(b.shape, dtype=b.dtype)
    h2 = h.reshape(-1, L)
    init = None if initial is None else initial.reshape(-1)
    sa, sb, sh = strides_elems(a2), strides_elems(b2), strides_elems(h2)
    params = PARAMS.pack(
        a=ptr(a2), b=ptr(b2), initial=ptr(init), h=ptr(h2), rows=R, L=L,
        a_row_stride=sa[0], a_l_stride=sa[1], b_row_stride=sb[0], b_l_stride=sb[1],
        h_row_stride=sh[0], h_l_stride=sh[1],
        initial_stride=0 if init is None else strides_elems(init)[0],
        reverse=int(reverse), shift_gate=int(shift_gate), conj_gate=int(conj_gate))
    if R > 0:
        launch(kernel_ref(dtype_name(b)), grid=((R + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,),
               block=(32, WARPS_PER_BLOCK), args=(params,))
    return h


def linear_scan(a, b, initial=None, reverse: bool = False):
    """h_t = a_t * h_{t-1} + b_t along the last axis; with ``reverse``, h_t = a_t * h_{t+1} + b_t.

    a, b: (..., L), one dtype (float16, bfloat16, float32, float64, complex64, complex128).
    initial: (...) state before the first step (zeros when None).
    Returns h: (..., L), dtype of b. 16-bit inputs scan in fp32.
    NumPy inputs run the float64 reference; CuPy inputs run kernels_cu/linear_scan.cu.
    Any axis may be 0 (h is then empty; nothing is launched). Inputs may have any strides,
    negative ones included. NaN and inf propagate: a NaN in a or b at step t makes h[..., t:]
    of that row NaN (h[..., :t + 1] with ``reverse``).
    """
    backend, arr = backend_of(OP, {"a": a, "b": b, "initial": initial})
    a, b, initial = arr["a"], arr["b"], arr["initial"]
    validate(a, b, initial, reverse)
    if backend != CUPY:
        from ..reference import linear_scan as ref

        return ref(a, b, initial=initial, reverse=reverse)
    _check_device(arr)
    return _scan_gpu(a, b, initial, reverse)


def linear_scan_bwd(a, b, dh, initial=None, reverse: bool = False, h=None):
    """Gradients of ``linear_scan`` given dh (the gradient of h): returns (da, db, dinitial).

    db is the opposite-direction scan of dh with gates conj(a) shifted by one step; then
    da_t = db_t * conj(h_prev_t) and dinitial = conj(a_first) * db_first (complex gradients in
    the PyTorch convention, dL/dRe + i dL/dIm). ``h`` (the forward output) is recomputed when
    not given. dinitial is None when ``initial`` is None. With L = 0, h does not depend on
    ``initial``: dinitial is zeros (da, db empty); nothing is launched for a zero-size input.
    """
    backend, arr = backend_of(OP, {"a": a, "b": b, "dh": dh, "initial": initial, "h": h})
    a, b, dh, initial, h = (arr[k] for k in ("a", "b", "dh", "initial", "h"))
    validate(a, b, initial, reverse)
    check_array(OP, "dh", dh, a.shape, dtypes=(dtype_name(a),))
    if h is not None:
        check_array(OP, "h", h, a.shape, dtypes=(dtype_name(a),))
    if backend != CUPY:
        from ..reference import linear_scan_bwd as ref

        return ref(a, b, dh, initial=initial, reverse=reverse, h=h)
    _check_device(arr)
    import cupy

    if a.size == 0:                     # zero-size: empty gradients, dinitial zeros, no launch
        dinit = None if initial is None else cupy.zeros(initial.shape, initial.dtype)
        return cupy.empty(a.shape, a.dtype), cupy.empty(b.shape, b.dtype), dinit
    if h is None:
        h = _scan_gpu(a, b, initial, reverse)
    db = _scan_gpu(a, dh, None, not reverse, shift_gate=True, conj_gate=True)
    # h_prev: the state each step consumed (initial or zero before the first step).
    h_prev = cupy.empty_like(h)
    first = (Ellipsis, 0) if not reverse else (Ellipsis, -1)
    if not reverse:
        h_prev[..., 1:] = h[..., :-1]
    else:
        h_prev[..., :-1] = h[..., 1:]
    h_prev[first] = 0 if initial is None else initial
    da = db * cupy.conj(h_prev) if np.dtype(a.dtype).kind == "c" else db * h_prev
    dinitial = None
    if initial is not None:
        a0 = a[first]
        dinitial = (cupy.conj(a0) if np.dtype(a.dtype).kind == "c" else a0) * db[first]
    return da.astype(a.dtype, copy=False), db.astype(b.dtype, copy=False), dinitial

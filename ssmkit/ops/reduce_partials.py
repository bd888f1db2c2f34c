"""Deterministic folding of per-block partial sums (used by the backward kernels).

``reduce_middle(part, out_dtype)``: part (outer, K, inner) contiguous fp32/fp64 (complex as
pairs) -> (outer, inner) in ``out_dtype``, summed over K in a fixed order. One memory-bound pass
(kernels_cu/reduce_partials.cu) instead of CuPy's generic reduction plus a cast.
"""
from __future__ import annotations

from .._compile import KernelRef
from .._launch import prepare
from .._params import Params
from .._registry import register

OP = "reduce_partials"
_ACC = {"float32": "float", "float64": "double"}
_OUT = {"float16": "ssm::f16", "bfloat16": "ssm::bf16", "float32": "float", "float64": "double"}
_REAL = {"complex64": "float32", "complex128": "float64"}
THREADS = 256
PARAMS = Params("ssm::ReduceParams", [("part", "ptr"), ("out", "ptr"), ("outer", "int64_t"),
                                      ("K", "int64_t"), ("inner", "int64_t")])
_prepared: dict = {}


def kernel_ref(acc: str, out: str) -> KernelRef:
    return KernelRef("reduce_partials.cu", f"ssm::reduce_partials<{_ACC[acc]}, {_OUT[out]}>")


@register(OP)
def variants(dtype: str | None = None) -> list[KernelRef]:
    refs = [kernel_ref("float32", o) for o in ("float16", "bfloat16", "float32")]
    return refs + [kernel_ref("float64", "float64")]


def reduce_middle(part, out_shape, out_dtype):
    """Sum ``part`` (outer, K, inner) over K into a new array of ``out_shape`` / ``out_dtype``."""
    import cupy

    outer, K, inner = part.shape
    acc = part.dtype.name
    out_name = cupy.dtype(out_dtype).name if not hasattr(out_dtype, "name") else out_dtype.name
    if acc in _REAL:                      # complex: sum the (re, im) pairs as reals
        acc, inner = _REAL[acc], inner * 2
        out_name = _REAL[out_name]
    out = cupy.empty(out_shape, dtype=out_dtype)
    total = outer * inner
    blocks = max(1, min((total + THREADS - 1) // THREADS, 132 * 32))
    key = (acc, out_name, blocks, cupy.cuda.runtime.getDevice())
    launch = _prepared.get(key)
    if launch is None:
        launch = _prepared[key] = prepare(kernel_ref(acc, out_name), grid=(blocks,), block=(THREADS,))
    launch((PARAMS.pack_row([part.data.ptr, out.data.ptr, outer, K, inner]),))
    return out

"""Validation helpers: every user error is raised here, once, in Python, naming the argument,
what was expected and what came. Kernels assume a valid spec and re-check nothing.

Strides: kernels take element strides (int64), so every stride of an array must be a whole number
of elements (``check_array``); negative strides are fine (a reversed view), read or written.
Arrays an op writes (``check_written``: outputs, in-place states) must be writeable (a NumPy array
with ``flags.writeable`` False is refused; CuPy has no such flag) and must not have elements that
share memory (a stride 0 from broadcasting, an overlapping ``as_strided`` view): a kernel writing
such an array would race with itself."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from ._arrays import dtype_name


def shape_str(dims: Sequence[Any], letters: str | None = None) -> str:
    body = ", ".join("*" if d is None else str(d) for d in dims)
    core = f"({body},)" if len(dims) == 1 else f"({body})"
    return f"{core} = ({', '.join(letters)})" if letters else core


def check_array(op: str, name: str, x: Any, shape: Sequence[int | None], letters: str | None = None,
                dtypes: Iterable[str] | None = None) -> None:
    """``x`` must have exactly ``shape`` (None = any size) and, if given, a dtype in ``dtypes``."""
    if x is None:
        raise ValueError(f"{op}: argument '{name}' is required")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: argument '{name}' must be an array, got {type(x).__name__}")
    if len(x.shape) != len(shape) or any(e is not None and e != g for e, g in zip(shape, x.shape)):
        raise ValueError(f"{op}: argument '{name}' must have shape {shape_str(shape, letters)}, "
                         f"got {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if dtype_name(x) not in dtypes:
            raise TypeError(f"{op}: argument '{name}' must have dtype in {dtypes}, got {dtype_name(x)}")
    item = x.dtype.itemsize
    if 0 not in x.shape and any(s % item for s, n in zip(getattr(x, "strides", ()), x.shape) if n > 1):
        raise ValueError(f"{op}: argument '{name}' has strides {tuple(x.strides)} (bytes) that are not whole "
                         f"elements of {item} bytes; pass a copy")


def overlaps_itself(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> bool:
    """True unless the layout provably gives every element its own bytes: the axes of size > 1,
    sorted by stride, each step over everything the smaller axes span. A sufficient test (like
    torch's): it also refuses rare interleaved layouts that do not overlap (e.g. shape (3, 2)
    with element strides (2, 3)). A negative stride counts by its magnitude (a reversed axis)."""
    if any(int(n) == 0 for n in shape):
        return False
    span = 0                                    # byte offset of the last element of the axes so far
    for n, s in sorted(((int(n), abs(int(s))) for n, s in zip(shape, strides) if int(n) > 1), key=lambda d: d[1]):
        if s < span + itemsize:
            return True
        span += (n - 1) * s
    return False


def check_written(op: str, name: str, x: Any) -> None:
    """``x`` is written by the op (an output or an in-place state): no two elements in the same
    memory (no zero strides), writeable. Call after ``check_array`` (shape, dtype)."""
    shape = tuple(int(n) for n in x.shape) if x is not None else (0,)
    if 0 in shape:                       # nothing is written
        return
    strides = tuple(int(s) for s in x.strides)
    got = f"got strides {strides} (bytes) for shape {shape}"
    if any(s == 0 for s, n in zip(strides, shape) if n > 1):
        raise ValueError(f"{op}: argument '{name}' is written and must not have zero strides (a broadcast "
                         f"view: its elements share memory), {got}")
    if overlaps_itself(shape, strides, x.dtype.itemsize):
        raise ValueError(f"{op}: argument '{name}' is written and must not overlap itself (elements sharing "
                         f"memory), {got}; pass a fresh (e.g. contiguous) array")
    flags = getattr(x, "flags", None)
    if flags is not None and getattr(flags, "writeable", True) is False:   # NumPy; CuPy has no flag
        raise ValueError(f"{op}: argument '{name}' is written but is read-only (flags.writeable is False); "
                         "pass a writeable array")


def check_ndim(op: str, name: str, x: Any, ndims: Iterable[int], what: str) -> None:
    ndims = tuple(ndims)
    if not hasattr(x, "shape"):
        raise TypeError(f"{op}: argument '{name}' must be an array, got {type(x).__name__}")
    if len(x.shape) not in ndims:
        raise ValueError(f"{op}: argument '{name}' must be {what}, got shape {tuple(x.shape)}")


def check_same_dtype(op: str, names: Sequence[str], arrays: Sequence[Any]) -> None:
    present = [(n, dtype_name(a)) for n, a in zip(names, arrays) if a is not None]
    if len({d for _, d in present}) > 1:
        detail = ", ".join(f"{n}: {d}" for n, d in present)
        raise TypeError(f"{op}: arguments must share one dtype; got {detail}")


def check_range(op: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{op}: {name} = {value} is out of range; supported {lo} <= {name} <= {hi}")


def check_flag(op: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: argument '{name}' must be a bool, got {type(value).__name__}")

"""Validation helpers: every user error is raised here, once, in Python, naming the argument,
what was expected and what came. Kernels assume a valid spec and re-check nothing."""
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

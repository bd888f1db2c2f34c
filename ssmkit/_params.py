"""Kernel parameter structs: one POD struct per kernel, mirrored here by a NumPy structured dtype.

The C side declares the struct with explicit 64-bit strides; ``Params`` declares the same fields
in the same order with ``align=True`` (C layout rules). CI checks ``sizeof``/``offsetof`` of each C
struct against its mirror by compiling static_asserts with NVRTC. A packed struct travels to the
kernel as one by-value argument (a NumPy void scalar, which CuPy passes as raw bytes).
"""
from __future__ import annotations

import numpy as np

# C type -> NumPy type of the same size and alignment.
CTYPES = {
    "ptr": np.uint64,      # any device pointer
    "int64_t": np.int64,
    "int32_t": np.int32,
    "float": np.float32,
    "double": np.float64,
}


class Params:
    """A C struct mirror. ``fields`` is a list of (name, ctype) in declaration order."""

    def __init__(self, c_name: str, fields: list[tuple[str, str]]):
        self.c_name = c_name
        self.fields = fields
        self.names = [n for n, _ in fields]
        self.dtype = np.dtype([(n, CTYPES[t]) for n, t in fields], align=True)
        self._defaults = tuple(0 for _ in fields)

    def pack(self, **values) -> np.void:
        unknown = set(values) - set(self.names)
        if unknown:
            raise KeyError(f"{self.c_name}: unknown fields {sorted(unknown)}")
        row = tuple(values.get(n, 0) for n in self.names)
        return np.array(row, dtype=self.dtype)[()]

    def layout_asserts(self) -> str:
        """C++ static_asserts that the C struct has this mirror's size and field offsets."""
        lines = [f"static_assert(sizeof({self.c_name}) == {self.dtype.itemsize}, \"sizeof {self.c_name}\");"]
        for n in self.names:
            off = self.dtype.fields[n][1]
            lines.append(f"static_assert(__builtin_offsetof({self.c_name}, {n}) == {off}, \"offset {self.c_name}.{n}\");")
        return "\n".join(lines)


def ptr(x) -> int:
    """Device pointer of a CuPy array (0 for None)."""
    return 0 if x is None else int(x.data.ptr)


def strides_elems(x) -> tuple[int, ...]:
    """Strides in elements (CuPy/NumPy report bytes)."""
    item = x.dtype.itemsize
    return tuple(s // item for s in x.strides)

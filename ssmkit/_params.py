"""Kernel parameter structs: one POD struct per kernel, mirrored here by a NumPy structured dtype.

The C side declares the struct with explicit 64-bit strides; ``Params`` declares the same fields
in the same order with ``align=True`` (C layout rules). CI checks ``sizeof``/``offsetof`` of each C
struct against its mirror by compiling static_asserts with NVRTC. A packed struct travels to the
kernel as one by-value argument (a NumPy void scalar, which CuPy passes as raw bytes).
"""
from __future__ import annotations

import struct

import numpy as np

# C type -> NumPy type of the same size and alignment.
CTYPES = {
    "ptr": np.uint64,      # any device pointer
    "int64_t": np.int64,
    "int32_t": np.int32,
    "float": np.float32,
    "double": np.float64,
}


_STRUCT = {"ptr": "Q", "int64_t": "q", "int32_t": "i", "float": "f", "double": "d"}


class Params:
    """A C struct mirror. ``fields`` is a list of (name, ctype) in declaration order."""

    def __init__(self, c_name: str, fields: list[tuple[str, str]], c_names: dict | None = None):
        """``c_names``: C spellings of fields that are array elements ({"part0": "part[0]"})."""
        self.c_name = c_name
        self.c_names = c_names or {}
        self.fields = fields
        self.names = [n for n, _ in fields]
        self.dtype = np.dtype([(n, CTYPES[t]) for n, t in fields], align=True)
        # struct.pack with explicit padding is ~10x faster than filling a structured array.
        fmt, pos = "<", 0
        for n, t in fields:
            off = self.dtype.fields[n][1]
            fmt += "x" * (off - pos) + _STRUCT[t]
            pos = off + np.dtype(CTYPES[t]).itemsize
        fmt += "x" * (self.dtype.itemsize - pos)
        self._struct = struct.Struct(fmt)
        assert self._struct.size == self.dtype.itemsize
        self.struct = self._struct          # for launches that pack in place (_launch._RawLaunch)
        self._index = {n: i for i, n in enumerate(self.names)}

    def pack(self, **values) -> np.void:
        row = [0] * len(self.names)
        index = self._index
        try:
            for k, v in values.items():
                row[index[k]] = v
        except KeyError as exc:
            raise KeyError(f"{self.c_name}: unknown field {exc}") from None
        return np.frombuffer(self._struct.pack(*row), dtype=self.dtype)[0]

    def row(self, **values) -> list:
        """A field list in declaration order (missing fields 0), for ``pack_row``."""
        row = [0] * len(self.names)
        for k, v in values.items():
            row[self._index[k]] = v
        return row

    def index(self, name: str) -> int:
        return self._index[name]

    def pack_row(self, row: list) -> np.void:
        """Pack a full field list (see ``row``): the hot path of prepared launches (~2 us)."""
        return np.frombuffer(self._struct.pack(*row), dtype=self.dtype)[0]

    def layout_asserts(self) -> str:
        """C++ static_asserts that the C struct has this mirror's size and field offsets."""
        lines = [f"static_assert(sizeof({self.c_name}) == {self.dtype.itemsize}, \"sizeof {self.c_name}\");"]
        for n in self.names:
            off = self.dtype.fields[n][1]
            # __INTADDR__ rather than __builtin_offsetof: NVRTC 13.0 (CI's pin) lacks the latter.
            lines.append(f"static_assert(__INTADDR__(&((({self.c_name}*)0)->{self.c_names.get(n, n)})) == {off}, "
                         f"\"offset {self.c_name}.{n}\");")
        return "\n".join(lines)


def ptr(x) -> int:
    """Device pointer of a CuPy array (0 for None)."""
    return 0 if x is None else int(x.data.ptr)


def strides_elems(x) -> tuple[int, ...]:
    """Strides in elements (CuPy/NumPy report bytes)."""
    item = x.dtype.itemsize
    return tuple(s // item for s in x.strides)

"""Per-layout launch plans: validate a call's layout once, then launch with pointers only.

A call's *layout* is everything validation and the launch configuration depend on: each
array's shape, strides, dtype, device and 16-byte alignment, plus the flags. The first call of a
layout validates and builds a plan; later calls with an equal layout key skip straight to the
launch. Any argument that is not a ``cupy.ndarray`` takes the full (validating) path.
"""
from __future__ import annotations

import sys

from . import _fork

_cupy_ndarray = None


class _NoCupy:  # stands in for cupy.ndarray where CuPy is not installed: nothing matches it
    pass


def ndarray_type():
    global _cupy_ndarray
    if _cupy_ndarray is None:
        try:
            import cupy

            _cupy_ndarray = cupy.ndarray
        except ImportError:
            _cupy_ndarray = _NoCupy
    return _cupy_ndarray


def loaded_ndarray_type():
    """cupy.ndarray if CuPy is already imported, else None: a fast type test for hot paths that
    must not pay CuPy's import on NumPy inputs."""
    if _cupy_ndarray is not None:
        return None if _cupy_ndarray is _NoCupy else _cupy_ndarray
    mod = sys.modules.get("cupy")
    return ndarray_type() if mod is not None and hasattr(mod, "ndarray") else None


def layout_key(arrays, flags: tuple):
    """(key, ptrs) for CuPy arrays (None entries allowed), or (None, None) if any argument is
    not a cupy.ndarray. About 0.7 us per array."""
    nd = _cupy_ndarray or ndarray_type()
    key = list(flags)
    ptrs = []
    add_key, add_ptr = key.append, ptrs.append
    for a in arrays:
        if a is None:
            add_key(None)
            add_ptr(0)
            continue
        if type(a) is not nd:
            return None, None
        mem = a.data
        p = mem.ptr
        add_ptr(p)
        add_key((a.shape, a.strides, a.dtype, mem.device_id, p & 15))
    if _fork.FORKED:          # a forked child: the GPU may be unusable here (one global read)
        _fork.check()
    return tuple(key), ptrs


class PlanCache(dict):
    """A bounded dict of plans (cleared when full: layouts rarely number more than a handful).

    Shared by every thread of the process without a lock: ``get``/``put`` are single dict
    operations (atomic under the GIL), two threads that miss together each build an equal plan
    (the last one stays), and a plan never changes what it launches once built (its lazily made
    parts, e.g. the raw launcher, are made whole and stored by one assignment), so threads that
    share it launch with their own pointers on their own streams."""

    def __init__(self, max_size: int = 256):
        super().__init__()
        self.max_size = max_size

    def put(self, key, plan):
        if key is None:
            return
        if len(self) >= self.max_size:
            self.clear()
        self[key] = plan

"""Which array library a call runs on, and dtype names that work across NumPy, CuPy and torch.

NumPy arrays run on the float64 reference (the CPU path); CuPy arrays run the CUDA kernels.
Anything else that speaks DLPack is viewed zero-copy as a CuPy array (CUDA device) or a NumPy
array (CPU). Mixing array types or devices in one call is an error, never a silent copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _fork

NUMPY = "numpy"
CUPY = "cupy"

# Storage dtypes kernels accept for activations, by name (bfloat16 has no NumPy builtin).
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
COMPLEX_NAMES = ("complex64", "complex128")


_DTYPE_NAMES: dict = {}


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', ... for NumPy/CuPy arrays. Hot path: NumPy computes ``dtype.name``
    in Python on every access (~5 us), so names are cached per dtype object."""
    dt = x.dtype
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = np.dtype(dt).name
    return name


def _is_cupy(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("cupy")


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def backend_of(op: str, named: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Decide NumPy or CuPy for the arrays in ``named`` (None entries skipped).

    Returns the backend and the arrays, DLPack-foreign ones converted zero-copy.
    Raises TypeError for a mix of array types or a non-array, ValueError for a mix of devices.
    """
    kinds: dict[str, str] = {}
    out: dict[str, Any] = {}
    for name, x in named.items():
        if x is None:
            out[name] = None
            continue
        if _is_numpy(x):
            kinds[name] = NUMPY
        elif _is_cupy(x):
            kinds[name] = CUPY
        elif hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
            dev_type, _ = x.__dlpack_device__()
            if int(dev_type) == 1:  # kDLCPU
                x = np.from_dlpack(x)
                kinds[name] = NUMPY
            else:
                from ._cuda_env import check_driver, import_cupy

                _fork.check()                 # a forked child: one clear error, not a CUDA one
                cupy = import_cupy()          # an ImportError naming the install extra if missing
                check_driver(cupy)            # once per process: the driver runs this CuPy build
                x = cupy.from_dlpack(x)
                kinds[name] = CUPY
        else:
            raise TypeError(f"{op}: argument '{name}' must be a NumPy or CuPy array (or any DLPack "
                            f"array), got {type(x).__name__}")
        out[name] = x
    found = set(kinds.values())
    if len(found) > 1:
        detail = ", ".join(f"{n}: {k}" for n, k in kinds.items())
        raise TypeError(f"{op}: all arrays must be of one kind (all NumPy for the CPU reference or "
                        f"all CuPy for the GPU); got {detail}")
    backend = found.pop() if found else NUMPY
    if backend == CUPY:
        _fork.check()                         # a forked child: one clear error, not a CUDA one
        _fork.note_gpu_use()
        devices = {name: x.device.id for name, x in out.items() if x is not None}
        if len(set(devices.values())) > 1:
            detail = ", ".join(f"{n}: cuda:{d}" for n, d in devices.items())
            raise ValueError(f"{op}: all arrays must be on one GPU; got {detail}")
    return backend, out


def is_complex(x) -> bool:
    return dtype_name(x) in COMPLEX_NAMES


def check_current_device(op: str, named: dict, device: int) -> None:
    """Every CuPy array in ``named`` must live on ``device`` (the current one): kernels launch there."""
    for name, a in named.items():
        if a is not None and a.device.id != device:
            raise ValueError(f"{op}: argument '{name}' is on cuda:{a.device.id} but the current device is "
                             f"cuda:{device}; call under `with cupy.cuda.Device({a.device.id}):`")

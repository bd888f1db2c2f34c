"""Moving float64 test problems to the GPU in a kernel's dtypes, and back."""
from __future__ import annotations

import numpy as np

try:
    import ml_dtypes  # bfloat16 for NumPy/CuPy arrays

    BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - without ml_dtypes there is no bf16 array to test with
    BF16 = None


def np_dtype(name: str):
    if name == "bfloat16":
        if BF16 is None:
            import pytest

            pytest.skip("bfloat16 needs ml_dtypes")
        return BF16
    return np.dtype(name)


def rounded(x: np.ndarray | None, name: str):
    """``x`` cast to dtype ``name`` on the host (what the device will see), or None."""
    if x is None:
        return None
    if np.iscomplexobj(x) and not name.startswith("complex"):
        raise TypeError(f"complex array for real dtype {name}")
    return np.asarray(x, order="C").astype(np_dtype(name))


def to_device(x: np.ndarray | None):
    import cupy

    return None if x is None else cupy.asarray(x)


def as64(x):
    """float64 / complex128 NumPy copy of a NumPy or CuPy array (None passes)."""
    if x is None:
        return None
    if hasattr(x, "get"):
        x = x.get()
    x = np.asarray(x)
    if x.dtype == BF16 or x.dtype == np.float16:
        x = x.astype(np.float32)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def poison(shape, dtype_name):
    """A NaN-filled device array: any element a kernel fails to write fails the comparison."""
    import cupy

    a = cupy.empty(shape, dtype=np_dtype(dtype_name))
    a.fill(np.nan)
    return a


def sync_check():
    """Wait for the device; CuPy raises any asynchronous CUDA error from the launches here."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()

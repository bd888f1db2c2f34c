"""Comparisons against the float64 reference: one tolerance table keyed by dtype, reports that
show max-abs and relative-RMS error and the first mismatching indices. NaN never passes."""
from __future__ import annotations

import numpy as np

# (rtol, atol) for outputs, by the storage dtype of the kernel's inputs. fp32 and bf16 are at
# least as tight as upstream mamba_ssm's own tests (fp32 6e-4/2e-3, bf16 3e-2/5e-2).
TOL = {
    "float64": (1e-10, 1e-10),
    "complex128": (1e-10, 1e-10),
    "float32": (6e-4, 2e-3),
    "complex64": (6e-4, 2e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (3e-2, 5e-2),
}
# Gradients accumulate over L (and over B for weights): a small multiple of the output tolerance.
GRAD_FACTOR = 3.0


def to_numpy(x) -> np.ndarray:
    if x is None:
        return None
    if hasattr(x, "detach") and hasattr(x, "cpu"):      # torch tensor, on any device
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    if hasattr(x, "get"):                                # CuPy array
        x = x.get()
    x = np.asarray(x)
    if x.dtype.name == "bfloat16" or str(x.dtype) == "bfloat16":
        x = x.astype(np.float32)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def assert_close(name: str, got, want, dtype: str, grad: bool = False, scale: float = 1.0) -> dict:
    """Assert ``got`` matches ``want`` within the dtype's tolerance; return the error report."""
    rtol, atol = TOL[dtype]
    if grad:
        rtol, atol = rtol * GRAD_FACTOR, atol * GRAD_FACTOR
    rtol, atol = rtol * scale, atol * scale
    g, w = to_numpy(got), to_numpy(want)
    assert g.shape == w.shape, f"{name}: shape {g.shape} != reference {w.shape}"
    bad_nan = ~np.isfinite(g) & np.isfinite(w)
    diff = np.abs(g - w)
    denom = np.sqrt(np.mean(np.abs(w) ** 2)) or 1.0
    rel_rms = float(np.sqrt(np.mean(diff ** 2)) / denom) if diff.size else 0.0
    # Tolerance is relative to the element and to the tensor's RMS scale (a cancelling sum in
    # fp32 cannot be more accurate than its terms).
    lim = atol + rtol * np.maximum(np.abs(w), denom)
    bad = bad_nan | ~(diff <= lim)
    report = {"max_abs": float(np.nanmax(diff)) if diff.size else 0.0, "rel_rms": rel_rms,
              "n_bad": int(bad.sum())}
    if bad.any():
        idx = np.argwhere(bad)[:5]
        samples = ", ".join(f"{tuple(int(i) for i in ix)}: got {g[tuple(ix)]!r} want {w[tuple(ix)]!r}" for ix in idx)
        raise AssertionError(f"{name} ({dtype}): {report['n_bad']} of {g.size} elements off "
                             f"(max abs {report['max_abs']:.3g}, rel RMS {rel_rms:.3g}, rtol {rtol}, "
                             f"atol {atol}); first: {samples}")
    return report

"""Run representative causal_conv1d variants once each, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_causal_conv1d.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_causal_conv1d.py

Covers forward / backward (channel-first, channel-last, misaligned and strided views, seq_idx
with padding, initial / final states, L < W, D not a multiple of the vector width) and the decode
update (shift register, ring buffer, pool with a padding row), in bf16 and fp32. Small sizes:
the sanitizer slows kernels down by orders of magnitude. Exits non-zero on a CUDA error.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def dev(a, dtype, layout="cf"):
    """Upload float64 host array ``a`` in ``dtype`` with a layout: cf, cl, misaligned, strided."""
    import cupy

    h = a.astype(_bf16() if dtype == "bfloat16" else dtype)
    if layout == "cf" or a.ndim != 3:
        return cupy.asarray(np.ascontiguousarray(h))
    if layout == "cl":
        return cupy.asarray(np.ascontiguousarray(h.transpose(0, 2, 1))).transpose(0, 2, 1)
    if layout == "misaligned":
        flat = np.zeros(h.size + 1, h.dtype)
        flat[1:] = h.ravel()
        return cupy.asarray(flat)[1:].reshape(h.shape)
    if layout == "strided":
        buf = np.zeros(h.shape[:2] + (2 * h.shape[2],), h.dtype)
        buf[..., ::2] = h
        return cupy.asarray(buf)[..., ::2]
    raise ValueError(layout)


def main():
    import cupy
    import ssmkit

    rng = np.random.default_rng(0)
    n = 0
    for dt, wdt in (("bfloat16", "float32"), ("float32", "float32")):
        for (B, D, L, W) in ((2, 70, 600, 4), (1, 13, 2, 8), (2, 130, 1100, 3)):
            seq = np.sort(rng.integers(-1, 4, (B, L)), axis=1).astype(np.int32)
            for layout in ("cf", "cl", "misaligned", "strided"):
                for use_seq in (False, True):
                    x = dev(rng.standard_normal((B, D, L)), dt, layout)
                    w = dev(rng.standard_normal((D, W)), wdt)
                    b = dev(rng.standard_normal(D), wdt)
                    init = dev(rng.standard_normal((B, D, W - 1)), dt)
                    s = cupy.asarray(seq) if use_seq else None
                    out, fin = ssmkit.causal_conv1d(x, w, b, "silu", seq_idx=s, initial_states=init,
                                                    return_final_states=True)
                    dout = dev(rng.standard_normal((B, D, L)), dt, layout)
                    dfin = dev(rng.standard_normal((B, D, W - 1)), dt)
                    ssmkit.causal_conv1d_bwd(x, w, b, dout, "silu", seq_idx=s, initial_states=init,
                                             dfinal_states=dfin)
                    ssmkit.causal_conv1d_bwd(x, w, None, dout, None, seq_idx=s)
                    n += 3
        for ring in (False, True):
            for L_new in (None, 3):
                B, D, W, S = 3, 200, 4, 5
                xs = (B, D) if L_new is None else (B, D, L_new)
                state = dev(rng.standard_normal((B + 1, D, S)), "float32")
                csl = cupy.asarray(rng.integers(0, 9, B).astype(np.int32)) if ring else None
                idx = cupy.asarray(np.array([3, -1, 0], np.int32))
                ssmkit.causal_conv1d_update(dev(rng.standard_normal(xs), dt), state, dev(rng.standard_normal((D, W)), wdt),
                                            dev(rng.standard_normal(D), wdt), "silu", cache_seqlens=csl,
                                            conv_state_indices=idx)
                n += 1
    cupy.cuda.runtime.deviceSynchronize()
    print(f"sanitize_causal_conv1d: {n} calls ran")


if __name__ == "__main__":
    main()

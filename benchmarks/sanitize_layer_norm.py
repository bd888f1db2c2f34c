"""Representative layer_norm variants (forward, backward, the partial-row fold), each run once at
small sizes, for compute-sanitizer (memcheck / racecheck: the group sums and the fold use shared
memory and block barriers):

    compute-sanitizer --tool racecheck python benchmarks/sanitize_layer_norm.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402


def main():
    import cupy
    import ssmkit
    from gpu_util import rounded

    rng = np.random.default_rng(0)
    cases = [  # (shape, x dtype, weight dtype, residual dtype or None, residual_in_fp32, rms, bias)
        ((3, 5, 64), "bfloat16", "float32", "float32", False, True, False),      # one warp per row, 8 rows a block
        ((7, 2051), "bfloat16", "bfloat16", "bfloat16", False, False, True),     # odd H: scalar tails, 9 warps
        ((4, 2048), "float16", "float16", None, True, True, True),               # fp32 residual_out
        ((2, 9000), "float32", "float32", "float32", False, False, True),        # kIters = 4, 1024-thread groups
        ((5, 17000), "bfloat16", "float32", "float32", False, True, False),      # kIters = 4 in 16-bit
        ((600, 96), "float64", "float64", "float64", False, False, True),        # fp64, many groups per block
    ]
    for shape, dt, wdt, rdt, rif32, rms, bias in cases:
        H = shape[-1]
        x = cupy.asarray(rounded(rng.standard_normal(shape), dt))
        w = cupy.asarray(rounded(rng.standard_normal(H), wdt))
        b = cupy.asarray(rounded(rng.standard_normal(H), wdt)) if bias else None
        r = cupy.asarray(rounded(rng.standard_normal(shape), rdt)) if rdt else None
        y, rout, mean, rstd = ssmkit.layer_norm_fwd(x, w, b, residual=r, residual_in_fp32=rif32, is_rms_norm=rms)
        dy = cupy.asarray(rounded(rng.standard_normal(shape), dt))
        drout = cupy.ones_like(rout)
        ssmkit.layer_norm_bwd(dy, rout, w, b, mean, rstd, drout, has_residual=r is not None, is_rms_norm=rms)
        cupy.cuda.runtime.deviceSynchronize()
        print("ok", shape, dt, wdt, rdt, "rms" if rms else "ln", flush=True)


if __name__ == "__main__":
    main()

"""Probe: time the selective-scan forward kernel alone under variations (for NOTES.md),
and print the kernel's registers / local memory. Not a benchmark of record."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402

import ssmkit  # noqa: E402
from benchmarks.bench_selective_scan import make  # noqa: E402
from benchmarks.common import time_cuda  # noqa: E402
from ssmkit.ops import selective_scan as op  # noqa: E402
from ssmkit._compile import get_kernel  # noqa: E402


def main():
    B, D, L = 8, 1536, 2048
    for dtype in ("bf16", "fp32"):
        for N in (1, 16):
            for full in (True, False):
                args, kw, dt = make(B, D, L, N, dtype, full)
                ms = time_cuda(lambda: ssmkit.selective_scan(**args, **kw), warmup=3, iters=10)
                print(f"{dtype} N={N:2d} full={full!s:5s} fwd {ms:.4f} ms  per-n {ms / N:.4f}", flush=True)
        args, kw, dt = make(B, D, L, 16, dtype, True)
        args["B"] = args["B"][0, 0, :, :1].repeat(D, axis=1).T.astype("float32").copy()  # constant (D, N)
        args["C"] = args["B"].copy()
        ms = time_cuda(lambda: ssmkit.selective_scan(**args, **kw), warmup=3, iters=10)
        print(f"{dtype} N=16 constant B/C fwd {ms:.4f} ms", flush=True)
    for cfg in (op.kernel_config("bfloat16", "float32", True, True), op.kernel_config("float32", "float32", True, True)):
        for ref in (op.fwd_ref(cfg), op.bwd_ref(cfg)):
            k = get_kernel(ref)
            a = k.attributes
            print(ref.name, {x: a[x] for x in ("num_regs", "local_size_bytes", "max_threads_per_block")})


if __name__ == "__main__":
    main()

"""Probe: where the selective-scan forward's time goes (for NOTES.md). Not a benchmark of record.

Prints the Python host time per call (tiny problem, no sync), a profile of it, and per anchor
shape the call time against the kernel alone (pre-packed parameters, CUDA events)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402

import ssmkit  # noqa: E402
from benchmarks.bench_selective_scan import make  # noqa: E402
from benchmarks.common import time_cuda  # noqa: E402
from ssmkit.ops import selective_scan as op  # noqa: E402
from ssmkit._compile import get_kernel  # noqa: E402


def kernel_only(args, kw):
    """Time the forward kernel launch alone (the plan's prepared launch, parameters packed once)."""
    from ssmkit._launch import Prepared

    captured = {}
    orig = Prepared.row

    def spy(self, params, row):
        captured.setdefault("call", (self, params, list(row)))
        orig(self, params, row)

    Prepared.row = spy
    try:
        ssmkit.selective_scan(**args, **kw)
    finally:
        Prepared.row = orig
    return time_cuda(lambda: orig(*captured["call"]), 3, 20)


def host_us(fn, calls: int) -> float:
    """Host microseconds per call over ``calls`` back-to-back calls (no sync inside)."""
    cupy.cuda.runtime.deviceSynchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t) / calls * 1e6
    cupy.cuda.runtime.deviceSynchronize()
    return us


def main():
    args, kw, _ = make(1, 8, 16, 4, "bf16", True)
    call = lambda: ssmkit.selective_scan(**args, **kw)  # noqa: E731
    for _ in range(20):
        call()
    print(f"host time per selective_scan call (tiny, no sync): {host_us(call, 200):.1f} us", flush=True)
    import ssmkit._launch as launch_mod

    for raw in (False, True, False, True):
        launch_mod.RAW_LAUNCH = raw
        print(f"  RAW_LAUNCH={raw}: {host_us(call, 500):.1f} us per call", flush=True)
    launch_mod.RAW_LAUNCH = True
    import cProfile
    import pstats

    args, kw, _ = make(1, 8, 16, 4, "bf16", True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        ssmkit.selective_scan(**args, **kw)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    from benchmarks.bench_selective_scan import SHAPES

    for (B, D, L, N) in SHAPES:
        for dtype in ("bf16", "fp32"):
            args, kw, _ = make(B, D, L, N, dtype, True)
            ms = time_cuda(lambda: ssmkit.selective_scan(**args, **kw), warmup=3, iters=20)
            ko = kernel_only(args, kw)
            print(f"fwd b{B} d{D} l{L} n{N} {dtype}: call {ms:.4f} ms  kernel {ko:.4f} ms  "
                  f"(call - kernel {1e3 * (ms - ko):.1f} us)", flush=True)
            del args, kw
    for cfg in (op.kernel_config("bfloat16", "float32", True, True), op.kernel_config("float32", "float32", True, True)):
        for ref in (op.fwd_ref(cfg), op.bwd_ref(cfg)):
            a = get_kernel(ref).attributes
            print(ref.name, {x: a[x] for x in ("num_regs", "local_size_bytes")})


if __name__ == "__main__":
    main()

"""Probe: where the selective-scan backward's time goes (for NOTES.md). Not a benchmark of record."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402

import ssmkit  # noqa: E402
from benchmarks.bench_selective_scan import make  # noqa: E402
from benchmarks.common import time_cuda  # noqa: E402
from ssmkit.ops import selective_scan as op  # noqa: E402


def bwd_kernel_only(args, kw, det=False):
    kw = dict(kw)
    _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)
    dout = cupy.ones_like(args["u"])
    ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved)
    plan = next(reversed(op._BWD_PLANS.values()))
    captured = {}
    orig = plan.launch
    plan.launch = lambda a: captured.setdefault("a", a) and orig(a)
    ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved)
    plan.launch = orig
    a = captured["a"]
    full = time_cuda(lambda: ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved), 3, 10)
    return time_cuda(lambda: orig(a), 3, 10), full


def main():
    B, D, L = 8, 1536, 2048
    for det in (True,):
        for dtype in ("bf16", "fp32"):
            args, kw, _ = make(B, D, L, 16, dtype, True)
            k, f = bwd_kernel_only(args, kw, det)
            print(f"bwd {dtype} N=16 full deterministic={det}: kernel {k:.4f} ms, call {f:.4f} ms", flush=True)
    for dtype in ("bf16",):
        for N, full in ((1, False),):
            args, kw, _ = make(B, D, L, N, dtype, full)
            k, f = bwd_kernel_only(args, kw)
            print(f"bwd {dtype} N={N} full={full}: kernel {k:.4f} ms, call {f:.4f} ms", flush=True)
        args, kw, _ = make(B, D, L, 16, dtype, True)
        args["B"] = cupy.ascontiguousarray(args["B"][0, 0, :, :1].repeat(D, axis=1).T.astype("float32"))
        args["C"] = args["B"].copy()
        k, f = bwd_kernel_only(args, kw)
        print(f"bwd {dtype} N=16 constant B/C: kernel {k:.4f} ms, call {f:.4f} ms", flush=True)
    if len(sys.argv) > 1:  # one launch for ncu
        args, kw, _ = make(B, D, L, 16, "bf16", True)
        _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)
        ssmkit.selective_scan_bwd(cupy.ones_like(args["u"]), **args, **kw, saved=saved)
        cupy.cuda.runtime.deviceSynchronize()


if __name__ == "__main__":
    main()

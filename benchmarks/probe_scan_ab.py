"""Probe: selective-scan call times for A/B comparisons between package trees (for NOTES.md).
Not a benchmark of record.

Run it once per tree in the same device call, alternating (device runs differ by up to ~10%):

    PYTHONPATH=/tmp/treeA python benchmarks/probe_scan_ab.py --tag A
    PYTHONPATH=$PWD       python benchmarks/probe_scan_ab.py --tag B

Per shape and dtype: ``selective_scan`` (inf), ``selective_scan_fwd`` (fwd), ``selective_scan_bwd``
(bwd) and the last two back to back (fwdbwd), ms, median of CUDA events around each call; with
``--host``, also host microseconds per call (200 calls back to back, best of 5). One JSON line per
row on stdout and appended to $OUT/ab.jsonl. ``--ncu``: run one fwd+bwd per row between
cudaProfilerStart/Stop (``ncu --profile-from-start off``), no timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_selective_scan import make  # noqa: E402
from benchmarks.common import time_cuda  # noqa: E402

ANCHOR_SHAPES = "1,5120,8192,16;8,1536,2048,16;16,1536,512,16;4,4096,2048,16"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default=ANCHOR_SHAPES, help="B,D,L,N;B,D,L,N;...")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--ncu", action="store_true")
    a = ap.parse_args(argv)
    import cupy

    import ssmkit

    out_dir = os.environ.get("OUT", "/tmp")
    for sh in a.shapes.split(";"):
        B, D, L, N = map(int, sh.split(","))
        for dt in a.dtypes.split(","):
            args, kw, _ = make(B, D, L, N, dt, True)
            dout = cupy.random.default_rng(1).standard_normal((B, D, L), dtype=cupy.float32).astype(args["u"].dtype)
            _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)

            def inf():
                return ssmkit.selective_scan(**args, **kw)

            def fwd():
                return ssmkit.selective_scan_fwd(**args, **kw)

            def bwd():
                return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved)

            def fwdbwd():
                _, _, s = ssmkit.selective_scan_fwd(**args, **kw)
                return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=s)

            if a.ncu:
                fwdbwd()
                cupy.cuda.runtime.deviceSynchronize()
                cupy.cuda.profiler.start()
                fwdbwd()
                cupy.cuda.runtime.deviceSynchronize()
                cupy.cuda.profiler.stop()
                continue
            r = dict(tag=a.tag, shape=sh, dtype=dt, inf=time_cuda(inf, 5, 30), fwd=time_cuda(fwd, 5, 20),
                     bwd=time_cuda(bwd, 5, 20), fwdbwd=time_cuda(fwdbwd, 5, 20))
            if a.host:
                best = float("inf")
                for _ in range(5):
                    cupy.cuda.runtime.deviceSynchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):
                        inf()
                    best = min(best, (time.perf_counter() - t0) / 200 * 1e6)
                    cupy.cuda.runtime.deviceSynchronize()
                r["inf_host_us"] = round(best, 1)
            print(json.dumps(r), flush=True)
            with open(f"{out_dir}/ab.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Selective-scan benchmark: ssmkit vs the upstream anchors (benchmarks/anchors/h200.json).

Rows as the anchors define them: u, delta, z (B, D, L) in the input dtype; A (D, N) fp32;
B, C (B, 1, N, L) variable in the input dtype; D, delta_bias (D,) fp32; delta_softplus=True.
fwd = one forward call; fwdbwd = selective_scan_fwd + selective_scan_bwd, each timed as the
user calls it (Python included). Extra rows: N = 64 / 256, an odd L, and no optional inputs.
Also the first-use costs: a cold NVRTC compile and a disk-cache load, each in a new process.

    python benchmarks/bench_selective_scan.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import load_anchors, print_table, row, time_cuda, write_json  # noqa: E402

SHAPES = [(8, 1536, 2048, 16), (4, 4096, 2048, 16), (1, 5120, 8192, 16), (16, 1536, 512, 16)]
EXTRA = [(8, 1536, 2048, 64), (4, 1536, 2048, 256), (8, 1536, 2047, 16)]


def make(B, D, L, N, dtype, full=True, seed=0):
    import cupy

    rng = cupy.random.default_rng(seed)
    dt = {"bf16": "bfloat16", "fp32": "float32"}[dtype]

    def act(*shape, lo=None, hi=None):
        x = rng.uniform(lo, hi, shape, dtype=cupy.float32) if lo is not None else rng.standard_normal(shape, dtype=cupy.float32)
        return x.astype(_np_dtype(dt))

    args = dict(u=act(B, D, L), delta=act(B, D, L, lo=-4.0, hi=0.5),
                A=-cupy.exp(rng.standard_normal((D, N), dtype=cupy.float32)),
                B=act(B, 1, N, L), C=act(B, 1, N, L))
    kw = {}
    if full:
        kw = dict(D=rng.standard_normal(D, dtype=cupy.float32), z=act(B, D, L),
                  delta_bias=rng.uniform(-0.5, 0.5, D, dtype=cupy.float32), delta_softplus=True)
    return args, kw, dt


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def bench_shape(B, D, L, N, dtype, anchors, full=True, tag=""):
    import cupy
    import ssmkit

    args, kw, dt = make(B, D, L, N, dtype, full)
    size = np.dtype(_np_dtype(dt)).itemsize
    n_act = 4 if full else 3          # u, delta, (z), out
    nbytes = (n_act * B * D * L + 2 * B * N * L) * size
    exps = B * D * L * N
    name = f"b{B} d{D} l{L} n{N} {dtype}{tag}"
    fwd = lambda: ssmkit.selective_scan(**args, **kw)  # noqa: E731
    ms = time_cuda(fwd, warmup=5, iters=30)
    rows = [row(f"ss_fwd {name}", ms, anchors, nbytes=nbytes, exps=exps)]
    dout = cupy.asarray(cupy.random.default_rng(1).standard_normal((B, D, L), dtype=cupy.float32)).astype(args["u"].dtype)

    def fwdbwd():
        out, last, saved = ssmkit.selective_scan_fwd(**args, **kw)
        return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved)

    ms2 = time_cuda(fwdbwd, warmup=3, iters=15)
    rows.append(row(f"ss_fwdbwd {name}", ms2, anchors, exps=2 * exps))
    del args, kw, dout
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


FIRST_USE = r"""
import os, sys, time, json
t0 = time.perf_counter()
import cupy, ssmkit
from ssmkit.ops import selective_scan as op
t1 = time.perf_counter()
cfg = op.kernel_config("bfloat16", "float32", True, True)
from ssmkit._compile import get_kernel
get_kernel(op.fwd_ref(cfg))
cupy.cuda.runtime.deviceSynchronize()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "kernel_s": t2 - t1, "total_s": t2 - t0}))
"""


def first_use() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        res = {}
        for label in ("cold_compile", "disk_cache_load"):
            p = subprocess.run([sys.executable, "-c", FIRST_USE], env=env, capture_output=True, text=True,
                               cwd=str(Path(__file__).resolve().parents[1]))
            import json

            res[label] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.stderr[-2000:]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="headline shape only")
    a = ap.parse_args()
    anchors = load_anchors()
    rows = []
    shapes = SHAPES[:1] if a.quick else SHAPES
    t0 = time.time()
    for (B, D, L, N) in shapes:
        for dtype in ("bf16", "fp32"):
            rows += bench_shape(B, D, L, N, dtype, anchors)
            print(f"  {rows[-1]['name']}: {rows[-2]['ms']:.4f} / {rows[-1]['ms']:.4f} ms  ({time.time() - t0:.0f}s)", flush=True)
    if not a.quick:
        for (B, D, L, N) in EXTRA:
            rows += bench_shape(B, D, L, N, "bf16", anchors)
        rows += bench_shape(8, 1536, 2048, 16, "bf16", anchors, full=False, tag=" plain")
    fu = first_use()
    print_table(rows)
    print("first use:", fu)
    write_json(Path(a.out) / "selective_scan.json", rows, {"first_use": fu})


if __name__ == "__main__":
    main()

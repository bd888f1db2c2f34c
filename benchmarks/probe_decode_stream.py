"""How fast can a decode step stream its state? In-place read-modify-write ceilings beside
ssmkit's selective_state_update, at the anchor row b256 d4096 n16 (fp32 state, 64 MiB per
buffer; buffers rotated so L2 holds none between uses). Issue 14 asks for >= 3 TB/s of state
traffic; run 10 measured 1.47 TB/s per call (1.77 in a graph).

Probe kernels (each: state = state * a[n] + b[n], 16 fp32 states per row, row sums of s * c[n]
reduced over the 4 lanes of a row and written out, as the real kernel does):

* ``rows4_consecutive``: 4 lanes per row, each lane 4 consecutive rows (ssmkit's mapping today):
  one warp instruction touches 8 row groups 256 B apart, 64 B of each.
* ``rows4_interleaved``: 4 lanes per row, a lane's 4 rows 8 rows apart: one warp instruction
  reads 512 contiguous bytes.
* ``rows1``: 4 lanes per row, one row per lane (4x the threads, 1 load in flight per thread).
* ``copy``: a plain float4 in-place scale, no reduction (the RMW ceiling).

    python benchmarks/probe_decode_stream.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCE = r"""
extern "C" __global__ void copy(float4* s, long long n4) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) { float4 v = s[i]; v.x = v.x * 0.999f + 1e-3f; v.y = v.y * 0.999f + 1e-3f;
                  v.z = v.z * 0.999f + 1e-3f; v.w = v.w * 0.999f + 1e-3f; s[i] = v; }
}

template <int kRows, bool kInterleave>
__device__ void rows_kernel(float4* s, const float* a, const float* b, const float* c, float* out, long long rows) {
    // 4 lanes per row (16 fp32 = 4 float4); a warp = 8 row slots; kRows rows per lane.
    const int lane = threadIdx.x & 31, q = lane & 3, slot = lane >> 2;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long base = warp * 8 * kRows;
    float4 v[kRows];
    long long r[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
        r[j] = kInterleave ? base + j * 8 + slot : base + slot * kRows + j;
        if (r[j] < rows) v[j] = s[r[j] * 4 + q];
    }
    const float4 av = ((const float4*)a)[q], bv = ((const float4*)b)[q], cv = ((const float4*)c)[q];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
        float acc = 0.f;
        if (r[j] < rows) {
            float4 n;
            n.x = v[j].x * av.x + bv.x; n.y = v[j].y * av.y + bv.y;
            n.z = v[j].z * av.z + bv.z; n.w = v[j].w * av.w + bv.w;
            s[r[j] * 4 + q] = n;
            acc = n.x * cv.x + n.y * cv.y + n.z * cv.z + n.w * cv.w;
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        if (q == 0 && r[j] < rows) out[r[j]] = acc;
    }
}
extern "C" __global__ void __launch_bounds__(128) rows4_consecutive(float4* s, const float* a, const float* b, const float* c, float* o, long long rows) { rows_kernel<4, false>(s, a, b, c, o, rows); }
extern "C" __global__ void __launch_bounds__(128) rows4_interleaved(float4* s, const float* a, const float* b, const float* c, float* o, long long rows) { rows_kernel<4, true>(s, a, b, c, o, rows); }
extern "C" __global__ void __launch_bounds__(128) rows1(float4* s, const float* a, const float* b, const float* c, float* o, long long rows) { rows_kernel<1, false>(s, a, b, c, o, rows); }
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args(argv)

    import cupy
    import numpy as np

    import ssmkit
    from benchmarks.common import bf16_dtype

    def time_cuda(fn, warmup=10, iters=100, per=20):
        """Median ms per call over runs of ``per`` back-to-back calls (host launch cost hidden
        behind the previous kernel, as in a model's layer loop)."""
        import statistics

        for _ in range(warmup):
            fn()
        cupy.cuda.runtime.deviceSynchronize()
        times = []
        for _ in range(max(1, iters // per) * 3):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            for _ in range(per):
                fn()
            e1.record()
            e1.synchronize()
            times.append(cupy.cuda.get_elapsed_time(e0, e1) / per)
        return statistics.median(times)

    B, D, N = args.batch, args.dim, 16
    rows = B * D
    nbuf = 8
    states = cupy.random.standard_normal((nbuf, rows, N), dtype=cupy.float32)
    nbytes = 2 * rows * N * 4
    mod = cupy.RawModule(code=SOURCE, options=("--std=c++17",))
    a = cupy.full(N, 0.99, cupy.float32)
    b = cupy.full(N, 0.01, cupy.float32)
    c = cupy.ones(N, cupy.float32)
    out = cupy.empty(rows, cupy.float32)
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % nbuf
        return states[it["i"]]

    res = {}
    n4 = rows * 4
    k = mod.get_function("copy")
    res["copy"] = time_cuda(lambda: k(((n4 + 255) // 256,), (256,), (nxt(), np.int64(n4))), warmup=10, iters=100)
    for name, rpl in (("rows4_consecutive", 4), ("rows4_interleaved", 4), ("rows1", 1)):
        k = mod.get_function(name)
        warps = (rows + 8 * rpl - 1) // (8 * rpl)
        grid = ((warps * 32 + 127) // 128,)
        res[name] = time_cuda(lambda k=k, grid=grid: k(grid, (128,), (nxt(), a, b, c, out, np.int64(rows))),
                              warmup=10, iters=100)
    s0 = states[0].copy()
    k = mod.get_function("rows4_interleaved")
    warps = (rows + 31) // 32
    k(((warps * 32 + 127) // 128,), (128,), (states[0], a, b, c, out, np.int64(rows)))
    want = s0.get() * 0.99 + 0.01
    ok = bool(np.allclose(states[0].get(), want, rtol=1e-6, atol=1e-6)
              and np.allclose(out.get(), want.sum(-1), rtol=1e-4, atol=1e-4))

    # ssmkit's kernel at the same shape (bench_decode's row), same rotation.
    bf = bf16_dtype()
    x = cupy.random.standard_normal((B, D), dtype=cupy.float32).astype(bf)
    dt = (cupy.random.standard_normal((B, D), dtype=cupy.float32) * 0.1).astype(bf)
    z = cupy.random.standard_normal((B, D), dtype=cupy.float32).astype(bf)
    Bm = cupy.random.standard_normal((B, N), dtype=cupy.float32).astype(bf)
    Cm = cupy.random.standard_normal((B, N), dtype=cupy.float32).astype(bf)
    A = -cupy.random.uniform(0.5, 2.0, (D, N), dtype=cupy.float32)
    Dv = cupy.ones(D, cupy.float32)
    bias = cupy.zeros(D, cupy.float32)
    o = cupy.empty((B, D), bf)
    ssu_states = states.reshape(nbuf, B, D, N)

    def ssu():
        it["i"] = (it["i"] + 1) % nbuf
        ssmkit.selective_state_update(ssu_states[it["i"]], x, dt, A, Bm, Cm, D=Dv, z=z, dt_bias=bias,
                                      dt_softplus=True, out=o)

    res["ssmkit_ssu"] = time_cuda(ssu, warmup=10, iters=100)
    table = {k: {"ms": round(v, 5), "TBps": round(nbytes / (v * 1e-3) / 1e12, 3)} for k, v in res.items()}
    print(f"b{B} d{D} n{N} fp32 state, {nbytes / 1e6:.0f} MB state traffic per call; interleaved check ok={ok}")
    for k, v in table.items():
        print(f"  {k:20s} {v['ms']:.4f} ms  {v['TBps']:.2f} TB/s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "probe_decode_stream.json").write_text(json.dumps({"rows": table, "check_ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode-step benchmark: selective_state_update (and causal_conv1d_update once ssmkit exports
it) vs the upstream anchors (benchmarks/anchors/h200.json).

Rows as the anchors define them ("ssu_step bB dD nN"): state (B, D, N) fp32; x, dt, z (B, D)
bf16; B, C (B, N) bf16; D, dt_bias (D,) fp32; dt_softplus. Each row is timed three ways:

* as the user calls it (``ssmkit.selective_state_update(..., out=out)``, CUDA events around each
  Python call) -- the anchor row;
* through a prepared ``SelectiveStateUpdatePlan`` per layer ("... plan");
* inside a captured CUDA graph ("... graph"), per call.

Every call steps a different state buffer, rotating over enough of them (>= 512 MiB in all, at
least 4) that L2 (60 MB) holds none of them between uses, as in a model with many layers. GB/s
counts the state read + write. Also the host-side Python cost per call at batch 1 (perf_counter,
no synchronization) and a Mamba-2 row (B = 64, H = 80, P = 64, N = 128, G = 1) through the
tied fast path (A, dt, dt_bias expanded along P, as Mamba-2 passes them) and the general path.

    python benchmarks/bench_decode.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import load_anchors, print_table, row, time_cuda, time_graph, write_json  # noqa: E402

SSU_ROWS = [(1, 5120, 16), (64, 5120, 16), (256, 4096, 16)]
CONV_ROWS = [(1, 5120, 4), (64, 5120, 4), (256, 4096, 4)]
ROTATE_BYTES = 512 << 20   # state bytes cycled through: > 8x the 60 MB L2
MAX_BUFFERS = 2048          # cap on rotated buffers (batch 1: 1600 states of 320 KB)
MAX_GRAPH_CALLS = 1000      # calls captured per graph (batch 1: 1000 x 320 KB = 320 MB > L2)


def bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class Rotation:
    """Buffers of one shape, handed out round-robin: buffers[i] for the i-th call."""

    def __init__(self, shape, dtype, make):
        import cupy

        per = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.n = max(4, min(MAX_BUFFERS, math.ceil(ROTATE_BYTES / per)))
        big = make((self.n,) + tuple(shape)).astype(dtype, copy=False)
        self.buffers = [big[i] for i in range(self.n)]
        self.i = 0
        self.bytes_each = per
        cupy.cuda.runtime.deviceSynchronize()

    def next(self):
        b = self.buffers[self.i]
        self.i = (self.i + 1) % self.n
        return b


def _time_three_ways(name, fn_call, fn_plan, n_buffers, anchors, nbytes, quick):
    iters = 30 if quick else 200
    rows = [row(name, time_cuda(fn_call, warmup=20, iters=iters), anchors, nbytes=nbytes)]
    if fn_plan is not None:
        rows.append(row(f"{name} plan", time_cuda(fn_plan, warmup=20, iters=iters), anchors, nbytes=nbytes))
    calls = max(20, min(n_buffers, MAX_GRAPH_CALLS))
    try:
        g = time_graph(fn_plan or fn_call, calls_per_graph=calls, warmup=2, iters=5 if quick else 20)
    except Exception as exc:  # e.g. an op that allocates per call cannot be captured
        traceback.print_exc()
        rows[0]["graph_error"] = f"{type(exc).__name__}: {exc}"
        return rows
    rows.append(row(f"{name} graph", g, anchors, nbytes=nbytes, calls_per_graph=calls))
    return rows


def host_us(fn, n=3000):
    """Host-side microseconds per call (launch included, no synchronization)."""
    import cupy

    for _ in range(100):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    cupy.cuda.runtime.deviceSynchronize()
    return round(t, 2)


def ssu_inputs(B, D, N):
    """The ssu_step rows' inputs (bf16 activations, fp32 state / A / D / dt_bias, as the anchors):
    (states Rotation, x, dt, A, B, C, kw) with kw = D, z, dt_bias, dt_softplus and a bf16 out."""
    import cupy

    rng = cupy.random.default_rng(B * 7 + D)
    act = lambda *shape, lo=None, hi=None: (  # noqa: E731
        rng.uniform(lo, hi, shape, dtype=cupy.float32) if lo is not None
        else rng.standard_normal(shape, dtype=cupy.float32)).astype(bf16())
    states = Rotation((B, D, N), np.float32, lambda s: rng.standard_normal(s, dtype=cupy.float32))
    x, dt, z = act(B, D), act(B, D, lo=-4.0, hi=0.5), act(B, D)
    Bm, Cm = act(B, N), act(B, N)
    A = -cupy.exp(rng.standard_normal((D, N), dtype=cupy.float32))
    Dv = rng.standard_normal(D, dtype=cupy.float32)
    bias = rng.uniform(-0.5, 0.5, D, dtype=cupy.float32)
    out = cupy.empty((B, D), dtype=bf16())
    return states, x, dt, A, Bm, Cm, dict(D=Dv, z=z, dt_bias=bias, dt_softplus=True, out=out)


def bench_ssu(B, D, N, anchors, quick):
    import cupy
    import ssmkit

    states, x, dt, A, Bm, Cm, kw = ssu_inputs(B, D, N)

    def call():
        ssmkit.selective_state_update(states.next(), x, dt, A, Bm, Cm, **kw)

    plans = [ssmkit.SelectiveStateUpdatePlan(s, x, dt, A, Bm, Cm, **kw) for s in states.buffers]
    k = [0]

    def plan_call():
        plans[k[0]]()
        k[0] = (k[0] + 1) % len(plans)

    name = f"ssu_step b{B} d{D} n{N}"
    nbytes = 2 * states.bytes_each
    rows = _time_three_ways(name, call, plan_call, states.n, anchors, nbytes, quick)
    if B == 1:
        rows[0]["host_us"] = host_us(call)
        rows[1]["host_us"] = host_us(plan_call)
    for r in rows:
        r["buffers"] = states.n
    del plans, states
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


def bench_mamba2(B, H, P, N, anchors, quick):
    import cupy
    import ssmkit

    rng = cupy.random.default_rng(5)
    states = Rotation((B, H, P, N), np.float32, lambda s: rng.standard_normal(s, dtype=cupy.float32))
    x = rng.standard_normal((B, H, P), dtype=cupy.float32).astype(bf16())
    z = rng.standard_normal((B, H, P), dtype=cupy.float32).astype(bf16())
    dt_h = rng.uniform(-4.0, 0.5, (B, H), dtype=cupy.float32).astype(bf16())
    Bm = rng.standard_normal((B, 1, N), dtype=cupy.float32).astype(bf16())
    Cm = rng.standard_normal((B, 1, N), dtype=cupy.float32).astype(bf16())
    A_h = -cupy.exp(rng.standard_normal(H, dtype=cupy.float32))
    D_h = rng.standard_normal(H, dtype=cupy.float32)
    bias_h = rng.uniform(-0.5, 0.5, H, dtype=cupy.float32)
    out = cupy.empty((B, H, P), dtype=bf16())
    # Mamba-2 passes per-head values expanded along P (stride 0): the tied fast path.
    tied = dict(dt=cupy.broadcast_to(dt_h[:, :, None], (B, H, P)), A=cupy.broadcast_to(A_h[:, None, None], (H, P, N)),
                dt_bias=cupy.broadcast_to(bias_h[:, None], (H, P)))
    general = {k: cupy.ascontiguousarray(v) for k, v in tied.items()}
    rows = []
    variants = (("tied", tied),) if quick else (("tied", tied), ("general", general))
    for label, w in variants:
        kw = dict(D=cupy.broadcast_to(D_h[:, None], (H, P)), z=z, dt_bias=w["dt_bias"], dt_softplus=True, out=out)

        def call(w=w, kw=kw):
            ssmkit.selective_state_update(states.next(), x, w["dt"], w["A"], Bm, Cm, **kw)

        plans = [ssmkit.SelectiveStateUpdatePlan(s, x, w["dt"], w["A"], Bm, Cm, **kw) for s in states.buffers]
        assert plans[0].tied == (label == "tied")
        k = [0]

        def plan_call(plans=plans, k=k):
            plans[k[0]]()
            k[0] = (k[0] + 1) % len(plans)

        name = f"ssu_mamba2 b{B} h{H} p{P} n{N} g1 {label}"
        rows += _time_three_ways(name, call, plan_call, states.n, anchors, 2 * states.bytes_each, quick)
    del states
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


# ---- causal_conv1d_update (written by another engineer; timed here once ssmkit exports it) ----

def _conv_update_call(fn, x, conv_state, weight, bias, out):
    """Try the out= form first (no allocation), then the plain upstream signature."""
    try:
        return fn(x, conv_state, weight, bias, activation="silu", out=out)
    except TypeError:
        return fn(x, conv_state, weight, bias, activation="silu")


def bench_conv_update(B, D, W, anchors, quick):
    import cupy
    import ssmkit

    fn = ssmkit.causal_conv1d_update
    rng = cupy.random.default_rng(B + D)
    states = Rotation((B, D, W), bf16(), lambda s: rng.standard_normal(s, dtype=cupy.float32))
    x = rng.standard_normal((B, D), dtype=cupy.float32).astype(bf16())
    out = cupy.empty((B, D), dtype=bf16())
    bias = rng.standard_normal(D, dtype=cupy.float32)
    weight = None
    for wdt in (bf16(), np.float32):  # upstream weights are in the activation dtype; fp32 also fine
        for bdt in (wdt, np.float32):
            try:
                w = rng.standard_normal((D, W), dtype=cupy.float32).astype(wdt)
                _conv_update_call(fn, x, states.buffers[0], w, bias.astype(bdt), out)
                weight, bias = w, bias.astype(bdt)
                break
            except (TypeError, ValueError):
                continue
        if weight is not None:
            break
    if weight is None:
        raise RuntimeError("causal_conv1d_update: no accepted weight/bias dtype")

    def call():
        _conv_update_call(fn, x, states.next(), weight, bias, out)

    name = f"conv_update b{B} d{D} w{W}"
    rows = _time_three_ways(name, call, None, states.n, anchors, 2 * states.bytes_each, quick)
    if B == 1:
        rows[0]["host_us"] = host_us(call)
    del states
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, no Mamba-2 general row")
    a = ap.parse_args()
    import ssmkit

    anchors = load_anchors()
    rows = []
    meta = {"rotate_bytes": ROTATE_BYTES, "errors": []}
    t0 = time.time()

    def attempt(label, fn, *args):
        try:
            got = fn(*args, anchors, a.quick)
        except Exception as exc:  # keep the other rows when one fails
            traceback.print_exc()
            meta["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
            return []
        print(f"  {label}: {[r['ms'] for r in got]} ms ({time.time() - t0:.0f}s)", flush=True)
        return got

    for B, D, N in SSU_ROWS:
        rows += attempt(f"ssu b{B}", bench_ssu, B, D, N)
    rows += attempt("ssu mamba2", bench_mamba2, 64, 80, 64, 128)
    # >>> causal_conv1d_update: timed when ssmkit exports it (another engineer's op) <<<
    if hasattr(ssmkit, "causal_conv1d_update"):
        for B, D, W in CONV_ROWS:
            rows += attempt(f"conv_update b{B}", bench_conv_update, B, D, W)
    else:
        meta["conv_update"] = "not exported by ssmkit yet: rows skipped"
    print_table(rows)
    for r in rows:
        if "host_us" in r:
            print(f"host-side Python cost per call, {r['name']}: {r['host_us']} us")
    for e in meta["errors"]:
        print("ERROR", e)
    write_json(Path(a.out) / "decode.json", rows, meta)


if __name__ == "__main__":
    main()

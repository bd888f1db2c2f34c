"""What the ssmkit.torch adapter adds per call over calling ssmkit on CuPy arrays directly.

Small shapes (short kernels), the same device memory on both sides (CuPy views of the torch
tensors, made once outside the loop). Per row, two numbers on each side:

* ``events``: median of CUDA events around each single Python call after a synchronize, so the
  GPU is idle when the call starts: (Python + launch overhead) + kernel time, as a user sees it;
* ``host``: CPU time per call over many back-to-back calls without synchronizing (the Python
  cost; the kernels are short enough that the CPU is the bottleneck).

``overhead_us`` = torch - cupy (events), the target being <= 15 us. Variants: the custom-op
(``torch.ops.ssmkit``) path called eagerly, the adapter with its view cache off, and with DLPack
views; the decode ops also inside a captured torch CUDA graph (per call), where the Python cost
disappears. Rows that fail are recorded with their error and the run continues.

    python benchmarks/bench_torch_overhead.py --out DIR [--dtype bf16|fp32] [--iters N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json  # noqa: E402


def _torch():
    import torch

    return torch


def time_events(fn, warmup: int, iters: int) -> float:
    """Median microseconds from an event before to an event after one Python call."""
    torch = _torch()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_host(fn, iters: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` CPU microseconds per call, ``iters`` calls back to back."""
    torch = _torch()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best = min(best, (t1 - t0) / iters * 1e6)
    return best


def time_graph(fn, calls: int = 20, iters: int = 50) -> float:
    """Microseconds per call replayed inside a captured torch CUDA graph (after eager warm-up)."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


class Case:
    """Tensors on the GPU and CuPy views of the same memory."""

    def __init__(self, dtype_name: str):
        torch = _torch()
        import cupy

        self.torch, self.cupy = torch, cupy
        self.dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(self, *shape, dtype=None, positive=False, scale=1.0, grad=False):
        torch = self.torch
        t = (torch.rand if positive else torch.randn)(*shape, device="cuda", generator=self.gen)
        t = (t * scale).to(dtype or self.dt)
        return t.requires_grad_(grad)

    def cp(self, t):
        return None if t is None else self.cupy.from_dlpack(t.detach())


def build_rows(dtype_name: str):
    """(name, cupy_fn, torch_fn, variants{name: fn}, graph_fn or None) per row."""
    import ssmkit
    import ssmkit.torch as st

    torch = _torch()
    c = Case(dtype_name)
    f32 = torch.float32
    rows = []

    # -- selective scan: B=1, D=128, L=128, N=16, variable B/C (1 group), z, D, delta_bias, softplus
    Bsz, D, L, N = 1, 128, 128, 16
    u, delta, z = c.randn(Bsz, D, L), c.randn(Bsz, D, L, positive=True, scale=0.5), c.randn(Bsz, D, L)
    A = -c.randn(D, N, dtype=f32, positive=True)
    Bm, Cm = c.randn(Bsz, 1, N, L), c.randn(Bsz, 1, N, L)
    Dv, db = c.randn(D, dtype=f32), c.randn(D, dtype=f32, scale=0.1)
    ts = (u, delta, A, Bm, Cm, Dv, z, db)
    cps = tuple(c.cp(t) for t in ts)

    def ss_cupy():
        ssmkit.selective_scan(*cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True)

    def ss_torch():
        st.selective_scan_fn(*ts[:5], ts[5], ts[6], ts[7], delta_softplus=True)

    def ss_op():
        torch.ops.ssmkit.selective_scan_fwd(*ts[:5], ts[5], ts[6], ts[7], None, True, False)

    rows.append(("selective_scan_fn fwd (no grad)", ss_cupy, ss_torch, {"custom op (eager)": ss_op}, None))

    tg = tuple(t.detach().clone().requires_grad_(True) for t in ts)
    dout = c.randn(Bsz, D, L)
    dout_cp = c.cp(dout)

    def ss_fwd_train_cupy():
        ssmkit.selective_scan_fwd(*cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True)

    def ss_fwd_train_torch():
        st.selective_scan_fn(*tg[:5], tg[5], tg[6], tg[7], delta_softplus=True)

    rows.append(("selective_scan_fn fwd (training: saves)", ss_fwd_train_cupy, ss_fwd_train_torch, {}, None))

    def ss_fwdbwd_cupy():
        _, _, saved = ssmkit.selective_scan_fwd(*cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True)
        ssmkit.selective_scan_bwd(dout_cp, *cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True,
                                  saved=saved)

    def ss_fwdbwd_torch():
        out = st.selective_scan_fn(*tg[:5], tg[5], tg[6], tg[7], delta_softplus=True)
        torch.autograd.grad(out, tg, dout)

    rows.append(("selective_scan_fn fwd+bwd", ss_fwdbwd_cupy, ss_fwdbwd_torch, {}, None))

    # -- causal conv1d forward: B=1, D=256, L=128, W=4, silu, bias
    x, w, bias = c.randn(1, 256, 128), c.randn(256, 4, dtype=f32), c.randn(256, dtype=f32)
    xc, wc, bc = c.cp(x), c.cp(w), c.cp(bias)
    if hasattr(ssmkit, "causal_conv1d"):
        rows.append(("causal_conv1d_fn fwd",
                     lambda: ssmkit.causal_conv1d(xc, wc, bc, activation="silu"),
                     lambda: st.causal_conv1d_fn(x, w, bias, activation="silu"),
                     {"custom op (eager)": lambda: torch.ops.ssmkit.causal_conv1d_fwd(x, w, bias, None, None, False,
                                                                                       True)},
                     None))

    # -- decode: causal_conv1d_update, B=1, D=1024, W=4; selective_state_update, B=1, D=1024, N=16
    Dd = 1024
    xd, cs, wd, bd = c.randn(1, Dd), c.randn(1, Dd, 3), c.randn(Dd, 4, dtype=f32), c.randn(Dd, dtype=f32)
    xdc, csc, wdc, bdc = c.cp(xd), c.cp(cs), c.cp(wd), c.cp(bd)
    if hasattr(ssmkit, "causal_conv1d_update"):
        rows.append(("causal_conv1d_update",
                     lambda: ssmkit.causal_conv1d_update(xdc, csc, wdc, bdc, "silu"),
                     lambda: st.causal_conv1d_update(xd, cs, wd, bd, "silu"),
                     {"custom op (eager)": lambda: torch.ops.ssmkit.causal_conv1d_update(xd, cs, wd, bd, True, None,
                                                                                          None)},
                     lambda: st.causal_conv1d_update(xd, cs, wd, bd, "silu")))

    state = c.randn(1, Dd, N, dtype=f32)
    xs, dts, zs = c.randn(1, Dd), c.randn(1, Dd, positive=True), c.randn(1, Dd)
    As, Bs, Cs = -c.randn(Dd, N, dtype=f32, positive=True), c.randn(1, N), c.randn(1, N)
    Ds, dbs = c.randn(Dd, dtype=f32), c.randn(Dd, dtype=f32)
    sargs = (state, xs, dts, As, Bs, Cs, Ds, zs, dbs)
    scps = tuple(c.cp(t) for t in sargs)
    rows.append(("selective_state_update",
                 lambda: ssmkit.selective_state_update(*scps[:6], D=scps[6], z=scps[7], dt_bias=scps[8],
                                                       dt_softplus=True),
                 lambda: st.selective_state_update(*sargs, dt_softplus=True),
                 {"custom op (eager)": lambda: torch.ops.ssmkit.selective_state_update(*sargs, True, None)},
                 lambda: st.selective_state_update(*sargs, dt_softplus=True)))

    def scale():
        xd.add_(0)
    rows.append(("(scale: torch x.add_(0) on a tiny tensor)", None, scale, {}, None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for torch_overhead.json")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--iters", type=int, default=300, help="timed calls per event measurement")
    args = ap.parse_args(argv)

    torch = _torch()
    if not torch.cuda.is_available():
        print("bench_torch_overhead: torch sees no CUDA device", file=sys.stderr)
        return 2
    from ssmkit.torch import _bridge

    warm, iters, host_iters = 30, args.iters, max(200, args.iters * 3)
    results = []
    try:
        rows = build_rows(args.dtype)
    except Exception as exc:  # e.g. bf16 without ml_dtypes: retry in fp32
        traceback.print_exc()
        if args.dtype == "fp32":
            raise
        print(f"building {args.dtype} rows failed ({exc!r}); falling back to fp32", file=sys.stderr)
        args.dtype = "fp32"
        rows = build_rows("fp32")

    for name, cupy_fn, torch_fn, variants, graph_fn in rows:
        r = {"name": name, "dtype": args.dtype}
        try:
            if cupy_fn is not None:
                r["cupy_us"] = round(time_events(cupy_fn, warm, iters), 2)
                r["cupy_host_us"] = round(time_host(cupy_fn, host_iters), 2)
            r["torch_us"] = round(time_events(torch_fn, warm, iters), 2)
            r["torch_host_us"] = round(time_host(torch_fn, host_iters), 2)
            if cupy_fn is not None:
                r["overhead_us"] = round(r["torch_us"] - r["cupy_us"], 2)
                r["host_overhead_us"] = round(r["torch_host_us"] - r["cupy_host_us"], 2)
            for vname, vfn in variants.items():
                r[f"{vname} us"] = round(time_events(vfn, warm, iters), 2)
            if cupy_fn is not None:
                old = _bridge._VIEW_CACHE_ON
                _bridge._VIEW_CACHE_ON = False
                try:
                    r["torch_us (view cache off)"] = round(time_events(torch_fn, warm, iters), 2)
                finally:
                    _bridge._VIEW_CACHE_ON = old
                old = _bridge._VIEW_MODE
                _bridge._VIEW_MODE = "dlpack"
                try:
                    r["torch_us (DLPack views)"] = round(time_events(torch_fn, warm, iters), 2)
                finally:
                    _bridge._VIEW_MODE = old
            if graph_fn is not None:
                r["torch_graph_us_per_call"] = round(time_graph(graph_fn), 3)
        except Exception as exc:
            traceback.print_exc()
            r["error"] = f"{type(exc).__name__}: {exc}"
        results.append(r)
        print(f"  {name}: {r}", flush=True)

    hdr = f"{'row':44s} {'cupy us':>9s} {'torch us':>9s} {'overhead':>9s} {'host cupy':>10s} {'host torch':>10s} {'op path':>9s} {'graph':>8s}"
    print()
    print(hdr)
    print("-" * len(hdr))

    def fmt(v, spec="9.1f"):
        return format(v, spec) if isinstance(v, (int, float)) else f"{'-':>{spec.split('.')[0]}}"

    for r in results:
        print(f"{r['name'][:44]:44s} {fmt(r.get('cupy_us'))} {fmt(r.get('torch_us'))} {fmt(r.get('overhead_us'))} "
              f"{fmt(r.get('cupy_host_us'), '10.1f')} {fmt(r.get('torch_host_us'), '10.1f')} "
              f"{fmt(r.get('custom op (eager) us'))} {fmt(r.get('torch_graph_us_per_call'), '8.2f')}"
              + (f"   ERROR {r['error']}" if "error" in r else ""))
    out = Path(args.out) / "torch_overhead.json"
    write_json(out, results, {"what": "ssmkit.torch per-call overhead over the CuPy call (us); events = CUDA "
                                      "events around one call from an idle GPU; host = CPU us per call "
                                      "back to back; target overhead <= 15 us",
                              "dtype": args.dtype, "torch": torch.__version__, "iters": iters})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probe: where the torch adapter's forward+backward time goes (for NOTES.md). Not a benchmark
of record; bench_torch_overhead.py is.

The selective-scan fwd+bwd row of bench_torch_overhead (B=1, D=128, L=128, N=16, variable B/C,
z, D, delta_bias, softplus) split into pieces, host wall time per call (synchronized):
forward alone, autograd.grad alone, the adapter's backward body (``_impl.ss_backward``) as the
autograd engine thread runs it, and ``ssmkit.selective_scan_bwd`` inside it; plus cProfile of the
backward body on the engine thread and of the CuPy backward on the main thread.

    python benchmarks/probe_torch_overhead.py [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)

    import torch
    import cupy

    import ssmkit
    import ssmkit.torch as st
    from ssmkit.torch import _impl

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    Bsz, D, L, N = 1, 128, 128, 16
    bf = torch.bfloat16

    def rn(*s, dt=bf, pos=False):
        return ((torch.rand if pos else torch.randn)(*s, device=dev, generator=g)).to(dt)

    ts = (rn(Bsz, D, L), rn(Bsz, D, L, pos=True), -rn(D, N, dt=torch.float32, pos=True), rn(Bsz, 1, N, L),
          rn(Bsz, 1, N, L), rn(D, dt=torch.float32), rn(Bsz, D, L), rn(D, dt=torch.float32))
    tg = tuple(t.detach().clone().requires_grad_(True) for t in ts)
    dout = rn(Bsz, D, L)
    cps = tuple(cupy.from_dlpack(t.detach()) for t in ts)
    dout_cp = cupy.from_dlpack(dout)

    lines = []

    def say(s):
        print(s, flush=True)
        lines.append(s)

    # Instrument: time spent inside the backward body and inside ssmkit.selective_scan_bwd, per
    # thread, plus an optional profiler enabled around the backward body on whatever thread runs it.
    acc = {"impl": 0.0, "host_bwd": 0.0, "n": 0, "threads": set()}
    prof = {"p": None}
    orig_impl, orig_bwd = _impl.ss_backward, ssmkit.selective_scan_bwd

    def impl_wrap(*a, **k):
        acc["threads"].add(threading.current_thread().name)
        p = prof["p"]
        if p is not None:
            p.enable()
        t0 = time.perf_counter()
        try:
            return orig_impl(*a, **k)
        finally:
            acc["impl"] += time.perf_counter() - t0
            acc["n"] += 1
            if p is not None:
                p.disable()

    def bwd_wrap(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_bwd(*a, **k)
        finally:
            acc["host_bwd"] += time.perf_counter() - t0

    _impl.ss_backward = impl_wrap
    ssmkit.selective_scan_bwd = bwd_wrap

    def per_call(fn, iters):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters * 1e6

    def cupy_fwd():
        return ssmkit.selective_scan_fwd(*cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True)

    _, _, saved_cp = cupy_fwd()

    def cupy_bwd():
        ssmkit.selective_scan_bwd(dout_cp, *cps[:5], D=cps[5], z=cps[6], delta_bias=cps[7], delta_softplus=True,
                                  saved=saved_cp)

    def torch_fwd():
        return st.selective_scan_fn(*tg[:5], tg[5], tg[6], tg[7], delta_softplus=True)

    out_keep = torch_fwd()

    def torch_grad_only():
        torch.autograd.grad(out_keep, tg, dout, retain_graph=True)

    def torch_fwdbwd():
        torch.autograd.grad(torch_fwd(), tg, dout)

    n = args.iters
    say(f"host us per call (synchronized around {n} calls):")
    say(f"  cupy selective_scan_fwd            {per_call(cupy_fwd, n):9.1f}")
    say(f"  cupy selective_scan_bwd            {per_call(cupy_bwd, n):9.1f}")
    say(f"  torch selective_scan_fn (training) {per_call(torch_fwd, n):9.1f}")
    for k in ("impl", "host_bwd", "n"):
        acc[k] = 0
    t = per_call(torch_grad_only, n)
    calls = max(acc["n"], 1)
    say(f"  torch autograd.grad only           {t:9.1f}   (backward body {acc['impl'] / calls * 1e6:.1f}, "
        f"ssmkit.selective_scan_bwd inside it {acc['host_bwd'] / calls * 1e6:.1f}; threads {sorted(acc['threads'])})")
    say(f"  torch fwd + autograd.grad          {per_call(torch_fwdbwd, n):9.1f}")

    # The same backward body called directly on the main thread.
    ctx_saved = out_keep.grad_fn
    say(f"  grad_fn: {type(ctx_saved).__name__}")

    def impl_main_thread():
        _, _, saved = _impl.ss_forward(*ts, None, True, True, False)
        orig_impl(dout, *ts, None, True, saved)

    say(f"  _impl fwd+bwd on the main thread   {per_call(impl_main_thread, n):9.1f}")
    _, _, saved_main = _impl.ss_forward(*ts, None, True, True, False)
    say(f"  _impl bwd only on the main thread  {per_call(lambda: orig_impl(dout, *ts, None, True, saved_main), n):9.1f}")

    class Tiny(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            return g

    xt = torch.zeros(4, device=dev, requires_grad=True)
    yt = Tiny.apply(xt)
    say(f"  autograd.grad, trivial Function    {per_call(lambda: torch.autograd.grad(yt, xt, torch.ones_like(yt), retain_graph=True), n):9.1f}")
    old_si = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        say(f"  autograd.grad only, switchinterval 1us {per_call(torch_grad_only, n):9.1f}")
    finally:
        sys.setswitchinterval(old_si)

    for label, fn, on_engine in (("torch autograd.grad (engine thread, backward body only)", torch_grad_only, True),
                                 ("cupy selective_scan_bwd (main thread)", cupy_bwd, False),
                                 ("_impl fwd+bwd (main thread)", impl_main_thread, False)):
        p = cProfile.Profile()
        if on_engine:
            prof["p"] = p
        else:
            p.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        if on_engine:
            prof["p"] = None
        else:
            p.disable()
        s = io.StringIO()
        pstats.Stats(p, stream=s).sort_stats("cumulative").print_stats(30)
        say(f"\n==== cProfile, 50 calls: {label}\n" + s.getvalue())

    _impl.ss_backward, ssmkit.selective_scan_bwd = orig_impl, orig_bwd
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "probe_torch_overhead.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

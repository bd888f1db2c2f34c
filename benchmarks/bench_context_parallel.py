"""Context-parallel benchmark (issue 15): one long sequence (default L = 2^20) split over N GPUs
(``ssmkit.distributed``, NCCL) against the whole sequence on one GPU: ms per forward and per
forward + backward (the slowest rank, median over iterations), and peak memory per GPU.

Ops: ``scan`` (selective_scan_fn: variable B/C, D, z, delta_bias, softplus) and ``inner``
(mamba_inner_fn; the one-GPU row is the fused MambaInnerFunction, the split rows the composed
path with the halo conv and the distributed scan). Each rank holds its slice of L only; the
one-GPU baseline runs in its own process first.

    python benchmarks/bench_context_parallel.py --gpus 2 --out DIR      # L = 2^20, d 1024, bf16
    python benchmarks/bench_context_parallel.py --cpu-smoke             # gloo, 2 CPU processes, tiny

``--cpu-smoke`` runs the same code on 2 gloo processes with float64 CPU tensors (the reference
path) at a tiny size and checks the split result against the single call, so the script is
known to work without a GPU. Writes ``context_parallel.json`` (or ``context_parallel_cpu.json``)
to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(op, cfg, L, start, device, dtype, full_L=None):
    """This rank's inputs for ``op``: per-token tensors for positions [start, start + L) of a
    sequence drawn from one seed (so slices of it agree with the whole: the smoke test) when
    ``full_L`` is given, else drawn per rank (timing only); weights from a fixed seed."""
    import torch

    Bsz, Dd, N = cfg["batch"], cfg["dim"], cfg["dstate"]
    wg = torch.Generator().manual_seed(1234)
    A = -torch.exp(0.5 * torch.randn(Dd, N, generator=wg))
    Dv = torch.randn(Dd, generator=wg)
    bias = 0.3 * torch.randn(Dd, generator=wg) - 2.0
    wdt = torch.float64 if dtype == torch.float64 else torch.float32

    def tok(seed, *shape):          # (*shape, L), per token
        if full_L is not None:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(*shape, full_L, generator=g, dtype=torch.float64)[..., start:start + L]
        return torch.randn(*shape, L, device=device, dtype=wdt)

    def dev(t, dt=dtype):
        return t.to(device=device, dtype=dt).contiguous().requires_grad_(True)

    if op == "scan":
        return dict(u=dev(tok(1, Bsz, Dd)), delta=dev(0.5 * tok(2, Bsz, Dd)), A=dev(A, wdt),
                    B=dev(tok(3, Bsz, 1, N)), C=dev(tok(4, Bsz, 1, N)), D=dev(Dv, wdt), z=dev(tok(5, Bsz, Dd)),
                    delta_bias=dev(bias, wdt))
    R, W = max(1, Dd // 16), 4
    return dict(xz=dev(tok(6, Bsz, 2 * Dd)), conv1d_weight=dev(0.5 * torch.randn(Dd, 1, W, generator=wg)),
                conv1d_bias=dev(0.5 * torch.randn(Dd, generator=wg)),
                x_proj_weight=dev(torch.randn(R + 2 * N, Dd, generator=wg) * Dd ** -0.5),
                delta_proj_weight=dev(torch.randn(Dd, R, generator=wg) * R ** -0.5),
                out_proj_weight=dev(torch.randn(Dd, Dd, generator=wg) * Dd ** -0.5), out_proj_bias=None,
                A=dev(A, wdt), D=dev(Dv, wdt), delta_bias=dev(bias, wdt))


def _call(op, kw, group):
    import ssmkit.distributed as sd

    if op == "scan":
        return sd.selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                    kw["delta_bias"], delta_softplus=True, group=group)
    return sd.mamba_inner_fn(kw["xz"], kw["conv1d_weight"], kw["conv1d_bias"], kw["x_proj_weight"],
                             kw["delta_proj_weight"], kw["out_proj_weight"], kw["out_proj_bias"], kw["A"],
                             D=kw["D"], delta_bias=kw["delta_bias"], group=group)


def _timer(device):
    """fn -> ms of one call, synchronised (CUDA events on the GPU, perf_counter on the CPU)."""
    import torch

    def run(fn):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return run


def _rank_main(rank, world, cfg, out_file, port, store):
    """One rank (world 1: the one-device baseline, no group): time fwd and fwd+bwd per op."""
    import torch
    import torch.distributed as dist

    import ssmkit.distributed as sd

    cpu = cfg["cpu_smoke"]
    group = None
    if world > 1:
        if cpu:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=120))
        else:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        group = dist.group.WORLD
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if cpu else torch.get_num_threads())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[cfg["dtype"]]
    sizes = sd.split_sizes(cfg["seqlen"], world)
    start, L = sum(sizes[:rank]), sizes[rank]
    timer = _timer(device)

    def barrier():
        if group is not None:
            dist.barrier(group)

    rows = []
    for op in cfg["ops"]:
        kw = _inputs(op, cfg, L, start, device, dtype, full_L=cfg["seqlen"] if cpu else None)
        grads_in = [t for t in kw.values() if t is not None and t.requires_grad]
        y0 = _call(op, kw, group)
        dy = torch.randn_like(y0)
        del y0

        def fwd():
            with torch.no_grad():
                _call(op, kw, group)

        def fwdbwd():
            y = _call(op, kw, group)
            torch.autograd.grad(y, grads_in, dy)

        row = {"op": op, "rank": rank, "world": world, "L_local": L}
        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            for _ in range(cfg["warmup"]):
                fn()
            if not cpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times = []
            for _ in range(cfg["iters"]):
                barrier()
                times.append(timer(fn))
            row[f"{name}_ms"] = times
            if not cpu:
                row[f"{name}_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                row[f"{name}_peak_over_inputs_GiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
        if cpu:     # the smoke test's check: this slice of the whole sequence's result
            y = _call(op, kw, group).detach()
            whole = _inputs(op, cfg, cfg["seqlen"], 0, device, dtype, full_L=cfg["seqlen"])
            want = _call(op, whole, None).detach()
            want = want[..., start:start + L] if op == "scan" else want[:, start:start + L]
            row["max_abs_err_vs_single"] = float((y - want).abs().max()) if y.numel() else 0.0
        rows.append(row)
        kw = grads_in = dy = None         # free before the next op
        if not cpu:
            torch.cuda.empty_cache()
    if group is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows, group=group)
        dist.destroy_process_group()
        rows = [r for rank_rows in gathered for r in rank_rows]
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))


def _summarise(rows_by_world, cfg) -> list:
    """Per (op, world): median over iterations of the slowest rank, and peak memory per GPU."""
    out = []
    for world, rows in sorted(rows_by_world.items()):
        for op in cfg["ops"]:
            rs = [r for r in rows if r["op"] == op]
            s = {"op": op, "world": world, "L_local": [r["L_local"] for r in rs]}
            for name in ("fwd", "fwdbwd"):
                per_iter = [max(t) for t in zip(*(r[f"{name}_ms"] for r in rs))]
                s[f"{name}_ms"] = statistics.median(per_iter)
                if f"{name}_peak_GiB" in rs[0]:
                    s[f"{name}_peak_GiB_per_gpu"] = [round(r[f"{name}_peak_GiB"], 3) for r in rs]
            if "max_abs_err_vs_single" in rs[0]:
                s["max_abs_err_vs_single"] = max(r["max_abs_err_vs_single"] for r in rs)
            out.append(s)
    return out


def _spawn(world, cfg):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_rank_main, args=(world, cfg, out, _free_port(), os.path.join(d, "store")), nprocs=world,
                 join=True)
        return json.loads(Path(out).read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--gpus", type=int, default=2, help="GPUs to split the sequence over (default 2)")
    ap.add_argument("--seqlen", type=int, default=2 ** 20)
    ap.add_argument("--dim", type=int, default=1024, help="D channels (the inner width)")
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--ops", default="scan,inner", help="comma-separated: scan, inner")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-single", action="store_true", help="no one-GPU baseline (when it does not fit)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="2 gloo CPU processes, float64, tiny size, checked against the single call")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or any(o not in ("scan", "inner") for o in ops):
        ap.error(f"--ops takes scan and/or inner, got {args.ops!r}")
    cfg = {"seqlen": args.seqlen, "dim": args.dim, "dstate": args.dstate, "batch": args.batch, "dtype": args.dtype,
           "ops": ops, "iters": args.iters, "warmup": args.warmup, "cpu_smoke": args.cpu_smoke}
    worlds = [args.gpus]
    if args.cpu_smoke:
        cfg.update(seqlen=37, dim=4, dstate=3, batch=2, dtype="fp64", iters=2, warmup=1)
        worlds = [2]
    else:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"bench_context_parallel: needs {args.gpus} CUDA GPUs, torch sees "
                             f"{torch.cuda.device_count()} (use --cpu-smoke without GPUs)")
    if not args.skip_single:
        worlds = [1] + worlds
    rows = {w: _spawn(w, cfg) for w in worlds}
    summary = _summarise(rows, cfg)
    print(f"{'op':6s} {'world':>5s} {'fwd ms':>10s} {'fwd+bwd ms':>11s}  peak GiB per GPU (fwd+bwd)")
    for s in summary:
        print(f"{s['op']:6s} {s['world']:5d} {s['fwd_ms']:10.2f} {s['fwdbwd_ms']:11.2f}  "
              f"{s.get('fwdbwd_peak_GiB_per_gpu', '-')}"
              + (f"  max|err| vs single {s['max_abs_err_vs_single']:.2e}" if "max_abs_err_vs_single" in s else ""))
    if args.cpu_smoke:
        bad = [s for s in summary if s.get("max_abs_err_vs_single", 0.0) > 1e-10]
        if bad:
            raise SystemExit(f"bench_context_parallel --cpu-smoke: split result differs from the single call: {bad}")
    from benchmarks.common import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "context_parallel_cpu.json" if args.cpu_smoke else "context_parallel.json"
    (out / name).write_text(json.dumps({"env": environment(), "config": cfg, "summary": summary, "per_rank": rows},
                                       indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()

"""Where an eager decode step's time goes (the model benchmark's first H100 run: 130m fp16 eager
decode 10.75 ms/token at batch 1 against 0.85 ms through the CUDA graph, 24 layers: ~450 us of
host time per layer, several times the ~20 launches a layer makes).

Runs a short eager generation of a random mamba-130m-shaped model under cProfile (Python
functions by own time) and torch.profiler (CUDA runtime calls: synchronizations and copies are
what a step must not have), and prints both tables.

    python benchmarks/probe_decode_eager.py [--size 130m] [--batch 1] [--genlen 16]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generation import bench_generation, load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="130m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--genlen", type=int, default=16)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None, help="unused (run_gpu.sh passes it to every probe); tables go to stdout")
    args = ap.parse_args(argv)
    import torch

    model = load_model(args.size, "cuda", torch.float16)
    r = bench_generation(model, 16, args.genlen, args.batch, False, repeats=2)
    print(f"eager decode {args.size} b{args.batch}: {r['ms_per_token']} ms/token", flush=True)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, 16), device="cuda")

    def run():
        model.generate(ids, max_length=16 + args.genlen, cg=False)
        torch.cuda.synchronize()

    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    print(s.getvalue())

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        run()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()

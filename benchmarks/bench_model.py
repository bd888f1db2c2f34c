"""Model benchmark (the model-layer issue's table): random models shaped like mamba-130m
(d_model 768, 24 layers, vocab 50277) and mamba-1.4b (2048, 48), fp16 inference:

* prompt (prefill) time for 2048 tokens at batch 1;
* ms per generated token at batch 1 and 64, eager and with the CUDA graph (aim: 130m, batch 1,
  graph <= 0.6 ms);

and the 130m training step (forward + backward, fp32 parameters under bf16 autocast) at batch 8 x 2048:

* tokens/s; the device time split by kernel kind from torch.profiler (ssmkit kernels, GEMMs,
  other torch kernels = the glue) against the step's wall time (aim: within 1.2x of the kernels' sum);
* peak memory of the step through the fused path (mamba_inner_fn, checkpoint_lvl 1) and through the
  composed ops (use_fast_path=False).

    python benchmarks/bench_model.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generation import bench_generation, load_model  # noqa: E402
from benchmarks.common import environment  # noqa: E402


def generation_rows(quick: bool) -> list[dict]:
    import torch

    rows = []
    for size in (("130m",) if quick else ("130m", "1.4b")):
        model = load_model(size, "cuda", torch.float16)
        genlen = 32 if quick else 64
        r = bench_generation(model, 2048, 2, 1, False, repeats=3)
        rows.append({"row": f"{size} fp16 prefill 2048 b1", "ms": r["prefill_ms"]})
        for batch in (1, 64):
            for cg in (False, True):
                r = bench_generation(model, 16, genlen, batch, cg, repeats=3)
                rows.append({"row": f"{size} fp16 decode b{batch}{' cg' if cg else ''}", "ms_per_token": r["ms_per_token"],
                             "tokens_per_s": r["tokens_per_s"]})
                print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def _categorize(name: str) -> str:
    n = name.lower()
    if "ssm::" in n:
        return "ssmkit"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
        return "gemm"
    return "other"


def _train_step(model, x):
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return loss


def training_rows(quick: bool) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ssmkit.models import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    B, L = (2, 2048) if quick else (8, 2048)
    model = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=50277), device="cuda",
                             dtype=torch.float32)
    x = torch.randint(0, 50277, (B, L + 1), device="cuda")
    rows = []
    for fast in (True, False):
        for layer in model.backbone.layers:
            layer.mixer.use_fast_path = fast
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            _train_step(model, x)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _train_step(model, x)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _train_step(model, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        r = {"row": f"130m train b{B}x{L} bf16 autocast {'fused (mamba_inner_fn, lvl 1)' if fast else 'composed'}",
             "ms": round(ms, 2), "tokens_per_s": round(B * L / ms * 1e3), "peak_mem_GiB": round(peak / 2**30, 3)}
        if fast:
            model.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _train_step(model, x)
                torch.cuda.synchronize()
            kinds = {"ssmkit": 0.0, "gemm": 0.0, "other": 0.0}
            intervals = []
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    us = e.time_range.elapsed_us()
                    kinds[_categorize(e.name)] += us
                    intervals.append((e.time_range.start, e.time_range.end))
            busy, end = 0.0, float("-inf")
            for s, t in sorted(intervals):      # union of kernel intervals: device busy time
                if t > end:
                    busy += t - max(s, end)
                    end = t
            total = sum(kinds.values())
            r.update({f"{k}_ms": round(v / 1e3, 2) for k, v in kinds.items()})
            r["kernels_ms"] = round(total / 1e3, 2)
            r["busy_ms"] = round(busy / 1e3, 2)
            r["wall_over_kernels"] = round(ms / (total / 1e3), 3)
            r["glue_frac_of_kernels"] = round(kinds["other"] / total, 3)
        rows.append(r)
        print(r, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for part in (generation_rows, training_rows):
        try:
            rows += part(args.quick)
        except Exception:
            traceback.print_exc()
            rows.append({"row": part.__name__, "error": traceback.format_exc(limit=3)})
    print(f"\n{'row':62s} {'ms':>9s} {'ms/token':>9s} {'tokens/s':>10s} {'peak GiB':>9s}")
    for r in rows:
        def f(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['row']:62s} {f('ms', '9.2f')} {f('ms_per_token', '9.3f')} {f('tokens_per_s', '10.0f')} "
              f"{f('peak_mem_GiB', '9.3f')}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps({"env": environment(), "results": rows}, indent=1))


if __name__ == "__main__":
    main()

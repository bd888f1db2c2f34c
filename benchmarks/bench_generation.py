"""Generation benchmark, in the spirit of upstream's benchmarks/benchmark_generation_mamba_simple.py:
a model (a checkpoint directory, a hub name, or a random model by size), a prompt of random
tokens, ``--genlen`` generated tokens (teacher-forced, so every run decodes the same number of
steps), batch, with or without the CUDA graph. Prints prompt (prefill) time, ms per generated
token and tokens/s; writes JSON to --out (default benchmarks/results/).

    python benchmarks/bench_generation.py --model 130m --promptlen 2048 --genlen 128 --batch 1 --cg
    python benchmarks/bench_generation.py --model state-spaces/mamba-130m --dtype float16
    python benchmarks/bench_generation.py --model tiny --device cpu          # the CPU reference path

Sizes of random models (``--model``): tiny (d_model 64, 2 layers, vocab 1000), 130m (768, 24),
370m (1024, 48), 790m (1536, 48), 1.4b (2048, 48), 2.8b (2560, 64); vocab 50277.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"tiny": (64, 2, 1000), "130m": (768, 24, 50277), "370m": (1024, 48, 50277), "790m": (1536, 48, 50277),
         "1.4b": (2048, 48, 50277), "2.8b": (2560, 64, 50277)}
DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32", "float64": "float64"}


def load_model(name: str, device: str, dtype):
    """A MambaLMHeadModel: random for a size name in SIZES, else from_pretrained(name)."""
    import torch

    from ssmkit.models import MambaConfig, MambaLMHeadModel

    if name in SIZES:
        d, n, v = SIZES[name]
        torch.manual_seed(0)
        return MambaLMHeadModel(MambaConfig(d_model=d, n_layer=n, vocab_size=v), device=device, dtype=dtype).eval()
    return MambaLMHeadModel.from_pretrained(name, device=device, dtype=dtype).eval()


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_generation(model, promptlen: int, genlen: int, batch: int, cg: bool, repeats: int = 3) -> dict:
    """Median over ``repeats`` runs (after one warm-up that compiles and captures): prefill ms for
    the prompt, decode ms per generated token, tokens/s (batch * genlen / decode time)."""
    import torch

    p = next(model.parameters())
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (batch, promptlen), generator=g).to(p.device)
    teacher = torch.randint(0, V, (batch, promptlen + genlen), generator=g).to(p.device)
    teacher[:, :promptlen] = ids
    runs = []
    for i in range(repeats + 1):
        _sync(p.device)
        out = model.generate(ids, max_length=promptlen + genlen, teacher_outputs=teacher, cg=cg,
                             enable_timing=True, return_dict_in_generate=True)
        if i:
            runs.append(out.timings)
    prefill = statistics.median(r["prefill_ms"] for r in runs)
    steps = runs[0]["steps"]
    # The first token comes from the prefill; the decode loop runs steps - 1 model steps.
    decode = statistics.median(r["decode_ms"] for r in runs) / max(steps - 1, 1)
    return {"promptlen": promptlen, "genlen": genlen, "batch": batch, "cg": cg, "prefill_ms": round(prefill, 3),
            "ms_per_token": round(decode, 4), "tokens_per_s": round(batch * 1e3 / decode, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="130m", help=f"a checkpoint dir, hub name or size ({', '.join(SIZES)})")
    ap.add_argument("--promptlen", type=int, default=100)
    ap.add_argument("--genlen", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cg", action="store_true", help="decode through a captured CUDA graph")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    if device == "cpu":
        if args.cg:
            sys.exit("bench_generation: --cg needs a CUDA device")
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32     # the CPU reference path computes in float64 either way
        print("bench_generation: no GPU: the CPU reference path (float64 NumPy inside), for a smoke run only")
    model = load_model(args.model, device, dtype)
    r = bench_generation(model, args.promptlen, args.genlen, args.batch, args.cg, args.repeats)
    r.update(model=args.model, dtype=str(dtype).replace("torch.", ""), device=device)
    print(f"{args.model} {r['dtype']} batch {args.batch} prompt {args.promptlen} gen {args.genlen} cg={args.cg}: "
          f"prompt {r['prefill_ms']:.2f} ms, {r['ms_per_token']:.3f} ms/token, {r['tokens_per_s']:.0f} tokens/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.common import environment

    tag = f"generation_{args.model.replace('/', '_')}_{device}.json"
    (out / tag).write_text(json.dumps({"env": environment(), "results": [r]}, indent=1))
    return r


if __name__ == "__main__":
    main()

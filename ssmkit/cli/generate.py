"""``ssmkit generate``: stream a continuation of a prompt from a Mamba language model.

    ssmkit generate --model state-spaces/mamba-130m --tokenizer EleutherAI/gpt-neox-20b --prompt "Mamba is"
    ssmkit generate --model ./my_checkpoint --prompt "Hello"       (tokenizer.json found beside the weights)
    ssmkit generate --model random --ids "1 2 3" --max-new-tokens 8  (a tiny random model, token ids)

The model loads with ``ssmkit.models.MambaLMHeadModel.from_pretrained(PATH_OR_NAME, device=, dtype=)``
(``random[:d_model=64,n_layer=2,vocab_size=256]`` builds a random one). The tokenizer is a
tokenizer.json file, a folder holding one, or a hub name, loaded with the ``tokenizers`` library
(or transformers' AutoTokenizer when installed). Without a tokenizer, give ``--ids`` and get ids.
Tokens print as they come (text with a tokenizer, ids without); the speed goes to stderr.
Sampling as upstream: ``--top-k 1`` (the default) is greedy; ``--top-k 0 --temperature 0.8``
samples from the whole distribution.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .common import CLIError, one_line

RANDOM_DEFAULTS = {"d_model": 64, "n_layer": 2, "vocab_size": 256}
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream tokens from a Mamba language model",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="checkpoint folder, hub name, or random[:d_model=..,n_layer=..,vocab_size=..]")
    p.add_argument("--tokenizer", default=None, metavar="PATH_OR_NAME",
                   help="tokenizer.json, a folder with one, or a hub name (default: the model folder's, if any)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--ids", help='prompt token ids, e.g. "1 2 3" or "1,2,3"')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=1, help="1: greedy (default); 0: no top-k cut")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling threshold (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--eos-id", type=int, default=None, help="stop at this token id (default: the tokenizer's EOS)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when torch sees one)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--cg", action="store_true", help="decode through a captured CUDA graph (cuda only)")
    p.add_argument("--seed", type=int, default=None, help="torch's random seed (sampling, random models)")
    p.add_argument("--no-echo", action="store_true", help="print only the new tokens, not the prompt")
    p.set_defaults(run=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


# ---- tokenizer -------------------------------------------------------------------------------

class Tokenizer:
    """encode/decode/eos over a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, tok, kind: str, source: str):
        self.tok, self.kind, self.source = tok, kind, source

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return list(self.tok.encode(text).ids)
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def eos_id(self) -> int | None:
        if self.kind == "transformers":
            return self.tok.eos_token_id
        for t in EOS_TOKENS:
            i = self.tok.token_to_id(t)
            if i is not None:
                return int(i)
        return None


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub name ('org/name'): starts like a path, has more than one
    separator, names a file type, or its first component is a folder here."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        return True
    if spec.endswith((".json", ".bin", ".safetensors", ".pt")):
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and Path(head).is_dir()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def load_tokenizer(spec: str) -> Tokenizer:
    path = Path(spec).expanduser()
    file = path if path.is_file() else (path / "tokenizer.json" if path.is_dir() else None)
    if file is not None and file.is_file():
        if _has("tokenizers"):
            from tokenizers import Tokenizer as HFTokenizer

            return Tokenizer(HFTokenizer.from_file(str(file)), "tokenizers", str(file))
        if _has("transformers"):
            from transformers import PreTrainedTokenizerFast

            return Tokenizer(PreTrainedTokenizerFast(tokenizer_file=str(file)), "transformers", str(file))
        raise CLIError('reading tokenizer.json needs the tokenizers package: pip install tokenizers')
    if path.is_dir():
        if _has("transformers"):
            from transformers import AutoTokenizer

            return Tokenizer(AutoTokenizer.from_pretrained(str(path)), "transformers", str(path))
        raise CLIError(f"no tokenizer.json in {spec} (other tokenizer formats need transformers)")
    if _looks_like_path(spec):
        raise CLIError(f"tokenizer not found: {spec}")
    if _has("transformers"):
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(spec), "transformers", spec)
    if _has("tokenizers"):
        from tokenizers import Tokenizer as HFTokenizer

        return Tokenizer(HFTokenizer.from_pretrained(spec), "tokenizers", spec)
    raise CLIError(f"loading tokenizer {spec} needs the tokenizers package: pip install tokenizers")


# ---- model -----------------------------------------------------------------------------------

def _random_config(spec: str) -> dict:
    cfg = dict(RANDOM_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise CLIError(f"--model random: expected KEY=VALUE items, got {item!r}", code=2)
        cfg[key.strip()] = _scalar(val.strip())
    return cfg


def _scalar(text: str):
    """'64' -> 64, '1e-5' -> 1e-05, 'true' -> True; anything else stays a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_model(spec: str, device, dtype):
    is_random = spec == "random" or spec.startswith("random:")
    path = Path(spec).expanduser()
    if not is_random and not path.exists() and _looks_like_path(spec):
        raise CLIError(f"checkpoint not found: {spec}")
    try:
        from ..models import MambaConfig, MambaLMHeadModel
    except ImportError as exc:
        raise CLIError(f"the model package ssmkit.models is not available ({one_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install: say which package
        raise CLIError(f"the model package ssmkit.models failed to import ({type(exc).__name__}: "
                       f"{one_line(exc)})") from exc
    if is_random:
        cfg = _random_config(spec)
        try:
            config = MambaConfig(**cfg)
        except TypeError as exc:
            raise CLIError(f"--model {spec}: {one_line(exc)}", code=2) from exc
        return MambaLMHeadModel(config, device=device, dtype=dtype)
    return MambaLMHeadModel.from_pretrained(str(path) if path.exists() else spec, device=device, dtype=dtype)


def _device(torch, name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name}: {one_line(exc)}", code=2) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, "
                       f"CUDA build: {torch.version.cuda or 'none'})")
    return dev


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise CLIError(f"--ids takes integers separated by spaces or commas, got {args.ids!r}", code=2) from None
        if not ids or min(ids) < 0:
            raise CLIError(f"--ids needs at least one non-negative id, got {args.ids!r}", code=2)
        return ids
    if tokenizer is None:
        raise CLIError("--prompt needs a tokenizer (--tokenizer PATH_OR_NAME), or give token ids with --ids", code=2)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise CLIError("the prompt encodes to no tokens", code=2)
    return ids


# ---- streaming -------------------------------------------------------------------------------

class Printer:
    """Prints new tokens as they come: ids without a tokenizer; with one, text decoded together
    with the prompt (so spaces at the seam come out as the tokenizer means them) and printed as
    it grows, holding back a character split across tokens. An EOS token prints as an id only."""

    def __init__(self, tokenizer, prompt_ids: list[int], eos_id: int | None = None, out=None):
        self.tokenizer, self.prompt_ids, self.eos_id = tokenizer, list(prompt_ids), eos_id
        self.out = out or sys.stdout
        self.ids: list[int] = []                       # every new token
        self.text_ids: list[int] = []                  # the ones that print as text
        self.base = tokenizer.decode(self.prompt_ids) if tokenizer is not None else ""
        self.shown = self.base
        self.started = False                           # something printed on this line

    def echo(self, prompt_text: str | None):
        if self.tokenizer is None:
            self.out.write(" ".join(map(str, self.prompt_ids)))
        else:
            self.out.write(prompt_text if prompt_text is not None else self.base)
        self.started = True
        self.out.flush()

    def __call__(self, tokens) -> None:
        """The streamer: ``tokens`` is the new (B,) token tensor (B = 1 here)."""
        tok = int(tokens.reshape(-1)[0])
        self.ids.append(tok)
        if self.tokenizer is None:
            self.out.write(f" {tok}" if self.started else str(tok))
            self.started = True
        elif tok != self.eos_id:
            self.text_ids.append(tok)
            text = self.tokenizer.decode(self.prompt_ids + self.text_ids)
            if text.endswith("\ufffd"):
                return                                 # a character split across tokens: wait
            self.out.write(text[len(self.shown):])
            self.shown = text
        self.out.flush()

    def finish(self) -> None:
        if self.tokenizer is not None and self.text_ids:
            text = self.tokenizer.decode(self.prompt_ids + self.text_ids)
            self.out.write(text[len(self.shown):])
            self.shown = text
        self.out.write("\n")
        self.out.flush()


def run(args, extra) -> int:
    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1", code=2)
    try:
        import torch
    except ImportError as exc:
        raise CLIError('generate needs torch: pip install "ssmkit[torch]"') from exc
    device = _device(torch, args.device)
    if args.cg and device.type != "cuda":
        raise CLIError("--cg captures a CUDA graph and needs a CUDA device (--device cuda)", code=2)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    tok_spec = args.tokenizer
    if tok_spec is None:
        local = Path(args.model).expanduser()
        if local.is_dir() and (local / "tokenizer.json").is_file():
            tok_spec = str(local)
    tokenizer = load_tokenizer(tok_spec) if tok_spec else None
    ids = _prompt_ids(args, tokenizer)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model = load_model(args.model, device, dtype)
    if hasattr(model, "eval"):
        model.eval()
    t_load = time.perf_counter() - t0
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        raise CLIError(f"prompt id {max(ids)} is outside the model's vocabulary ({vocab} tokens)", code=2)

    eos = None if args.ignore_eos else (args.eos_id if args.eos_id is not None
                                        else (tokenizer.eos_id if tokenizer is not None else None))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    printer = Printer(tokenizer, ids, eos)
    if not args.no_echo:
        printer.echo(args.prompt)
    t1 = time.perf_counter()
    out = model.generate(input_ids, max_length=len(ids) + args.max_new_tokens, top_k=args.top_k, top_p=args.top_p,
                         min_p=args.min_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                         eos_token_id=eos, streamer=printer, cg=args.cg, return_dict_in_generate=False,
                         output_scores=False)
    t_gen = time.perf_counter() - t1
    seq = getattr(out, "sequences", out)
    new = [int(t) for t in seq[0][len(ids):]]
    if len(printer.ids) < len(new):                # a model that did not stream: print the rest
        for t in new[len(printer.ids):]:
            printer(torch.tensor([t]))
    printer.finish()
    n = len(new)
    print(f"[{n} new tokens in {t_gen:.2f} s ({n / t_gen if t_gen > 0 else 0:.1f} tokens/s); model loaded in "
          f"{t_load:.2f} s; {device} {str(dtype).replace('torch.', '')}{', CUDA graph' if args.cg else ''}]",
          file=sys.stderr)
    return 0

"""``ssmkit warmup``: compile kernel variants ahead of time (or load them from the disk cache).

    ssmkit warmup                                   every variant of every op (hundreds: slow)
    ssmkit warmup --op selective_scan --dtype bfloat16
    ssmkit warmup --op causal_conv1d --filter width=4 --filter kind=update
    ssmkit warmup --dry-run ...                     list what would be compiled (no GPU needed)

Filters are the keyword arguments of each op's ``variants()`` (see ``ssmkit._registry``):
``--dtype`` is shared by every op; ``--filter KEY=VALUE`` passes any other one (integers and
true/false are converted). Without ``--op``, only the ops that take every given filter are chosen.
"""
from __future__ import annotations

import inspect
import time

from .common import CLIError, require_gpu


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="precompile kernel variants (ssmkit.warmup), with a progress bar",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="an op to compile (repeatable; default: every op). See --list.")
    p.add_argument("--dtype", default=None, help="input dtype filter (float16, bfloat16, float32, float64, ...)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="any other filter of the op's variants() (repeatable), e.g. width=4, kind=update, tie=true")
    p.add_argument("--dry-run", action="store_true", help="list the chosen variants, compile nothing")
    p.add_argument("--list", action="store_true", help="list the ops and their filters, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        return text


def parse_filters(dtype: str | None, pairs: list[str]) -> dict:
    filters = {} if dtype is None else {"dtype": dtype}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--filter takes KEY=VALUE, got {pair!r}", code=2)
        filters[key.strip()] = _value(val.strip())
    return filters


def op_filters() -> dict[str, list[str]]:
    """{op: the filter names its variants() takes}."""
    from .._registry import _VARIANTS, ops

    return {op: [n for n in inspect.signature(_VARIANTS[op]).parameters] for op in ops()}


def choose(op_names: list[str] | None, filters: dict):
    """The variants to compile: [(op, [KernelRef, ...]), ...]."""
    from .._registry import variants

    known = op_filters()
    if op_names:
        unknown = [o for o in op_names if o not in known]
        if unknown:
            raise CLIError(f"unknown op {', '.join(unknown)}; ops: {', '.join(known)}", code=2)
        for op in op_names:
            bad = sorted(set(filters) - set(known[op]))
            if bad:
                raise CLIError(f"op {op} has no filter {', '.join(bad)}; its filters: {', '.join(known[op]) or 'none'}",
                               code=2)
        chosen = list(dict.fromkeys(op_names))
    else:
        chosen = [op for op, names in known.items() if set(filters) <= set(names)]
        if not chosen:
            per_op = "; ".join(o + ": " + ", ".join(n) for o, n in known.items())
            raise CLIError(f"no op takes the filters {', '.join(sorted(filters))}; filters per op: {per_op}", code=2)
    try:
        return [(op, variants(op, **filters)) for op in chosen]
    except (KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"bad filter value ({type(exc).__name__}: {exc})", code=2) from exc


def run(args, extra) -> int:
    if args.list:
        from .._registry import variants

        for op, names in op_filters().items():
            print(f"{op:<24} {len(variants(op)):>4} variants   filters: {', '.join(names) or '-'}")
        return 0
    filters = parse_filters(args.dtype, args.filter)
    picked = choose(args.op, filters)
    total = sum(len(refs) for _, refs in picked)
    desc = ", ".join(f"{op} {len(refs)}" for op, refs in picked)
    if total == 0:
        raise CLIError(f"no variant matches {filters or 'the selection'} ({desc})", code=2)
    if args.dry_run:
        for op, refs in picked:
            for ref in refs:
                print(f"{op}\t{ref}")
        print(f"{total} variants ({desc}); --dry-run: nothing compiled")
        return 0
    require_gpu("warmup")
    from .._warmup import warmup

    t0 = time.perf_counter()
    times = warmup(kernels=[r for _, refs in picked for r in refs], progress_bar=not args.no_progress)
    wall = time.perf_counter() - t0
    slow = max(times.items(), key=lambda kv: kv[1]) if times else None
    print(f"warmed up {len(times)} variants ({desc}) in {wall:.1f} s"
          + (f"; slowest {slow[1]:.2f} s: {slow[0]}" if slow else ""))
    return 0

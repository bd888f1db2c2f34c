"""``python -m ssmkit.evals``: lm-eval's command line with ssmkit's Mamba as the default model.

    python -m ssmkit.evals --model_args pretrained=state-spaces/mamba-130m,dtype=float16 \\
        --tasks lambada_openai,hellaswag --device cuda --batch_size 64
    python -m ssmkit.evals ls tasks

The arguments are lm-eval's own (``lm_eval --help``; 0.4.x): this registers the ``ssmkit`` model
(:mod:`ssmkit.integrations.lm_eval`, whose docstring lists its ``--model_args``) and hands the
command line to lm-eval's entry point, with ``--model ssmkit`` added when a run names no model.
Needs ``pip install "ssmkit[eval]"``.
"""
from __future__ import annotations

import sys

_SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: list) -> list:
    """``argv`` for lm-eval's command line: ``--model ssmkit`` added to a run without --model
    (lm-eval's default would be its hf model) or a --config file."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] in _SUBCOMMANDS and argv[0] != "run"):
        return argv
    named = any(a in ("--model", "-M", "--config", "-C") or a.startswith(("--model=", "--config="))
                for a in argv)
    if named:
        return argv
    at = 1 if argv[0] == "run" else 0
    return argv[:at] + ["--model", "ssmkit"] + argv[at:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        import ssmkit.integrations.lm_eval  # noqa: F401  registers "ssmkit" and "ssmkit-mamba"
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"ssmkit.evals: {exc}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["lm-eval"] + lm_eval_argv(argv)
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0

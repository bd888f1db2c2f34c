"""``python -m ssmkit`` (also the ``ssmkit`` console script): the command line.

    ssmkit info                      GPU, driver, CuPy, NVRTC, torch; the kernel cache and what is compiled
    ssmkit warmup [--op OP] [--dtype DT] [--filter K=V] [--dry-run]
                                     precompile kernel variants (progress bar)
    ssmkit bench [--op NAME] [--quick] [--out DIR]
                                     the kernel benchmarks (GPU), JSON + PNG; small CPU reference rows without a GPU
    ssmkit generate --model PATH_OR_NAME (--prompt TEXT | --ids "1 2 3") [sampling options]
                                     stream tokens from a Mamba language model
    ssmkit demo [demo options]       the demo (``python -m ssmkit.demo``)

Errors (no GPU where one is needed, a missing checkpoint or optional package) print one line to
stderr and exit nonzero; ``--debug`` shows the traceback instead. Each subcommand imports what it
needs when it runs, so ``import ssmkit`` stays free of torch and CuPy.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import CLIError, one_line

EXIT_ERROR = 1          # a run that failed (missing GPU, checkpoint, package, ...)
EXIT_USAGE = 2          # argparse's code for bad arguments
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from . import bench, generate, info, warmup

    p = argparse.ArgumentParser(prog="ssmkit", description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'ssmkit COMMAND --help' for a command's options.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--version", action="version", version=f"ssmkit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in (info, warmup, bench, generate):
        mod.add_parser(sub)
    d = sub.add_parser("demo", add_help=False, help="run the demo (python -m ssmkit.demo); its options pass through",
                       description="Run ssmkit.demo; every argument passes through (see 'ssmkit demo --help').")
    d.set_defaults(run=_demo)
    return p


def _version() -> str:
    from .. import __version__

    return __version__


def _demo(args, extra: list[str]) -> int:
    from .. import demo

    return demo.main(extra)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or bool(os.environ.get("SSMKIT_DEBUG"))
    try:
        rc = args.run(args, extra)
    except KeyboardInterrupt:
        print(f"ssmkit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors become one line
        if debug:
            raise
        print(f"ssmkit {args.command}: {describe(exc)}", file=sys.stderr)
        return exc.code if isinstance(exc, CLIError) else EXIT_ERROR
    return int(rc or 0)


def describe(exc: BaseException) -> str:
    """One line for an error: the message itself for the errors we raise on purpose (CLIError,
    ssmkit's setup errors, a missing package or file), else the type and first line."""
    from .._cuda_env import CudaSetupError

    if isinstance(exc, (CLIError, CudaSetupError)):
        return one_line(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return f"needs the optional package '{top}', which is not installed ({one_line(exc)})"
    if isinstance(exc, ImportError):
        return one_line(exc)
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or one_line(exc)}"
    return f"{type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)"

"""What the subcommands share: the one-line error type, and whether a GPU is usable (and why not)."""
from __future__ import annotations

import os


class CLIError(Exception):
    """An error the command line reports as one line on stderr (exit code ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def one_line(exc: BaseException | str) -> str:
    """A message on one line: ssmkit's own ``ssmkit: `` prefix dropped, lines joined."""
    text = str(exc).strip()
    if text.startswith("ssmkit: "):
        text = text[len("ssmkit: "):]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = "; ".join(lines) if lines else type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def gpu_status() -> tuple[int, str]:
    """(CUDA devices CuPy can use, why none when 0). ``SSMKIT_NO_GPU`` (as in the test suite)
    forces 0."""
    if os.environ.get("SSMKIT_NO_GPU"):
        return 0, "SSMKIT_NO_GPU is set"
    from .._cuda_env import CudaSetupError, check_driver, import_cupy

    try:
        cupy = import_cupy()
    except ImportError as exc:
        return 0, one_line(exc)
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, or a broken install
        try:
            check_driver(cupy)
        except CudaSetupError as setup:
            return 0, one_line(setup)
        return 0, f"CuPy cannot use a GPU ({one_line(exc)})"
    if n < 1:
        return 0, "CuPy sees no CUDA device"
    return n, ""


def require_gpu(what: str) -> None:
    """Raise CLIError naming why ``what`` cannot run when no GPU is usable."""
    n, why = gpu_status()
    if n < 1:
        raise CLIError(f"{what} needs a CUDA GPU: {why}")

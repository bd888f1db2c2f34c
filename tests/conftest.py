"""Shared test setup: the ``gpu`` marker skips cleanly when no CUDA GPU is usable."""
from __future__ import annotations

import functools
import os

import pytest


@functools.lru_cache(maxsize=1)
def gpu_problem() -> str | None:
    """Why no CUDA GPU is usable here (None: one is), for the skip reason."""
    if os.environ.get("SSMKIT_NO_GPU"):
        return "SSMKIT_NO_GPU is set"
    try:
        import cupy
    except ImportError:
        return 'CuPy is not installed: pip install -e ".[cuda13]" or ".[cuda12]"'
    try:
        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "CuPy sees no CUDA device"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def gpu_available() -> bool:
    return gpu_problem() is None


def pytest_configure(config):
    config.ssmkit_summary = []  # one-line summaries that tests add, printed at the end of the run


def pytest_terminal_summary(terminalreporter, config):
    for line in getattr(config, "ssmkit_summary", []):
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU (none usable here: {gpu_problem()})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

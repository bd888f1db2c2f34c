"""Shared test setup: the ``gpu`` marker skips cleanly when no CUDA GPU is usable."""
from __future__ import annotations

import functools
import os

import pytest


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    if os.environ.get("SSMKIT_NO_GPU"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_configure(config):
    config.ssmkit_summary = []  # one-line summaries that tests add, printed at the end of the run


def pytest_terminal_summary(terminalreporter, config):
    for line in getattr(config, "ssmkit_summary", []):
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none usable here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""ssmkit.warmup: compile (or load from the disk cache) a chosen set of kernels ahead of time."""
from __future__ import annotations

import time

from ._compile import KernelRef, get_kernel
from ._progress import progress
from ._registry import variants


def warmup(ops: str | list[str] | None = None, kernels: list[KernelRef] | None = None,
           progress_bar: bool = True, **filters) -> dict[str, float]:
    """Compile the kernels of ``ops`` (default: all) on the current GPU, with a progress bar.

    ``filters`` narrow each op's variant list (e.g. ``dtype="bfloat16"``); ``kernels`` gives an
    explicit list instead. Returns seconds per kernel. Needs a GPU; in a new process with a warm
    disk cache each kernel loads in milliseconds.
    """
    if kernels is None:
        names = [ops] if isinstance(ops, str) else (ops or [None])
        kernels = []
        for op in names:
            kernels.extend(variants(op, **filters))
    times: dict[str, float] = {}
    for ref in progress(kernels, desc="ssmkit warmup", enabled=progress_bar):
        t0 = time.perf_counter()
        get_kernel(ref)
        times[str(ref)] = time.perf_counter() - t0
    return times

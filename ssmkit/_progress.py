"""A dependency-free progress bar for long work (precompiling kernels, benchmarks)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
             stream=None) -> Iterator[T]:
    """Yield ``items`` while drawing ``desc [#####.....] k/n elapsed`` on stderr.

    Draws nothing when ``enabled`` is False. On a terminal the bar redraws in place; elsewhere
    (CI logs) it prints one line per item so the log shows where time went.
    """
    stream = stream or sys.stderr
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not enabled:
        yield from items
        return
    tty = getattr(stream, "isatty", lambda: False)()
    t0 = time.perf_counter()
    done = 0

    def draw(label: str = "") -> None:
        elapsed = time.perf_counter() - t0
        if total:
            width = 24
            fill = int(width * done / total)
            bar = "#" * fill + "." * (width - fill)
            text = f"{desc} [{bar}] {done}/{total} {elapsed:6.1f}s {label}"
        else:
            text = f"{desc} {done} {elapsed:6.1f}s {label}"
        stream.write(("\r" + text.ljust(100)) if tty else text + "\n")
        stream.flush()

    for item in items:
        yield item
        done += 1
        draw(str(item)[:60] if not tty else "")
    if tty:
        stream.write("\n")
        stream.flush()

"""Every kernel instantiation ssmkit can request, per op: what CI compiles and warmup() offers.

Each op module registers a function ``variants(**filters) -> list[KernelRef]``; its kernel name
expressions come from the same single function that the host code uses to pick a kernel, so the
list can never drift from what a call asks for.
"""
from __future__ import annotations

from typing import Callable

from ._compile import KernelRef

_VARIANTS: dict[str, Callable[..., list[KernelRef]]] = {}


def register(op: str):
    def deco(fn):
        _VARIANTS[op] = fn
        return fn
    return deco


def ops() -> list[str]:
    _import_ops()
    return sorted(_VARIANTS)


def variants(op: str | None = None, **filters) -> list[KernelRef]:
    """All instantiations of ``op`` (or of every op), optionally filtered (e.g. ``dtype="bfloat16"``)."""
    _import_ops()
    names = [op] if op else sorted(_VARIANTS)
    out: list[KernelRef] = []
    for name in names:
        out.extend(_VARIANTS[name](**filters))
    return out


def _import_ops() -> None:
    from . import ops  # noqa: F401  (each op module registers itself on import)

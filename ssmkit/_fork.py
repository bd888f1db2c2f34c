"""CUDA and ``fork()``: one clear error in a forked child instead of a CUDA "initialization error".

CUDA cannot be used in a child made by ``fork()`` once the parent has initialised it: the
driver's state does not survive the fork, and the child's CUDA calls fail with
``cudaErrorInitializationError`` / ``CUDA_ERROR_NOT_INITIALIZED`` (status 3). On Linux
``multiprocessing`` forks by default (before Python 3.14), so a ``Pool`` worker, or a
``DataLoader`` worker, that calls a kernel after the parent ran one hits exactly this.

How ssmkit tells:

* ``note_gpu_use()`` records that this process used the GPU through ssmkit (first kernel load,
  the first CuPy array an op sees, the torch bridge's first GPU call).
* ``os.register_at_fork`` runs ``_after_fork_in_child`` in every forked child: it remembers the
  parent and whether the parent had used the GPU, and sets ``FORKED``.
* Every GPU entry point reads ``FORKED`` (one global read, the only cost on the hot path) and,
  when set, calls ``check()``: ``ForkedCUDAError`` when the parent used the GPU through ssmkit,
  or torch reports the fork as bad; otherwise one probe (``cudaMemGetInfo``) decides: status 3
  means the parent had initialised CUDA some other way (CuPy directly, a device query), so the
  same error; success means CUDA works here (the parent never initialised it) and the check is
  not made again.

NumPy inputs (the CPU reference path) never reach these checks: they keep working in the child.
"""
from __future__ import annotations

import os
import sys

# True in a forked child until check() has run there: the only thing hot paths read.
FORKED = False

_used_pid: int | None = None          # this process used the GPU through ssmkit (its pid)
_parent: tuple[int, bool] | None = None   # in a fork child: (parent pid, parent used the GPU via ssmkit)
_reason: str | None = None            # the error's message once this child is known to be bad

CUDA_NOT_INITIALIZED = 3   # cudaErrorInitializationError == CUDA_ERROR_NOT_INITIALIZED == 3


class ForkedCUDAError(RuntimeError):
    """This process was forked from one that had initialised CUDA: the GPU is unusable here."""


def note_gpu_use() -> None:
    """Record that this process has used the GPU through ssmkit (cheap; first call counts)."""
    global _used_pid
    if _used_pid is None:
        _used_pid = os.getpid()


def message(parent_pid: int, how: str) -> str:
    return (f"ssmkit: this process ({os.getpid()}) was forked from process {parent_pid} after {how}; CUDA "
            "cannot be used in a child made by fork() once the parent has initialised it. Start GPU worker "
            "processes with multiprocessing's 'spawn' start method (multiprocessing.get_context('spawn') or "
            "multiprocessing.set_start_method('spawn'); likewise torch.multiprocessing, and "
            "DataLoader(multiprocessing_context='spawn')), or fork before the parent first uses the GPU. "
            "NumPy inputs (the CPU reference) still work in this process.")


def _after_fork_in_child() -> None:
    global FORKED, _used_pid, _parent, _reason
    _parent = (os.getppid(), _used_pid is not None)
    _used_pid = None
    _reason = None
    FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _torch_bad_fork() -> bool:
    """torch's own record: it initialised CUDA in an ancestor of this forked process."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    bad = getattr(getattr(torch, "_C", None), "_cuda_isInBadFork", None)
    try:
        return bool(bad()) if bad is not None else False
    except Exception:
        return False


def _probe_status() -> int | None:
    """The CUDA status of one call that needs a working context (None: it worked, or no CuPy)."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        cupy.cuda.runtime.memGetInfo()
    except Exception as exc:     # CUDARuntimeError (or a driver error) carries .status
        return getattr(exc, "status", None)
    return None


def check() -> None:
    """In a forked child: raise ForkedCUDAError if CUDA is unusable here, else clear FORKED.
    Outside a forked child, or once cleared, a no-op."""
    global FORKED, _reason
    if not FORKED:
        return
    if _reason is None:
        parent_pid, parent_used = _parent if _parent is not None else (os.getppid(), False)
        if parent_used:
            _reason = message(parent_pid, "the parent ran ssmkit's GPU kernels")
        elif _torch_bad_fork():
            _reason = message(parent_pid, "torch initialised CUDA in the parent")
        elif _probe_status() == CUDA_NOT_INITIALIZED:
            _reason = message(parent_pid, "the parent initialised CUDA (this process's CUDA calls fail with "
                                          "'initialization error')")
        else:
            FORKED = False          # CUDA works here: the parent never initialised it
            note_gpu_use()
            return
    raise ForkedCUDAError(_reason)


def explain(exc: BaseException) -> None:
    """Inside ``except`` for a CUDA error: in a forked child whose error is status 3 (not
    initialised), raise ForkedCUDAError from ``exc``; else return (the caller re-raises)."""
    if _parent is not None and getattr(exc, "status", None) == CUDA_NOT_INITIALIZED:
        raise ForkedCUDAError(message(_parent[0], "the parent initialised CUDA")) from exc

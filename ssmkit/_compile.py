"""From CUDA source to a callable kernel: one ``cupy.RawModule`` per template instantiation.

* Sources come from the package's ``kernels_cu/`` folder (see ``_layout``).
* A hash of every file in that folder goes into the compile options, because CuPy's disk cache
  keys on the main source text and the options only: an edited ``#include``d header would
  otherwise serve a stale binary.
* A per-process dict keyed by (device, file, name expression) keeps the hot path to one lookup.
* A cache folder that cannot be written, or an entry that no longer loads, never breaks a call:
  we warn and compile in memory instead.

The same source text and options feed ``_nvrtc_offline`` (CI's GPU-less compile check).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

from ._cuda_env import explain_cuda_error, import_cupy
from ._layout import kernels_dir

log = logging.getLogger("ssmkit.compile")

# Options shared by every kernel. No --use_fast_math: kernels call the approximate
# exp2 (ex2.approx) explicitly where it is wanted and keep accurate math elsewhere.
BASE_OPTIONS: tuple[str, ...] = ("--std=c++17",)


@dataclass(frozen=True)
class KernelRef:
    """One kernel instantiation: the source file in ``kernels_cu/`` and its name expression."""

    file: str
    name: str

    def __str__(self) -> str:  # used by progress bars and logs
        return f"{self.file}:{self.name}"


@lru_cache(maxsize=1)
def sources_hash() -> str:
    """SHA-256 (first 16 hex digits) over the names and bytes of every file in kernels_cu/."""
    h = hashlib.sha256()
    root = kernels_dir()
    for path in sorted(root.iterdir()):
        if path.suffix in (".cu", ".cuh") and path.is_file():
            h.update(path.name.encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def read_source(file: str) -> str:
    return (kernels_dir() / file).read_text()


def compile_options() -> tuple[str, ...]:
    """Options for NVRTC, the architecture excepted (CuPy adds it; the offline check names it).

    ``SSMKIT_NVRTC_OPTIONS`` (space-separated) appends options, for tuning experiments
    (e.g. ``-DSSMKIT_BWD_MAX_THREADS=256``); they enter CuPy's cache key like any option."""
    extra = tuple(os.environ.get("SSMKIT_NVRTC_OPTIONS", "").split())
    return BASE_OPTIONS + (f"-I{kernels_dir()}", f"-DSSMKIT_SOURCES_HASH=0x{sources_hash()}ull") + extra


_kernels: dict[tuple[int, str, str], object] = {}
_lock = threading.Lock()


def get_kernel(ref: KernelRef):
    """The ``cupy.RawKernel`` for ``ref`` on the current device, compiling on first use."""
    try:
        import cupy
    except ModuleNotFoundError:
        cupy = import_cupy()                  # raises an ImportError naming the install extra
    try:
        device = cupy.cuda.runtime.getDevice()
    except cupy.cuda.runtime.CUDARuntimeError as exc:   # no driver, or one too old for this CuPy
        explain_cuda_error(exc, cupy)
        raise
    key = (device, ref.file, ref.name)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernels[key] = _build(ref)
    return kernel


@contextlib.contextmanager
def _cupy_cache_in_memory():
    old = os.environ.get("CUPY_CACHE_IN_MEMORY")
    os.environ["CUPY_CACHE_IN_MEMORY"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUPY_CACHE_IN_MEMORY", None)
        else:
            os.environ["CUPY_CACHE_IN_MEMORY"] = old


def _cache_dir_writable() -> bool:
    path = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK)


def raw_module(ref: KernelRef):
    """The ``cupy.RawModule`` of ``ref`` (compiled, or loaded from CuPy's disk cache, on first
    use): the one place a kernel's source and options meet CuPy, whose cache key they make."""
    import cupy

    return cupy.RawModule(code=read_source(ref.file), options=compile_options(), name_expressions=(ref.name,))


def _load(ref: KernelRef):
    kernel = raw_module(ref).get_function(ref.name)
    kernel.attributes  # force the module load now, so a bad cache entry fails here
    return kernel


def _build(ref: KernelRef):
    import cupy

    t0 = time.perf_counter()
    if not _cache_dir_writable():
        warnings.warn(f"ssmkit: CuPy's kernel cache folder is not writable; compiling {ref} in memory "
                      "(set CUPY_CACHE_DIR to a writable folder to keep compiled kernels)",
                      RuntimeWarning, stacklevel=3)
        with _cupy_cache_in_memory():
            kernel = _load(ref)
    else:
        try:
            kernel = _load(ref)
        except cupy.cuda.compiler.CompileException:
            raise
        except (OSError, cupy.cuda.driver.CUDADriverError, ValueError, EOFError) as exc:
            warnings.warn(f"ssmkit: the disk cache failed for {ref} ({type(exc).__name__}: {exc}); "
                          "compiling in memory", RuntimeWarning, stacklevel=3)
            with _cupy_cache_in_memory():
                kernel = _load(ref)
    log.debug("compiled/loaded %s in %.3f s", ref, time.perf_counter() - t0)
    return kernel


def clear_process_cache() -> None:
    """Forget every kernel loaded in this process (tests and first-use benchmarks)."""
    with _lock:
        _kernels.clear()

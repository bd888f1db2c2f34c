"""From CUDA source to a callable kernel: one ``cupy.RawModule`` per template instantiation.

* Sources come from the package's ``kernels_cu/`` folder (see ``_layout``).
* A hash of every file in that folder goes into the compile options, because CuPy's disk cache
  keys on the main source text and the options only: an edited ``#include``d header would
  otherwise serve a stale binary.
* A per-process dict keyed by (device, file, name expression) keeps the hot path to one lookup.
* A cache folder that cannot be written, or an entry that no longer loads, never breaks a call:
  we warn and compile in memory instead.
* Threads: one lock serialises the builds of this process (compile and first load; a hit in
  the dict takes no lock). Processes: the first build of a variant also holds an advisory file
  lock (``fcntl.flock``) per variant in the cache folder, so processes that start together (DDP
  ranks, two test runs) compile a variant once: the others wait, then load the entry the first
  one wrote. CuPy 14 writes cache entries through a temporary file and ``os.replace`` and checks
  a hash on load, so without the lock nothing breaks either; the lock also holds for a CuPy that
  writes in place, and saves the duplicate compiles.

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

from . import _fork
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


def _new_lock_after_fork() -> None:
    # A lock held by another thread at fork() stays locked forever in the child.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def _current_device(cupy) -> int:
    return cupy.cuda.runtime.getDevice()


def get_kernel(ref: KernelRef):
    """The ``cupy.RawKernel`` for ``ref`` on the current device, compiling on first use."""
    if _fork.FORKED:
        _fork.check()
    try:
        import cupy
    except ModuleNotFoundError:
        cupy = import_cupy()                  # raises an ImportError naming the install extra
    try:
        device = _current_device(cupy)
    except cupy.cuda.runtime.CUDARuntimeError as exc:   # no driver, or one too old for this CuPy
        _fork.explain(exc)
        explain_cuda_error(exc, cupy)
        raise
    key = (device, ref.file, ref.name)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernels[key] = _build(ref)
        _fork.note_gpu_use()
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


def cache_dir() -> str:
    """CuPy's kernel cache folder (``CUPY_CACHE_DIR``, else ``~/.cupy/kernel_cache``)."""
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def _cache_dir_writable() -> bool:
    path = cache_dir()
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


LOCK_DIR = "ssmkit-locks"      # inside the cache folder: one empty lock file per variant built
LOCK_TIMEOUT_S = 600.0         # then build without the lock (a stuck holder must not hang us forever)
LOCK_POLL_S = 0.05


def lock_path(ref: KernelRef, folder: str | None = None) -> str:
    """The lock file of ``ref``'s first build: named by a hash of everything in CuPy's cache key
    that ssmkit chooses (file, name expression, options), so one name per cache entry."""
    key = "\0".join((ref.file, ref.name) + compile_options()).encode()
    name = hashlib.sha256(key).hexdigest()[:24] + ".lock"
    return os.path.join(folder or cache_dir(), LOCK_DIR, name)


@contextlib.contextmanager
def interprocess_lock(path: str, timeout: float | None = None):
    """Hold an exclusive advisory lock on ``path`` (created if missing) across processes.
    Yields True when locked; False (and holds nothing) where file locks are unavailable (no
    ``fcntl``, a folder that cannot be written, a file system without ``flock``) or after
    ``timeout`` seconds: callers then go on unlocked, which CuPy's atomic cache writes allow."""
    try:
        import fcntl
    except ImportError:                      # not POSIX
        yield False
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    locked = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("ssmkit: waited %.0f s for %s; building without it", timeout, path)
                    break
                time.sleep(LOCK_POLL_S)
            except OSError:                  # no flock on this file system
                break
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
            with interprocess_lock(lock_path(ref)):
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

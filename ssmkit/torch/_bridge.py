"""torch tensors <-> the arrays ssmkit's host code takes, and the GPU call context.

GPU (CUDA tensors):

* An input tensor becomes a ``cupy.ndarray`` over the same memory, built from ``data_ptr()``,
  shape, strides and dtype (the facts DLPack carries, without DLPack's per-tensor cost, ~23 us
  on the H200 machine per DESIGN.md). Views are cached by (pointer, shape, strides, dtype,
  device): a hit is one dict lookup (~0.7 us per tensor measured on a CPU machine, against
  ~3.5 us to build one). A cached view does not own the memory: it is only used during a call,
  while the caller's tensor keeps the memory alive, and a later tensor at the same address with
  the same layout is the same view. ``SSMKIT_TORCH_VIEW=dlpack`` switches to ``cupy.from_dlpack`` (a
  debugging aid and the cross-check in the GPU tests).
* The host code runs inside :func:`gpu_context`: torch's current device is the tensors' device
  (``torch.cuda`` device exchange, which, unlike ``cudaSetDevice``, never creates a context on a
  device that has none), CuPy's current stream is torch's current stream of that device, and
  CuPy's allocator (thread-locally, for the call only) is torch's caching allocator. Everything
  the host code allocates (outputs, workspaces, reductions) is therefore stream-ordered torch
  memory: safe inside ``torch.cuda.graph`` capture (it comes from the graph's private pool) and
  returned to torch's cache, never CuPy's pool.
* A result array allocated that way is turned back into a tensor over the same storage
  (``Tensor.set_``), with no copy and no DLPack.
* Threads: the view and stream caches are plain dicts read and filled without a lock (single
  dict operations under the GIL; a view or stream wrapper made twice is equal); everything
  per call (the current stream, the allocator, its device) is thread-local, so threads on their
  own torch streams run side by side. In a process forked after the GPU was used,
  ``gpu_context`` raises ``ssmkit._fork.ForkedCUDAError`` (naming the 'spawn' start method).

CPU tensors: NumPy views (``Tensor.numpy()``) for the float64 reference path; bfloat16 (no NumPy
dtype without ml_dtypes) travels as float32 and results are cast back.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

from .. import _fork

_VIEW_MODE = os.environ.get("SSMKIT_TORCH_VIEW", "pointer")   # "pointer" | "dlpack"
_VIEW_CACHE_ON = os.environ.get("SSMKIT_TORCH_VIEW_CACHE", "1") != "0"
_VIEW_CACHE_MAX = 4096

# torch dtype -> NumPy dtype (bfloat16 filled in lazily from ml_dtypes).
_NP_DTYPE: dict = {
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}
# dtype name (NumPy/CuPy side) -> torch dtype.
_TORCH_DTYPE: dict = {str(v): k for k, v in _NP_DTYPE.items()}
_TORCH_DTYPE["bfloat16"] = torch.bfloat16
_TORCH_BY_NP: dict = {}          # NumPy dtype object -> torch dtype, filled by to_torch


def _bf16_numpy_dtype():
    dt = _NP_DTYPE.get(torch.bfloat16)
    if dt is None:
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - the GPU machines have ml_dtypes
            raise TypeError("ssmkit.torch: bfloat16 CUDA tensors need the 'ml_dtypes' package "
                            "(CuPy's bfloat16 dtype)") from exc
        dt = _NP_DTYPE[torch.bfloat16] = np.dtype(ml_dtypes.bfloat16)
    return dt


# ---- argument checks ------------------------------------------------------------------------

def check_tensors(op: str, names, tensors) -> int:
    """All non-None arguments are tensors on one device; returns its CUDA index or -1 for CPU.

    Raises TypeError (not a tensor) or ValueError (mixed devices), naming the arguments.
    """
    dev = None
    first = None
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor or None, got {type(t).__name__}")
        d = t.get_device()            # -1 for CPU, the index for CUDA (cheap: no device object)
        if dev is None:
            dev, first = d, name
        elif d != dev:
            raise ValueError(f"{op}: all tensors must be on one device; '{first}' is on "
                             f"{_dev_str(dev)} but '{name}' is on {_dev_str(d)}")
    if dev is not None and dev < 0:
        for name, t in zip(names, tensors):
            if t is not None and t.device.type != "cpu":
                raise ValueError(f"{op}: argument '{name}' is on {t.device}; ssmkit.torch runs CUDA "
                                 "tensors on the GPU kernels and CPU tensors on the NumPy reference")
    return -1 if dev is None else dev


def _dev_str(d: int) -> str:
    return "cpu" if d < 0 else f"cuda:{d}"


# ---- GPU: views, stream, device, allocator ------------------------------------------------------

_cp = None               # the cupy module, imported on first GPU use
_ndarray = None
_Unowned = None
_MemPtr = None
_get_alloc = None
_set_alloc = None
_views: dict = {}
_streams: dict = {}
_raw_stream = None
_exchange = None
_maybe_exchange = None


def _init_cupy():
    global _cp, _ndarray, _Unowned, _MemPtr, _get_alloc, _set_alloc, _raw_stream, _exchange, _maybe_exchange
    from .._cuda_env import check_driver, import_cupy

    cupy = import_cupy()                      # an ImportError naming the install extra if missing
    check_driver(cupy)                        # the driver can run this CuPy build (else one clear error)
    from cupy.cuda import memory

    _ndarray = cupy.ndarray
    _Unowned = memory.UnownedMemory
    _MemPtr = memory.MemoryPointer
    _get_alloc = getattr(memory, "_get_thread_local_allocator", None)
    _set_alloc = getattr(memory, "_set_thread_local_allocator", None)
    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
        lambda idx: torch.cuda.current_stream(idx).cuda_stream)
    _exchange = getattr(torch._C, "_cuda_exchangeDevice", None) or torch.cuda._exchange_device
    _maybe_exchange = getattr(torch._C, "_cuda_maybeExchangeDevice", None) or torch.cuda._maybe_exchange_device
    _cp = cupy
    _fork.note_gpu_use()
    return cupy


def cupy_module():
    return _cp or _init_cupy()


def _span_bytes(shape, strides, item) -> int:
    n = 1
    last = 0
    for s, st in zip(shape, strides):
        if s == 0:
            return 0
        n *= s
        last += (s - 1) * st
    return (last + 1) * item


def device_of(op: str, names, tensors) -> int:
    """The CUDA index of a call (its first tensor's), or -1 for the CPU path. Only the first
    tensor is looked at when it is on a GPU (``views`` checks the rest as it goes); otherwise
    every argument is checked here."""
    first = tensors[0]
    if isinstance(first, torch.Tensor):
        d = first.get_device()
        if d >= 0:
            return d
    return check_tensors(op, names, tensors)


def views(op: str, idx: int, names, tensors) -> list:
    """CuPy views of the CUDA tensors of one call, each checked to be a tensor on cuda:idx.
    The hot path: a view-cache hit costs one key build and one dict lookup per tensor."""
    out = []
    add = out.append
    cache = _views if (_VIEW_CACHE_ON and _VIEW_MODE == "pointer") else None
    Tensor = torch.Tensor
    for name, t in zip(names, tensors):
        if t is None:
            add(None)
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor or None, got {type(t).__name__}")
        d = t.get_device()
        if d != idx:
            raise ValueError(f"{op}: all tensors must be on one device; '{names[0]}' is on "
                             f"{_dev_str(idx)} but '{name}' is on {_dev_str(d)}")
        if cache is not None:
            v = cache.get((t.data_ptr(), t.shape, t.stride(), t.dtype, idx))
            if v is not None:
                add(v)
                continue
        add(view(t, name, idx))
    return out


def view(t, name: str = "?", idx: int | None = None):
    """A ``cupy.ndarray`` over CUDA tensor ``t``'s memory (no copy), or None."""
    if t is None:
        return None
    if _cp is None:
        _init_cupy()
    dtype = t.dtype
    if dtype.is_complex and (t.is_conj() or t.is_neg()):
        # lazily conjugated/negated views: materialize; the copy owns its memory (not cached)
        t = t.resolve_conj().resolve_neg()
        return _cp.from_dlpack(t.detach())
    if _VIEW_MODE == "dlpack":
        return _cp.from_dlpack(t.detach())
    ptr = t.data_ptr()
    shape = t.shape
    strides = t.stride()
    if idx is None:
        idx = t.get_device()
    if _VIEW_CACHE_ON:
        key = (ptr, shape, strides, dtype, idx)
        v = _views.get(key)
        if v is not None:
            return v
    npdt = _NP_DTYPE.get(dtype)
    if npdt is None:
        if dtype is torch.bfloat16:
            npdt = _bf16_numpy_dtype()
        else:
            raise TypeError(f"ssmkit.torch: argument '{name}' has unsupported dtype {dtype}")
    item = npdt.itemsize
    # owner=None: the view never outlives the call; the caller's tensor keeps the memory alive.
    mem = _Unowned(ptr, _span_bytes(shape, strides, item), None if _VIEW_CACHE_ON else t, idx)
    v = _ndarray(shape, npdt, _MemPtr(mem, 0), tuple(s * item for s in strides))
    if _VIEW_CACHE_ON:
        if len(_views) >= _VIEW_CACHE_MAX:
            _views.clear()
        _views[key] = v
    return v


class _Handle:
    """The CUDA stream protocol for a raw stream pointer (what ``Stream.from_external`` reads)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _cupy_stream(idx: int):
    """CuPy's wrapper of torch's current stream on device ``idx`` (cached per stream)."""
    ptr = _raw_stream(idx)
    key = (idx, ptr)
    s = _streams.get(key)
    if s is None:
        if len(_streams) > 1024:
            _streams.clear()
        s = _streams[key] = _cp.cuda.Stream.from_external(_Handle(ptr))
    return s


_alloc_device = threading.local()


def _torch_alloc(size: int):
    """CuPy allocator backed by torch's caching allocator on the current device and stream."""
    buf = torch.empty((size,), dtype=torch.uint8, device=_alloc_device.dev)
    return _MemPtr(_Unowned(buf.data_ptr(), size, buf, _alloc_device.idx), 0)


class gpu_context:
    """``with gpu_context(idx):`` run host code on cuda:idx, torch's current stream there, with
    torch's caching allocator behind every CuPy allocation. Restores everything on exit."""

    __slots__ = ("idx", "prev_dev", "prev_alloc", "stream", "prev_tl")

    def __init__(self, idx: int):
        self.idx = idx

    def __enter__(self):
        if _fork.FORKED:              # a forked child: one clear error, not a CUDA one
            _fork.check()
        if _cp is None:
            _init_cupy()
        idx = self.idx
        self.prev_dev = _exchange(idx)
        self.prev_tl = getattr(_alloc_device, "dev", None), getattr(_alloc_device, "idx", None)
        self.stream = None
        try:
            _alloc_device.dev = _torch_device(idx)
            _alloc_device.idx = idx
            if _set_alloc is not None:
                self.prev_alloc = _get_alloc()
                _set_alloc(_torch_alloc)
            else:  # pragma: no cover - a CuPy without the thread-local setter: the public context
                self.prev_alloc = _cp.cuda.using_allocator(_torch_alloc)
                self.prev_alloc.__enter__()
            stream = _cupy_stream(idx)
            stream.__enter__()
            self.stream = stream
        except BaseException:
            self._restore(None)
            raise
        return self

    def _restore(self, exc):
        try:
            if self.stream is not None:
                self.stream.__exit__(*(exc or (None, None, None)))
        finally:
            if _set_alloc is not None:
                _set_alloc(getattr(self, "prev_alloc", None))
            elif getattr(self, "prev_alloc", None) is not None:  # pragma: no cover
                self.prev_alloc.__exit__(None, None, None)
            _alloc_device.dev, _alloc_device.idx = self.prev_tl
            _maybe_exchange(self.prev_dev)

    def __exit__(self, *exc):
        self._restore(exc)
        return False


_devices: dict = {}


def _torch_device(idx: int):
    d = _devices.get(idx)
    if d is None:
        d = _devices[idx] = torch.device("cuda", idx)
    return d


def to_torch(a, like_device_idx: int | None = None):
    """A tensor over the memory of CuPy result ``a`` (no copy), or None."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a
    mem = a.data.mem
    owner = getattr(mem, "_owner", None)
    npdt = a.dtype
    dt = _TORCH_BY_NP.get(npdt)      # keyed by the dtype object: numpy's dtype.name is a slow property
    if dt is None:
        dt = _TORCH_DTYPE.get(npdt.name) or _TORCH_DTYPE.get(str(npdt))
        if dt is not None:
            _TORCH_BY_NP[npdt] = dt
    if isinstance(owner, torch.Tensor) and dt is not None:
        item = a.dtype.itemsize
        off = a.data.ptr - owner.data_ptr()
        # owner is _torch_alloc's flat uint8 buffer: reinterpret it (two view ops, ~2x cheaper
        # than a fresh tensor plus set_).
        if (owner.dtype is torch.uint8 and owner.dim() == 1 and owner.numel() % item == 0 and off % item == 0
                and all(s % item == 0 for s in a.strides)):
            return owner.view(dt).as_strided(a.shape, tuple(s // item for s in a.strides), off // item)
        storage = owner.untyped_storage()
        off = a.data.ptr - storage.data_ptr()
        if off % item == 0 and all(s % item == 0 for s in a.strides):
            t = torch.empty((0,), dtype=dt, device=owner.device)
            return t.set_(storage, off // item, a.shape, tuple(s // item for s in a.strides))
    return torch.from_dlpack(a)  # something we did not allocate: the general route


# ---- CPU: NumPy views and back -----------------------------------------------------------------

def np_view(t):
    """NumPy array holding a CPU tensor's values (bf16 as float32). Always a copy: ``Tensor.numpy()``
    marks the tensor's storage as not resizable, which breaks FSDP2 (it frees the unsharded
    parameters' storage after each forward); in-place ops copy their result back (``_write_back``)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.float().numpy()
    return t.resolve_conj().resolve_neg().clone().numpy()


def from_numpy(a, dtype=None):
    """A CPU tensor from a NumPy result, cast to ``dtype`` (the input's torch dtype) if given."""
    if a is None:
        return None
    a = np.asarray(a)
    # A fresh C-contiguous, writable array: the strides the fake (meta) kernels promise.
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, copy=True, order="C")
    t = torch.from_numpy(a)
    if dtype is not None and t.dtype != dtype:
        if t.is_complex() and not dtype.is_complex:
            t = t.real
        t = t.to(dtype)
    return t


def has_bf16(tensors) -> bool:
    return any(t is not None and t.dtype is torch.bfloat16 for t in tensors)


class _Bf16StandIn:
    """dtype stand-in for bfloat16 shadows (no NumPy bfloat16 without ml_dtypes)."""

    name = "bfloat16"
    itemsize = 2

    def __str__(self):
        return "bfloat16"

    __repr__ = __str__


_BF16_STANDIN = _Bf16StandIn()


def _shadow_dtype(dtype):
    npdt = _NP_DTYPE.get(dtype)
    if npdt is not None:
        return npdt
    if dtype is torch.bfloat16:
        from ssmkit import _arrays

        names = getattr(_arrays, "_DTYPE_NAMES", None)   # dtype_name's per-dtype cache, if any
        if names is not None:
            names.setdefault(_BF16_STANDIN, "bfloat16")
        return _BF16_STANDIN
    raise TypeError(f"ssmkit.torch: unsupported dtype {dtype}")


class Shadow:
    """Shape/dtype/strides stand-in for a CPU tensor, so host ``validate`` functions check the
    true dtypes of bfloat16 arguments (which travel to NumPy as float32)."""

    __slots__ = ("shape", "dtype", "strides", "ndim")

    def __init__(self, t):
        item = t.element_size()
        self.shape = tuple(t.shape)
        self.ndim = len(self.shape)
        self.strides = tuple(s * item for s in t.stride())
        self.dtype = _shadow_dtype(t.dtype)


def shadows(tensors):
    return [None if t is None else Shadow(t) for t in tensors]

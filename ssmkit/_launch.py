"""The one way kernels are launched: keyword grid/block/shared memory, limits checked,
on the current CuPy stream, never synchronizing."""
from __future__ import annotations

from ._compile import KernelRef, get_kernel

MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
DEFAULT_SMEM_LIMIT = 48 * 1024  # above this a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)

# (device, id(kernel)) -> (kernel, bytes opted in). The kernel is kept so that its id cannot be
# reused by a new kernel object (after _compile.clear_process_cache) that has not opted in.
_opted_in: dict[tuple[int, int], tuple[object, int]] = {}


def _dims(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        v = (v,)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise ValueError(f"launch dims must have 1 to 3 entries, got {v}")
    return v + (1,) * (3 - len(v))


# Launch a kernel whose one parameter is a by-value struct straight through cuLaunchKernel: the
# struct is packed into a buffer the driver copies at launch. CuPy's RawKernel call spends most of
# a call's host time converting arguments (the selective-scan forward call measured 25-31 us of
# host time over its kernel on the H200 host, 13 us of it inside the CuPy launch under cProfile).
RAW_LAUNCH = True


class Prepared:
    """A launch checked once: ``prepared(args)`` launches on the current stream with CuPy's
    argument handling; ``prepared.row(params, row)`` packs a Params row and launches it directly."""

    __slots__ = ("kernel", "grid", "block", "shared_mem", "_raw")

    def __init__(self, kernel, grid, block, shared_mem):
        self.kernel, self.grid, self.block, self.shared_mem = kernel, grid, block, shared_mem
        self._raw = None

    def __call__(self, args: tuple) -> None:
        self.kernel(self.grid, self.block, args, shared_mem=self.shared_mem)

    def row(self, params, row: list) -> None:
        """Launch with the one struct argument ``params`` (a ``_params.Params``) filled from ``row``."""
        raw = self._raw
        if not RAW_LAUNCH or raw is False:
            self((params.pack_row(row),))
            return
        if raw is None or raw.params is not params:
            fn = getattr(self.kernel, "kernel", None)       # the CUfunction wrapper of a RawKernel
            if getattr(fn, "ptr", None) is None:            # not a CuPy kernel (a test double)
                self._raw = False
                self((params.pack_row(row),))
                return
            raw = self._raw = _RawLaunch(self, params)
        raw(row)


class _RawLaunch:
    """cuLaunchKernel with one struct parameter packed in place. The lock keeps two threads that
    share a plan (e.g. torch's autograd thread and the main thread, or worker threads each on its
    own stream) from interleaving pack and launch; the stream is read per call from CuPy's
    thread-local current stream. A thread that has made no CUDA runtime call yet has no current
    context for the driver API: on that error the launch goes through CuPy once (which makes the
    context current)."""

    __slots__ = ("params", "prepared", "fptr", "dims", "smem", "buf", "argv", "argv_addr", "pack_into",
                 "lock", "launch", "stream", "error")

    def __init__(self, prepared: Prepared, params):
        import ctypes
        import threading

        import cupy
        from cupy.cuda import driver

        self.params, self.prepared = params, prepared
        self.fptr = prepared.kernel.kernel.ptr           # the CUfunction on this device
        self.dims = prepared.grid + prepared.block
        self.smem = prepared.shared_mem
        st = params.struct
        self.buf = ctypes.create_string_buffer(st.size)
        self.argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.buf))
        self.argv_addr = ctypes.addressof(self.argv)
        self.pack_into = st.pack_into
        self.lock = threading.Lock()
        self.launch = driver.launchKernel
        self.error = driver.CUDADriverError
        self.stream = cupy.cuda.get_current_stream

    def __call__(self, row: list) -> None:
        gx, gy, gz, bx, by, bz = self.dims
        stream = self.stream().ptr
        try:
            with self.lock:
                self.pack_into(self.buf, 0, *row)
                self.launch(self.fptr, gx, gy, gz, bx, by, bz, self.smem, stream, self.argv_addr, 0)
        except self.error as exc:
            if "CONTEXT" not in str(exc):
                raise
            self.prepared((self.params.pack_row(row),))


def prepare(ref: KernelRef, *, grid, block, shared_mem: int = 0) -> Prepared:
    """Check a launch against the device limits (opting in to large shared memory) once."""
    import cupy

    gx, gy, gz = _dims(grid)
    bx, by, bz = _dims(block)
    if bx * by * bz > MAX_THREADS_PER_BLOCK or min(bx, by, bz) < 1:
        raise ValueError(f"{ref.name}: block {(bx, by, bz)} exceeds {MAX_THREADS_PER_BLOCK} threads")
    if not (1 <= gx <= MAX_GRID_X and 1 <= gy <= MAX_GRID_YZ and 1 <= gz <= MAX_GRID_YZ):
        raise ValueError(f"{ref.name}: grid {(gx, gy, gz)} outside the limits "
                         f"(x <= {MAX_GRID_X}, y, z <= {MAX_GRID_YZ}); split the launch")
    kernel = get_kernel(ref)
    if shared_mem > DEFAULT_SMEM_LIMIT:
        dev = cupy.cuda.runtime.getDevice()
        key = (dev, id(kernel))
        done = _opted_in.get(key)
        if done is None or done[0] is not kernel or done[1] < shared_mem:
            limit = cupy.cuda.runtime.deviceGetAttribute(
                cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)
            if shared_mem > limit:
                raise ValueError(f"{ref.name}: {shared_mem} bytes of shared memory exceed the "
                                 f"device's opt-in limit of {limit}")
            kernel.max_dynamic_shared_size_bytes = shared_mem
            _opted_in[key] = (kernel, shared_mem)
    return Prepared(kernel, (gx, gy, gz), (bx, by, bz), shared_mem)


def launch(ref: KernelRef, *, grid, block, args: tuple, shared_mem: int = 0, stream=None) -> None:
    """Launch ``ref`` with ``args`` on ``stream`` (default: CuPy's current stream), never
    synchronizing. Raises ``ValueError`` for a launch the hardware would refuse, before it
    reaches the driver."""
    prepared = prepare(ref, grid=grid, block=block, shared_mem=shared_mem)
    if stream is None:
        prepared(args)
    else:
        with stream:
            prepared(args)

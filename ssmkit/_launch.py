"""The one way kernels are launched: keyword grid/block/shared memory, limits checked,
on the current CuPy stream, never synchronizing."""
from __future__ import annotations

from ._compile import KernelRef, get_kernel

MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
DEFAULT_SMEM_LIMIT = 48 * 1024  # above this a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)

_opted_in: dict[tuple[int, int], int] = {}


def _dims(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        v = (v,)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise ValueError(f"launch dims must have 1 to 3 entries, got {v}")
    return v + (1,) * (3 - len(v))


class Prepared:
    """A launch checked once: ``prepared(args)`` launches on the current stream (~6 us)."""

    __slots__ = ("kernel", "grid", "block", "shared_mem")

    def __init__(self, kernel, grid, block, shared_mem):
        self.kernel, self.grid, self.block, self.shared_mem = kernel, grid, block, shared_mem

    def __call__(self, args: tuple) -> None:
        self.kernel(self.grid, self.block, args, shared_mem=self.shared_mem)


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
        if _opted_in.get(key, 0) < shared_mem:
            limit = cupy.cuda.runtime.deviceGetAttribute(
                cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)
            if shared_mem > limit:
                raise ValueError(f"{ref.name}: {shared_mem} bytes of shared memory exceed the "
                                 f"device's opt-in limit of {limit}")
            kernel.max_dynamic_shared_size_bytes = shared_mem
            _opted_in[key] = shared_mem
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

"""Can this machine run ssmkit's GPU kernels? CuPy installed, and built for a CUDA major version
the NVIDIA driver supports. When not, one clear message that names the install extra.

ssmkit itself depends on no CUDA package: ``pip install "ssmkit[cuda13]"`` or
``"ssmkit[cuda12]"`` brings the CuPy build and the NVRTC wheel of that CUDA major version (a
CUDA 12 driver cannot run a CuPy built for CUDA 13: every CUDA call then fails with
``cudaErrorInsufficientDriver``, which also is what a machine without a driver reports).

The check runs where ssmkit first touches the GPU (``_compile.get_kernel``, the DLPack path of
``_arrays.backend_of``, ``ssmkit.torch``'s bridge), once per process, and costs two version queries.
"""
from __future__ import annotations

# CUDA major version of the driver -> the extra whose CuPy build runs on it.
EXTRAS = {12: "cuda12", 13: "cuda13"}
# The CuPy wheels each extra installs (what to uninstall when switching).
CUPY_WHEELS = {12: "cupy-cuda12x", 13: "cupy-cuda13x"}


class CudaSetupError(RuntimeError):
    """The installed CuPy cannot use a GPU on this machine (no driver, or a driver too old for
    the CUDA version CuPy was built for)."""


def install_hint(driver_major: int | None = None) -> str:
    """The pip command for the driver's CUDA major version (both when unknown)."""
    if driver_major in EXTRAS:
        return f'pip install "ssmkit[{EXTRAS[driver_major]}]"'
    newest = max(EXTRAS)
    if driver_major is not None and driver_major > newest:
        return f'pip install "ssmkit[{EXTRAS[newest]}]"'
    return 'pip install "ssmkit[cuda13]" (CUDA 13 driver) or "ssmkit[cuda12]" (CUDA 12 driver)'


def version_str(v: int) -> str:
    """12080 -> '12.8' (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def missing_cupy_message() -> str:
    return ("ssmkit: CuPy is not installed, so the GPU kernels are unavailable (NumPy inputs run the "
            f"CPU reference); install the build for your driver: {install_hint()}")


def diagnose(driver_version: int, cupy_cuda_version: int, cupy_wheel: str | None = None) -> str | None:
    """Why CuPy (built for CUDA ``cupy_cuda_version``, installed as distribution ``cupy_wheel``)
    cannot run on a driver that supports CUDA ``driver_version`` (``cudaDriverGetVersion``: 0 when
    no driver is installed), or None when it can. Versions in CUDA's encoding (12080 = 12.8).

    A driver runs any build of its own or an older CUDA major version (minor versions are
    compatible within a major version), so only the major versions are compared.
    """
    if driver_version <= 0:
        return ("ssmkit: no NVIDIA driver found, so CuPy cannot use a GPU here "
                "(NumPy inputs run the CPU reference)")
    d_major, c_major = driver_version // 1000, cupy_cuda_version // 1000
    if c_major <= 0 or d_major >= c_major:
        return None
    built = cupy_wheel or f"CuPy for CUDA {c_major}"
    head = (f"ssmkit: the NVIDIA driver supports CUDA {version_str(driver_version)} but the installed CuPy "
            f"({built}) is built for CUDA {c_major}")
    if d_major not in EXTRAS:
        return f"{head}: upgrade the driver (ssmkit's extras: {', '.join(f'cuda{m}' for m in sorted(EXTRAS))})"
    uninstall = f"pip uninstall {cupy_wheel} && " if cupy_wheel else ""
    return f"{head}: {uninstall}{install_hint(d_major)} (or upgrade the driver to CUDA {c_major})"


def cupy_wheel() -> str | None:
    """The installed CuPy distribution's name ('cupy-cuda13x', ...), or None."""
    from importlib import metadata

    for name in (*CUPY_WHEELS.values(), "cupy"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


def cupy_cuda_version(cupy) -> int:
    """The CUDA version the imported CuPy was built for (needs no driver)."""
    try:
        return int(cupy.cuda.runtime.runtimeGetVersion())
    except Exception:
        return 0


def import_cupy():
    """``import cupy``, or an ImportError that names the extra to install."""
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name != "cupy":
            raise
        raise ImportError(missing_cupy_message()) from exc
    return cupy


_checked = False


def check_driver(cupy=None) -> None:
    """Raise CudaSetupError (naming the extra) when the driver cannot run the installed CuPy.
    Runs its two version queries once per process; later calls return at once."""
    global _checked
    if _checked:
        return
    cupy = cupy or import_cupy()
    if getattr(cupy.cuda.runtime, "is_hip", False):
        _checked = True
        return
    msg = diagnose(int(cupy.cuda.runtime.driverGetVersion()), cupy_cuda_version(cupy), cupy_wheel())
    if msg is not None:
        raise CudaSetupError(msg)
    _checked = True


def explain_cuda_error(exc: BaseException, cupy=None) -> None:
    """Inside ``except`` for a CUDA runtime error at first use: raise CudaSetupError from ``exc``
    when the driver explains it (no driver, or too old for the CuPy build); else return, and
    the caller re-raises ``exc``."""
    try:
        check_driver(cupy)
    except CudaSetupError as setup:
        raise setup from exc

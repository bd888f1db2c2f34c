"""Compile kernel instantiations with NVRTC directly, without a GPU or a CUDA driver.

CuPy's compile entry points query the driver and fail on a machine without a GPU
(``cudaErrorInsufficientDriver``); ``cuda.bindings.nvrtc`` with the ``nvidia-cuda-nvrtc`` wheel
does not. CI uses this to compile every instantiation for sm_80 and sm_90 with exactly the source
and options that ``_compile`` hands to CuPy (plus ``-ftz=true``, which CuPy adds itself).
"""
from __future__ import annotations

from dataclasses import dataclass

from ._compile import KernelRef, compile_options, read_source

CUPY_ADDED_OPTIONS = ("-ftz=true",)


class NVRTCError(RuntimeError):
    pass


@dataclass
class OfflineResult:
    file: str
    arch: int
    cubin_bytes: int
    lowered: dict[str, str]
    log: str


def _check(result, what: str, prog=None):
    from cuda.bindings import nvrtc

    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _program_log(prog) if prog is not None else ""
        raise NVRTCError(f"{what} failed: {err}\n{log}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def _program_log(prog) -> str:
    from cuda.bindings import nvrtc

    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # A mutable buffer: NVRTC writes into it. (b" " * size, the cuda-python docs' idiom, is the
    # interpreter's shared one-byte b" " object when the log is empty: NVRTC's NUL then turned
    # every b" " in the process into b"\0", which broke torch.save in the same process.)
    buf = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return bytes(buf).decode(errors="replace").rstrip("\x00 \n")


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def compile_file(file: str, names: list[str], arch: int, extra_source: str = "") -> OfflineResult:
    """Compile ``names`` (name expressions) of ``file`` for ``sm_<arch>`` into one cubin."""
    from cuda.bindings import nvrtc

    src = read_source(file) + ("\n" + extra_source if extra_source else "")
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), file.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), f"add name {name}")
        opts = [o.encode() for o in compile_options() + CUPY_ADDED_OPTIONS + (f"--gpu-architecture=sm_{arch}",)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _program_log(prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NVRTCError(f"NVRTC failed on {file} for sm_{arch}: {err}\n{log}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        lowered = {}
        for name in names:
            err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise NVRTCError(f"no lowered name for {name}: {err}")
            lowered[name] = low.decode()
        return OfflineResult(file, arch, int(size), lowered, log)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_refs(refs: list[KernelRef], arch: int) -> list[OfflineResult]:
    """Group ``refs`` by file and compile each file's instantiations in one NVRTC program."""
    by_file: dict[str, list[str]] = {}
    for r in refs:
        by_file.setdefault(r.file, []).append(r.name)
    return [compile_file(f, sorted(set(n)), arch) for f, n in sorted(by_file.items())]

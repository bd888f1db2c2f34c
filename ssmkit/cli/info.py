"""``ssmkit info``: what this machine offers ssmkit, and which kernel variants are compiled.

GPU(s), driver, CuPy and the CUDA version it is built for, NVRTC, torch, CuPy's kernel cache
folder and its size, and per op: how many variants ssmkit has, how many the disk cache holds for
this GPU with the current sources and options (exact: the cache file name CuPy would look up),
and how many ssmkit entries the cache holds at all (any GPU architecture, any source version).
Works without a GPU, and without CuPy.

How the cache is keyed (CuPy 14): one file per compiled module, named by a SHA-1 over the
target architecture, the options (ours carry a hash of every file in ``kernels_cu/``), the NVRTC
version, the source and the name expression. A module built with a name expression stores the
kernel's mangled name ahead of the cubin (``cupy.cuda.compiler._cache_payload_magic``), so an
entry's kernel can be read back without knowing its key; its architecture and source version
cannot, which is why the exact count needs the GPU.
"""
from __future__ import annotations

import json
import os
import platform
import re
import struct
from collections import Counter
from pathlib import Path

from .common import gpu_status, one_line

_HASH_HEX = 40                      # CuPy's disk format: SHA-1 hex of the payload, then the payload
_NE_MAGIC = b"\x93CUPYNE\x00"       # payload header of modules built with name expressions (CuPy 14)


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="GPU, driver, CuPy, NVRTC, torch, the kernel cache and what is compiled",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(render(data))
    return 0


# ---- collecting -------------------------------------------------------------------------------

def collect() -> dict:
    import numpy

    from .. import __version__
    from .._compile import sources_hash
    from .._layout import kernels_dir

    data: dict = {
        "ssmkit": {"version": __version__, "path": str(Path(__file__).resolve().parents[1]),
                   "kernels_dir": str(kernels_dir()), "sources_hash": sources_hash()},
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    data["cupy"], cupy = _cupy_info()
    data["driver"] = _driver_info(cupy)
    n, why = gpu_status()
    data["gpus"] = _gpus(cupy, n)
    data["gpu_problem"] = why or None
    data["torch"] = _torch_info()
    data["cache"] = _cache_info(cupy, n)
    return data


def _cupy_info():
    from .._cuda_env import cupy_wheel, import_cupy, version_str

    try:
        cupy = import_cupy()
    except ImportError as exc:
        return {"installed": False, "problem": one_line(exc)}, None
    info = {"installed": True, "version": cupy.__version__, "wheel": cupy_wheel()}
    try:
        info["cuda_build"] = version_str(int(cupy.cuda.runtime.runtimeGetVersion()))
    except Exception as exc:  # noqa: BLE001
        info["cuda_build"] = f"unknown ({one_line(exc)})"
    try:
        info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:  # noqa: BLE001 - NVRTC not found: say so, it is what compiles the kernels
        info["nvrtc"] = None
        info["nvrtc_problem"] = one_line(exc)
    return info, cupy


def _driver_info(cupy) -> dict:
    from .._cuda_env import version_str

    info: dict = {"version": _kernel_module_version()}
    if cupy is not None:
        try:
            v = int(cupy.cuda.runtime.driverGetVersion())
            info["cuda"] = version_str(v) if v > 0 else None
        except Exception as exc:  # noqa: BLE001
            info["cuda"] = None
            info["problem"] = one_line(exc)
    return info


def _kernel_module_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 580.95.05), or None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def _gpus(cupy, n: int) -> list[dict]:
    gpus = []
    for i in range(n):
        try:
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            gpus.append({"index": i, "name": name, "arch": f"sm_{p['major']}{p['minor']}",
                         "sms": int(p["multiProcessorCount"]), "memory_gib": round(p["totalGlobalMem"] / 2**30, 1)})
        except Exception as exc:  # noqa: BLE001
            gpus.append({"index": i, "problem": one_line(exc)})
    return gpus


def _torch_info() -> dict:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install: report, don't fail
        return {"installed": True, "problem": one_line(exc)}
    info = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001
        info["cuda_devices"] = 0
        info["problem"] = one_line(exc)
    return info


# ---- the kernel cache ---------------------------------------------------------------------------

def cache_dir(cupy=None) -> str:
    """The folder CuPy caches compiled kernels in (its disk backend's, else CUPY_CACHE_DIR or
    CuPy's default)."""
    if cupy is not None:
        from cupy.cuda import compiler

        backend = getattr(compiler, "_kernel_cache_backend", None)
        path = getattr(backend, "_cache_dir", None)
        if isinstance(path, str):
            return path
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def kernel_function(ref_name: str) -> str:
    """'ssm::selective_scan_fwd<ssm::f16, ...>' -> 'selective_scan_fwd'."""
    return ref_name.split("<", 1)[0].rsplit("::", 1)[-1].strip()


def mangled_path(mangled: str) -> list[str]:
    """The nested-name components of an Itanium-mangled name: '_ZN3ssm4scanIfEEvT_' -> ['ssm', 'scan']."""
    if not mangled.startswith("_ZN"):
        return []
    parts, i = [], 3
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while j < len(mangled) and mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        parts.append(mangled[j:j + n])
        i = j + n
    return parts


def entry_names(path: str, magic: bytes = _NE_MAGIC) -> list[str]:
    """The mangled kernel names stored ahead of the cubin in one cache file ([] if none)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return []
    pos = _HASH_HEX
    if head[pos:pos + len(magic)] != magic:
        return []
    pos += len(magic)
    try:
        (count,) = struct.unpack_from("<I", head, pos)
        pos += 4
        names = []
        for _ in range(min(count, 64)):
            (size,) = struct.unpack_from("<I", head, pos)
            pos += 4
            if pos + size > len(head):
                break
            names.append(head[pos:pos + size].decode("utf-8", "replace"))
            pos += size
        return names
    except struct.error:
        return []


def scan_cache(path: str, function_ops: dict[str, str], magic: bytes = _NE_MAGIC) -> dict:
    """Files and bytes in the cache folder, and its ssmkit entries per op (any architecture,
    any source version), read from the names stored in each entry."""
    files = size = 0
    by_op: Counter = Counter()
    if os.path.isdir(path):
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if not entry.is_file():
                        continue
                    files += 1
                    size += entry.stat().st_size
                except OSError:
                    continue
                if not entry.name.endswith(".cubin"):
                    continue
                for name in entry_names(entry.path, magic):
                    parts = mangled_path(name)
                    if parts[:1] == ["ssm"] and len(parts) >= 2:
                        by_op[function_ops.get(parts[-1], "other ssm kernels")] += 1
                        break
    return {"files": files, "bytes": size, "ssmkit_entries": dict(sorted(by_op.items()))}


class _Probe(Exception):
    """Raised from inside CuPy's compile path once the cache file name is known."""


class _NameRecorder:
    """A CuPy kernel-cache backend that records the name looked up and stops there."""

    def __init__(self):
        self.name = None

    def load(self, name):
        self.name = name
        raise _Probe

    def save(self, name, cubin, source):  # pragma: no cover - load always stops first
        raise _Probe


def _stop_compile(*args, **kwargs):
    raise _Probe


def cache_names(refs) -> dict | None:
    """{ref: the file name CuPy's disk cache keeps ``ref`` under, for the current GPU and the
    current sources and options}, or None when this CuPy cannot tell.

    Asks CuPy's own compile path (the call ``RawModule`` makes, ``cupy._core.core.compile_with_cache``)
    through a recording cache backend, and stops it there: nothing is compiled (CuPy's NVRTC call
    is replaced by a stop for the duration) or loaded. The key includes the GPU's architecture, so
    this needs the GPU; and one NVRTC preprocess of an empty file (CuPy's compiler-version probe).
    """
    import cupy
    from cupy.cuda import compiler

    from .._compile import compile_options, read_source

    compile_with_cache = getattr(getattr(cupy._core, "core", None), "compile_with_cache", None)
    if (compile_with_cache is None or not hasattr(compiler, "_kernel_cache_backend")
            or not hasattr(compiler, "_compile_using_nvrtc_no_warning")):
        return None
    backend = compiler._kernel_cache_backend
    saved_nvrtc = compiler._compile_using_nvrtc_no_warning
    saved_env = os.environ.pop("CUPY_CACHE_IN_MEMORY", None)   # in-memory mode never looks the name up
    rec = _NameRecorder()
    compiler._kernel_cache_backend = rec
    compiler._compile_using_nvrtc_no_warning = _stop_compile
    names = {}
    try:
        options = compile_options()
        for ref in refs:
            rec.name = None
            try:
                compile_with_cache(read_source(ref.file), options, prepend_cupy_headers=False, backend="nvrtc",
                                   translate_cucomplex=False, enable_cooperative_groups=False,
                                   name_expressions=(ref.name,), log_stream=None, jitify=False)
            except _Probe:
                pass
            if rec.name is None:
                return None
            names[ref] = rec.name
    except TypeError:       # a CuPy whose compile_with_cache takes other arguments
        return None
    finally:
        compiler._kernel_cache_backend = backend
        compiler._compile_using_nvrtc_no_warning = saved_nvrtc
        if saved_env is not None:
            os.environ["CUPY_CACHE_IN_MEMORY"] = saved_env
    return names


def cached_variants(refs) -> dict | None:
    """{ref: whether CuPy's disk cache holds ``ref`` compiled for the current GPU with the current
    sources and options}, or None when this CuPy cannot tell (see ``cache_names``)."""
    from cupy.cuda import compiler

    folder = getattr(getattr(compiler, "_kernel_cache_backend", None), "_cache_dir", None)
    if not isinstance(folder, str):
        return None             # a cache backend other than CuPy's folder on disk
    names = cache_names(refs)
    if names is None:
        return None
    return {ref: os.path.isfile(os.path.join(folder, name)) for ref, name in names.items()}


def _cache_info(cupy, n_gpus: int) -> dict:
    from .._registry import ops, variants

    per_op = {op: variants(op) for op in ops()}
    function_ops: dict[str, str] = {}
    for op, refs in per_op.items():
        for ref in refs:
            fn = kernel_function(ref.name)
            have = function_ops.get(fn)
            function_ops[fn] = op if have in (None, op) else f"{have}/{op}"
    magic = _NE_MAGIC
    if cupy is not None:
        try:
            from cupy.cuda import compiler

            magic = getattr(compiler, "_cache_payload_magic", _NE_MAGIC)
        except Exception:  # noqa: BLE001
            pass
    path = cache_dir(cupy)
    info = {"dir": path, "from": "CUPY_CACHE_DIR" if os.environ.get("CUPY_CACHE_DIR") else "CuPy's default",
            "exists": os.path.isdir(path)}
    info.update(scan_cache(path, function_ops, magic))
    info["variants"] = {op: len(refs) for op, refs in per_op.items()}
    info["compiled_for_gpu0"] = None
    if n_gpus > 0:
        try:
            with cupy.cuda.Device(0):
                found = cached_variants([r for refs in per_op.values() for r in refs])
        except Exception as exc:  # noqa: BLE001 - report, don't fail `info`
            found = None
            info["compiled_problem"] = one_line(exc)
        if found is not None:
            info["compiled_for_gpu0"] = {op: sum(found[r] for r in refs) for op, refs in per_op.items()}
        elif "compiled_problem" not in info:
            info["compiled_problem"] = f"this CuPy ({cupy.__version__}) does not expose its cache key"
    return info


# ---- rendering ----------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(d: dict) -> str:
    s = d["ssmkit"]
    lines = [f"ssmkit {s['version']}  ({s['path']})",
             f"  python {d['python']}, numpy {d['numpy']}"]
    c = d["cupy"]
    if c["installed"]:
        lines.append(f"  CuPy      {c['version']} ({c.get('wheel') or 'unknown distribution'}, CUDA runtime {c['cuda_build']})")
        lines.append(f"  NVRTC     {c['nvrtc']}" if c.get("nvrtc") else f"  NVRTC     not found: {c.get('nvrtc_problem')}")
    else:
        lines.append(f"  CuPy      not installed: {c['problem']}")
    dr = d["driver"]
    if dr.get("version") or dr.get("cuda"):
        cuda = f", supports CUDA {dr['cuda']}" if dr.get("cuda") else ""
        lines.append(f"  driver    {dr.get('version') or 'version unknown'}{cuda}")
    else:
        lines.append("  driver    none found")
    if d["gpus"]:
        for g in d["gpus"]:
            if "problem" in g:
                lines.append(f"  GPU {g['index']}     {g['problem']}")
            else:
                lines.append(f"  GPU {g['index']}     {g['name']} ({g['arch']}, {g['sms']} SMs, {g['memory_gib']} GiB)")
    else:
        lines.append(f"  GPU       none usable: {d['gpu_problem']}")
    t = d["torch"]
    if not t["installed"]:
        lines.append('  torch     not installed (pip install "ssmkit[torch]" for ssmkit.torch and the models)')
    elif "version" not in t:
        lines.append(f"  torch     fails to import: {t.get('problem')}")
    else:
        cuda = f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU build"
        lines.append(f"  torch     {t['version']} ({cuda}, sees {t.get('cuda_devices', 0)} CUDA device(s))")
    k = d["cache"]
    lines.append(f"kernel cache {k['dir']} ({k['from']}): "
                 + (f"{k['files']} files, {_size(k['bytes'])}" if k["exists"] else "does not exist yet"))
    lines.append(f"  sources hash {s['sources_hash']} ({s['kernels_dir']})")
    compiled = k.get("compiled_for_gpu0")
    entries = k["ssmkit_entries"]
    gpu0 = d["gpus"][0]["arch"] if d["gpus"] and "arch" in d["gpus"][0] else "GPU 0"
    hdr = f"  {'op':<24}{'variants':>9}  {'compiled for ' + gpu0:>20}  {'cache entries (any GPU/version)':>32}"
    lines.append(hdr)
    for op, n in k["variants"].items():
        got = "-" if compiled is None else str(compiled.get(op, 0))
        lines.append(f"  {op:<24}{n:>9}  {got:>20}  {entries.get(op, 0):>32}")
    for op, cnt in entries.items():
        if op not in k["variants"]:
            lines.append(f"  {op:<24}{'':>9}  {'':>20}  {cnt:>32}")
    if compiled is None:
        why = k.get("compiled_problem") or "needs a GPU: the cache key includes its architecture"
        lines.append(f"  (compiled for the current sources and options: unknown, {why}; "
                     "'ssmkit warmup' compiles them)")
    else:
        lines.append("  (compiled: CuPy's cache file for this GPU, these sources and options exists; "
                     "'ssmkit warmup' compiles the rest)")
    return "\n".join(lines)

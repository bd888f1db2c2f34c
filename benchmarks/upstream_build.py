"""Build the upstream CUDA extensions (mamba_ssm's ``selective_scan_cuda``, causal_conv1d's
``causal_conv1d_cuda``) from their published sources with torch's JIT extension loader, so that
upstream and ssmkit can be timed in the same process (benchmarks/bench_upstream_same_run.py).

The sources are never part of this repository: they sit, unpacked from the PyPI sdists, in the
git-ignored folder ``.upstream/`` at the repository root (see ``.upstream/VERSIONS.txt``) and travel
to the GPU machine as a carried path. Nothing here copies upstream code; this module only decides
which of upstream's files to compile, with which flags, and generates a few small translation units
of its own:

* a *wrapper* per (upstream .cu file, wanted dtype pair). It declares every other dtype pair that
  the file instantiates as an explicit specialization and then ``#include``s the upstream file
  unchanged; an explicit instantiation that follows the declaration of an explicit specialization
  for the same arguments has no effect ([temp.explicit]), so only the wanted pair is compiled. That
  cuts the build to the fp32 / bf16 real kernels (upstream's own list compiles fp16 and complex too,
  and causal_conv1d's three files instantiate nine dtype pairs each), and splits one upstream file
  into one translation unit per pair, which ninja compiles in parallel.
* one *stub* (.cpp) that defines the pairs not built, as functions that raise, so that upstream's
  .cpp (whose dispatch names every pair) links and imports. Calling one of them raises a
  RuntimeError naming it.

Flags are upstream's setup.py flags for nvcc (-O3, the -U__CUDA_NO_HALF/BFLOAT16_* set,
--expt-relaxed-constexpr, --expt-extended-lambda, --use_fast_math, --ptxas-options=-v, -lineinfo,
--threads 4) with one -gencode for the wanted arch instead of their list of eight or more.

    python benchmarks/upstream_build.py --kind selective_scan --build-dir /tmp/upstream_build
    python benchmarks/upstream_build.py --plan          # print sources and flags, build nothing

``build(kind, out_dir, arch="90")`` returns the imported extension module, also registered in
``sys.modules`` under upstream's name, so upstream's Python (``import selective_scan_cuda``) finds it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / ".upstream"

# kind -> where its sources are and how upstream's setup.py builds it.
KINDS = {
    "selective_scan": {
        "package": "mamba_ssm",
        "ext_name": "selective_scan_cuda",
        "csrc": "csrc/selective_scan",
        "cpp": "selective_scan.cpp",
        # setup.py's source list, in its order (the .cpp first).
        "cu": ["selective_scan_fwd_fp32.cu", "selective_scan_fwd_fp16.cu", "selective_scan_fwd_bf16.cu",
               "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_fp32_complex.cu",
               "selective_scan_bwd_fp16_real.cu", "selective_scan_bwd_fp16_complex.cu",
               "selective_scan_bwd_bf16_real.cu", "selective_scan_bwd_bf16_complex.cu"],
        "cxx": ["-O3", "-std=c++17"],
        "nvcc_std": ["-std=c++17"],
        # (input_t, weight_t): u/delta/z dtype, A dtype. Real A only.
        "default_pairs": [("fp32", "fp32"), ("bf16", "fp32")],
    },
    "causal_conv1d": {
        "package": "causal_conv1d",
        "ext_name": "causal_conv1d_cuda",
        "csrc": "csrc",
        "cpp": "causal_conv1d.cpp",
        "cu": ["causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"],
        "cxx": ["-O3"],
        "nvcc_std": [],          # causal_conv1d's setup.py passes no -std (torch adds c++17)
        # (input_t, weight_t): x dtype, weight dtype (the benchmarks pass weight in x's dtype).
        "default_pairs": [("fp32", "fp32"), ("bf16", "bf16")],
    },
}

# Upstream's nvcc flags (both setup.py files), less their -gencode list, plus "--threads 4".
NVCC_COMMON = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--ptxas-options=-v",
    "-lineinfo",
    "--threads", "4",
]

# Short dtype names <-> the C++ spellings in upstream's explicit instantiations.
CXX_TYPE = {"fp32": "float", "bf16": "c10::BFloat16", "fp16": "c10::Half", "complex64": "c10::complex<float>"}
_FROM_UPSTREAM = {"float": "fp32", "at::BFloat16": "bf16", "c10::BFloat16": "bf16", "at::Half": "fp16",
                  "c10::Half": "fp16", "complex_t": "complex64", "c10::complex<float>": "complex64"}

_INST_RE = re.compile(
    r"^[ \t]*template[ \t]+void[ \t]+(\w+)[ \t]*<[ \t]*([\w:]+)[ \t]*,[ \t]*([\w:<> ]+?)[ \t]*>"
    r"[ \t]*\([ \t]*(?:const[ \t]+)?(\w+)[ \t]*&", re.M)


# ---------------------------------------------------------------------------------------------
# locating sources, planning the build
# ---------------------------------------------------------------------------------------------

def source_root(kind: str, upstream: Path | None = None) -> Path:
    """``.upstream/<package>-<version>/`` for ``kind`` (exactly one such folder expected)."""
    cfg = KINDS[kind]
    base = Path(upstream) if upstream else UPSTREAM
    found = sorted(p for p in base.glob(f"{cfg['package']}-*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no {cfg['package']}-<version>/ under {base}: see benchmarks/NOTES.md, "
                                "'Upstream in the same run' (pip download the sdist, unpack into .upstream/)")
    if len(found) > 1:
        raise RuntimeError(f"several {cfg['package']} source folders under {base}: {[p.name for p in found]}")
    return found[0]


def version_of(kind: str, upstream: Path | None = None) -> str:
    return source_root(kind, upstream).name.split("-", 1)[1]


def instantiations(cu_file: Path) -> list[tuple[str, str, str, str]]:
    """(function, input dtype, weight dtype, params struct) of each explicit instantiation."""
    out = []
    for fn, it, wt, params in _INST_RE.findall(Path(cu_file).read_text()):
        try:
            out.append((fn, _FROM_UPSTREAM[it.strip()], _FROM_UPSTREAM[wt.strip()], params))
        except KeyError as exc:
            raise ValueError(f"{cu_file.name}: unknown type {exc} in 'template void {fn}<{it}, {wt}>'") from None
    return out


def _pairs(pairs) -> list[tuple[str, str]]:
    res = []
    for p in pairs:
        if isinstance(p, str):
            p = tuple(p.split(","))
        it, wt = p
        if it not in CXX_TYPE or wt not in CXX_TYPE:
            raise ValueError(f"dtype pair {p}: names are {sorted(CXX_TYPE)}")
        res.append((it, wt))
    return res


def plan(kind: str, pairs=None, full: bool = False, upstream: Path | None = None) -> dict:
    """What ``build`` compiles: upstream files used as they are, wrappers to generate (file, pair,
    declared-away instantiations), the stub's functions, and the pairs built."""
    cfg = KINDS[kind]
    root = source_root(kind, upstream)
    csrc = root / cfg["csrc"]
    cpp = csrc / cfg["cpp"]
    cus = [csrc / c for c in cfg["cu"]]
    missing = [str(p) for p in [cpp, *cus] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"upstream sources missing: {missing}")
    insts = {cu: instantiations(cu) for cu in cus}
    if full:
        everything = sorted({(i[1], i[2]) for v in insts.values() for i in v})
        return {"kind": kind, "root": root, "csrc": csrc, "cpp": cpp, "direct": cus, "wrappers": [], "stubs": [],
                "pairs": everything, "full": True}
    want = _pairs(pairs or cfg["default_pairs"])
    direct, wrappers, stubs = [], [], []
    for cu, lst in insts.items():
        present = sorted({(i[1], i[2]) for i in lst})
        keep = [p for p in present if p in want]
        if keep == present and len(present) == 1:
            direct.append(cu)            # the file holds exactly one wanted pair: compile it as it is
            continue
        for p in keep:
            wrappers.append({"cu": cu, "pair": p, "declare": [i for i in lst if (i[1], i[2]) != p]})
        stubs += [i for i in lst if (i[1], i[2]) not in want]
    built = sorted({(i[1], i[2]) for v in insts.values() for i in v if (i[1], i[2]) in want})
    absent = [p for p in want if p not in built]
    if absent:
        raise ValueError(f"{kind}: upstream instantiates no {absent}")
    return {"kind": kind, "root": root, "csrc": csrc, "cpp": cpp, "direct": direct, "wrappers": wrappers,
            "stubs": stubs, "pairs": built, "full": False}


def flags(kind: str, arch: str = "90") -> tuple[list[str], list[str]]:
    """(extra_cflags, extra_cuda_cflags) as upstream's setup.py, for one GPU arch."""
    cfg = KINDS[kind]
    arch = str(arch).replace(".", "")
    gencode = ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return list(cfg["cxx"]), NVCC_COMMON[:1] + cfg["nvcc_std"] + NVCC_COMMON[1:] + gencode


# ---------------------------------------------------------------------------------------------
# generated translation units (ours)
# ---------------------------------------------------------------------------------------------

_PROLOGUE = """\
// Generated by ssmkit's benchmarks/upstream_build.py (not upstream code).
#include <cstdint>
#include <cuda_runtime_api.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
"""


def _decl(fn: str, params: str, it: str | None = None, wt: str | None = None, body: str | None = None) -> str:
    if it is None:
        return f"template <typename input_t, typename weight_t> void {fn}({params} &params, cudaStream_t stream);"
    head = f"template <> void {fn}<{CXX_TYPE[it]}, {CXX_TYPE[wt]}>({params} &params, cudaStream_t stream)"
    return head + (f" {{ {body} }}" if body else ";")


def wrapper_source(w: dict) -> str:
    it, wt = w["pair"]
    lines = [_PROLOGUE,
             f"// Compiles upstream's {w['cu'].name} for <{CXX_TYPE[it]}, {CXX_TYPE[wt]}> only: the file's other",
             "// explicit instantiations follow the explicit-specialization declarations below and so have no",
             "// effect ([temp.explicit]); those pairs are defined by another wrapper or by the stub.", ""]
    structs = sorted({i[3] for i in w["declare"]})
    lines += [f"struct {s};" for s in structs]
    for fn, params in sorted({(i[0], i[3]) for i in w["declare"]}):
        lines.append(_decl(fn, params))
    for fn, dit, dwt, params in w["declare"]:
        lines.append(_decl(fn, params, dit, dwt))
    lines += ["", f'#include "{w["cu"].as_posix()}"', ""]
    return "\n".join(lines)


def stub_source(kind: str, stubs: list) -> str:
    lines = [_PROLOGUE, "#include <c10/util/Exception.h>", "",
             "// The dtype pairs upstream's dispatch names but this harness does not compile: they raise.", ""]
    structs = sorted({i[3] for i in stubs})
    lines += [f"struct {s};" for s in structs]
    for fn, params in sorted({(i[0], i[3]) for i in stubs}):
        lines.append(_decl(fn, params))
    for fn, it, wt, params in stubs:
        msg = (f'TORCH_CHECK(false, "{fn}<{CXX_TYPE[it]}, {CXX_TYPE[wt]}> was not built by ssmkit\'s '
               f'benchmarks/upstream_build.py ({kind}: fp32/bf16 only; pass full=True for all)");')
        lines.append(_decl(fn, params, it, wt, body=msg))
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)           # unchanged files keep their mtime: ninja does not rebuild
    return path


def sources(p: dict, gen_dir: Path) -> list[Path]:
    """The source list for torch's loader: upstream's .cpp, direct upstream .cu files, generated
    wrappers and stub (written into ``gen_dir``)."""
    srcs = [p["cpp"], *p["direct"]]
    for w in p["wrappers"]:
        it, wt = w["pair"]
        srcs.append(_write_if_changed(gen_dir / f"{w['cu'].stem}__{it}_{wt}.cu", wrapper_source(w)))
    if p["stubs"]:
        srcs.append(_write_if_changed(gen_dir / f"{p['kind']}_not_built_stubs.cpp", stub_source(p["kind"], p["stubs"])))
    return srcs


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------

def _set_max_jobs() -> str:
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(os.cpu_count() or 1)
    return os.environ["MAX_JOBS"]


def _cudart_link_dir(build_dir: Path) -> list[str]:
    """torch links with ``-lcudart``; a pip-installed toolkit (nvidia-cuda-runtime) ships only
    ``libcudart.so.13``. Then give the linker a folder holding a ``libcudart.so`` link to it."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME:
        return []
    libs = [Path(CUDA_HOME) / d for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    if any((d / "libcudart.so").exists() for d in libs):
        return []
    versioned = sorted(f for d in libs if d.is_dir() for f in d.glob("libcudart.so.*"))
    if not versioned:
        return []
    link_dir = build_dir / "cudart_link"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "libcudart.so"
    if not link.is_symlink():
        link.symlink_to(versioned[0])
    return [f"-L{link_dir}"]


def build(kind: str, out_dir, arch: str = "90", pairs=None, full: bool = False, verbose: bool = False,
          extra_includes=(), upstream: Path | None = None):
    """Build (or load from ``out_dir``, ninja skipping what is up to date) upstream's extension for
    ``kind`` ("selective_scan" or "causal_conv1d"), import it and register it in ``sys.modules``
    under upstream's module name. Prints the build time. Returns the module."""
    from torch.utils.cpp_extension import load

    cfg = KINDS[kind]
    p = plan(kind, pairs, full, upstream)
    build_dir = Path(out_dir) / (cfg["ext_name"] + ("_full" if full else ""))
    build_dir.mkdir(parents=True, exist_ok=True)
    srcs = sources(p, build_dir / "gen")
    cflags, cuda_flags = flags(kind, arch)
    jobs = _set_max_jobs()
    t0 = time.perf_counter()
    mod = load(name=cfg["ext_name"], sources=[str(s) for s in srcs], extra_cflags=cflags,
               extra_cuda_cflags=cuda_flags, extra_include_paths=[str(p["csrc"]), *map(str, extra_includes)],
               extra_ldflags=_cudart_link_dir(build_dir), build_directory=str(build_dir), verbose=verbose,
               with_cuda=True)
    dt = time.perf_counter() - t0
    print(f"upstream_build: {cfg['ext_name']} ({kind} {version_of(kind, upstream)}, pairs "
          f"{', '.join('/'.join(x) for x in p['pairs'])}, sm_{arch}, MAX_JOBS={jobs}): {dt:.1f} s "
          f"({len(srcs)} sources, {build_dir})", flush=True)
    sys.modules[cfg["ext_name"]] = mod
    mod.__ssmkit_build_s__ = dt
    return mod


# ---------------------------------------------------------------------------------------------
# upstream callables
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _on_path(folder: Path):
    """``folder`` at the front of sys.path for the duration of an import (removed afterwards)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _ensure_packaging():
    """Upstream's Triton files compare versions with ``packaging.version.parse`` (softplus.py,
    determinism.py). Where ``packaging`` is not installed (the GPU machine has no network), stand
    in a minimal module whose parse gives comparable tuples of the leading release numbers."""
    try:
        importlib.import_module("packaging.version")
    except ImportError:
        import types

        def parse(v: str):
            return tuple(int(x) for x in re.findall(r"\d+", str(v).split("+")[0])[:3])

        pkg, ver = types.ModuleType("packaging"), types.ModuleType("packaging.version")
        ver.parse = parse
        pkg.version = ver
        sys.modules.setdefault("packaging", pkg)
        sys.modules.setdefault("packaging.version", ver)
        print("upstream_build: 'packaging' not installed; a minimal packaging.version stands in", flush=True)


def _import_upstream(kind: str, module: str, upstream: Path | None = None):
    _ensure_packaging()
    root = source_root(kind, upstream)
    with _on_path(root):
        mod = importlib.import_module(module)
    where = Path(getattr(mod, "__file__", "") or "").resolve()
    if root.resolve() not in where.parents:
        raise ImportError(f"{module} resolved to {where}, not under {root} (an installed copy shadows it)")
    return mod


def _ext(kind: str, ext=None):
    name = KINDS[kind]["ext_name"]
    if ext is not None:
        return ext
    if name not in sys.modules:
        raise RuntimeError(f"{name} is not loaded: call upstream_build.build({kind!r}, out_dir) first")
    return sys.modules[name]


def upstream_selective_scan(ext=None):
    """A callable ``f(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False)``
    running upstream's ``selective_scan_cuda.fwd``, differentiable through ``.bwd`` (the same calls
    upstream's SelectiveScanFn makes; B/C variable (B, G, N, L))."""
    import torch

    mod = _ext("selective_scan", ext)

    class _Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
            out, x, *rest = mod.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
            ctx.delta_softplus = delta_softplus
            ctx.has_z = z is not None
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
            return rest[0] if ctx.has_z else out

        @staticmethod
        def backward(ctx, dout):
            u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
            res = mod.bwd(u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x,
                          out if ctx.has_z else None, None, ctx.delta_softplus, False)
            du, ddelta, dA, dB, dC, dD, ddelta_bias = res[:7]
            dz = res[7] if ctx.has_z else None
            return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                    ddelta_bias if delta_bias is not None else None, None)

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return _Scan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return selective_scan


def upstream_selective_scan_fn(upstream: Path | None = None):
    """Upstream's own ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (needs the
    built ``selective_scan_cuda``, triton and einops), imported from .upstream/."""
    _ext("selective_scan")
    return _import_upstream("selective_scan", "mamba_ssm.ops.selective_scan_interface", upstream).selective_scan_fn


def upstream_causal_conv1d_fwd(ext=None):
    """``f(x, weight, bias=None, activation="silu") -> out``: upstream's causal_conv1d_fwd kernel
    call as its causal_conv1d_fwd_function makes it (output allocated per call)."""
    import torch

    mod = _ext("causal_conv1d", ext)

    def fwd(x, weight, bias=None, activation="silu"):
        out = torch.empty_like(x)
        mod.causal_conv1d_fwd(x, weight, bias, None, None, out, None, activation in ("silu", "swish"))
        return out

    return fwd


def upstream_causal_conv1d_bwd(ext=None):
    """``f(x, weight, bias, dout, activation="silu") -> (dx, dweight, dbias)``: upstream's
    causal_conv1d_bwd kernel call (fp32 dweight/dbias accumulators, cast back as upstream does)."""
    import torch

    mod = _ext("causal_conv1d", ext)

    def bwd(x, weight, bias, dout, activation="silu"):
        if dout.stride(2) != 1 and dout.stride(1) != 1:
            dout = dout.contiguous()
        dx = torch.empty_like(x)
        dweight = torch.zeros_like(weight, dtype=torch.float32)
        dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        mod.causal_conv1d_bwd(x, weight, bias, dout, None, None, None, dx, dweight, dbias, None,
                              activation in ("silu", "swish"))
        return dx, dweight.type_as(weight), (dbias.type_as(bias) if bias is not None else None)

    return bwd


def upstream_causal_conv1d_update_raw(ext=None):
    """``f(x, conv_state, weight, bias=None, activation="silu") -> out``: the kernel call only."""
    import torch

    mod = _ext("causal_conv1d", ext)

    def update(x, conv_state, weight, bias=None, activation="silu"):
        out = torch.empty_like(x)
        mod.causal_conv1d_update(x, conv_state, weight, bias, out, activation in ("silu", "swish"), None, None)
        return out

    return update


def upstream_causal_conv1d_python(upstream: Path | None = None):
    """Upstream's own Python package ``causal_conv1d`` (causal_conv1d_fn with autograd,
    causal_conv1d_update), imported from .upstream/ on top of the built ``causal_conv1d_cuda``."""
    _ext("causal_conv1d")
    return _import_upstream("causal_conv1d", "causal_conv1d", upstream)


def upstream_selective_state_update(upstream: Path | None = None):
    """Upstream's Triton ``selective_state_update`` (pure Python + triton; no build needed)."""
    mod = _import_upstream("selective_scan", "mamba_ssm.ops.triton.selective_state_update", upstream)
    return mod.selective_state_update


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def describe(kind: str, arch: str = "90", pairs=None, full: bool = False, gen_dir: Path | None = None) -> str:
    """A readable account of what ``build`` would compile (generated files written to gen_dir
    when given)."""
    p = plan(kind, pairs, full)
    cflags, cuda_flags = flags(kind, arch)
    lines = [f"{kind}: {KINDS[kind]['ext_name']} from {p['root'].relative_to(ROOT) if ROOT in p['root'].parents else p['root']}",
             f"  pairs built (input, weight): {', '.join('/'.join(x) for x in p['pairs'])}",
             f"  upstream .cpp: {p['cpp'].name}",
             f"  upstream .cu compiled as they are: {', '.join(c.name for c in p['direct']) or '-'}"]
    for w in p["wrappers"]:
        lines.append(f"  wrapper: {w['cu'].name} for {'/'.join(w['pair'])} "
                     f"({len(w['declare'])} other instantiations declared away)")
    if p["stubs"]:
        lines.append(f"  stub (raises): {len(p['stubs'])} instantiations: "
                     + ", ".join(sorted({f'{i[1]}/{i[2]}' for i in p['stubs']})))
    lines.append(f"  cxx flags: {' '.join(cflags)}")
    lines.append(f"  nvcc flags: {' '.join(cuda_flags)}")
    if gen_dir is not None:
        srcs = sources(p, Path(gen_dir))
        lines.append(f"  {len(srcs)} translation units; generated ones in {gen_dir}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(KINDS), action="append",
                    help="extension(s) to build (default: both)")
    ap.add_argument("--build-dir", default="/tmp/upstream_build")
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    ap.add_argument("--full", action="store_true", help="upstream's whole source list, every dtype pair")
    ap.add_argument("--include", action="append", default=[], help="extra include folder (repeatable)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the plan (sources, flags) and build nothing")
    a = ap.parse_args(argv)
    kinds = a.kind or ["selective_scan", "causal_conv1d"]
    if a.plan:
        for k in kinds:
            print(describe(k, a.arch, full=a.full))
        return 0
    for k in kinds:
        build(k, a.build_dir, a.arch, full=a.full, verbose=a.verbose, extra_includes=a.include)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every kernel instantiation ssmkit can request compiles with NVRTC, for sm_80 and sm_90, without a GPU.

The list comes from ``ssmkit._registry.variants()`` over all ops, i.e. from the same functions the
host code uses to pick a kernel. One NVRTC program per (source file, architecture) holds all of
that file's name expressions; the programs run in parallel worker processes (one per core, the
largest first), and each test waits for its own program, so a failure names the file and the
architecture and carries NVRTC's log.

Each program also carries the ``static_assert``s of every ``Params`` mirror (``ssmkit.ops.*``)
whose C struct the file defines or includes: the sizes and offsets the host packs are checked
against the compiler's, for free, in every file that uses the struct.

``SSMKIT_NVRTC_WORKERS`` overrides the number of worker processes (default: the CPU count). Under
pytest-xdist each test compiles its own program in its xdist worker instead.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import pkgutil
import re
import time
from functools import lru_cache

import pytest

pytestmark = pytest.mark.nvrtc

ARCHS = (80, 90)


# ---- what to compile ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _names_by_file() -> dict[str, list[str]]:
    """{source file: sorted unique name expressions} over every registered op."""
    from ssmkit._registry import variants

    by_file: dict[str, set[str]] = {}
    for ref in variants():
        by_file.setdefault(ref.file, set()).add(ref.name)
    return {f: sorted(n) for f, n in sorted(by_file.items())}


@lru_cache(maxsize=1)
def _ops_by_file() -> dict[str, list[str]]:
    from ssmkit._registry import ops, variants

    out: dict[str, list[str]] = {}
    for op in ops():
        for f in sorted({r.file for r in variants(op)}):
            out.setdefault(f, []).append(op)
    return out


def _all_params() -> list:
    """Every ``Params`` mirror defined at module level in ``ssmkit.ops.*``."""
    import ssmkit.ops
    from ssmkit._params import Params

    seen: dict[str, object] = {}
    for info in pkgutil.iter_modules(ssmkit.ops.__path__):
        mod = importlib.import_module(f"ssmkit.ops.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, Params):
                seen.setdefault(value.c_name, value)
    return [seen[k] for k in sorted(seen)]


def _text_with_includes(file: str, _seen: set[str] | None = None) -> str:
    """The source of ``file`` plus every local header it ``#include``s, recursively."""
    from ssmkit._compile import read_source
    from ssmkit._layout import kernels_dir

    seen = set() if _seen is None else _seen
    if file in seen or not (kernels_dir() / file).is_file():
        return ""
    seen.add(file)
    text = read_source(file)
    parts = [text]
    for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
        parts.append(_text_with_includes(inc, seen))
    return "\n".join(parts)


def _defines_struct(file: str, c_name: str) -> bool:
    short = c_name.rsplit("::", 1)[-1]
    return re.search(rf"\bstruct\s+{re.escape(short)}\s*\{{", _text_with_includes(file)) is not None


@lru_cache(maxsize=1)
def _params_by_file() -> dict[str, list]:
    return {f: [p for p in _all_params() if _defines_struct(f, p.c_name)] for f in _names_by_file()}


def _jobs() -> list[tuple[str, int]]:
    return [(f, arch) for f in _names_by_file() for arch in ARCHS]


# ---- the worker (runs in a spawned process) ---------------------------------------------------

def _compile_job(file: str, names: list[str], arch: int, extra_source: str):
    from ssmkit._nvrtc_offline import compile_file

    t0 = time.perf_counter()
    res = compile_file(file, names, arch, extra_source=extra_source)
    return res.cubin_bytes, len(res.lowered), time.perf_counter() - t0, res.log


class _Programs:
    """All (file, arch) programs submitted at once, largest first; results collected as tests ask."""

    def __init__(self, jobs: list[tuple[str, int]], parallel: bool = True):
        self.t0 = time.perf_counter()
        self.names = _names_by_file()
        self.extra = {f: "\n".join(p.layout_asserts() for p in ps) for f, ps in _params_by_file().items()}
        self.done: dict[tuple[str, int], tuple] = {}
        self.futures = {}
        self.pool = None
        self.workers = 1
        if not parallel:
            return
        workers = int(os.environ.get("SSMKIT_NVRTC_WORKERS", 0)) or (os.cpu_count() or 1)
        self.workers = max(1, min(workers, len(jobs)))
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        # Largest programs first, so the long ones start at once and the small ones fill in.
        for f, arch in sorted(jobs, key=lambda j: (-len(self.names[j[0]]), j)):
            self.futures[(f, arch)] = self.pool.submit(_compile_job, f, self.names[f], arch, self.extra[f])

    def result(self, file: str, arch: int):
        if self.pool is None:          # under pytest-xdist: each worker compiles its own tests' programs
            res = _compile_job(file, self.names[file], arch, self.extra[file])
        else:
            res = self.futures[(file, arch)].result(timeout=1800)
        self.done[(file, arch)] = res
        return res

    def close(self) -> list[str]:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        wall = time.perf_counter() - self.t0
        n = sum(r[1] for r in self.done.values())
        per_arch = ", ".join(
            f"sm_{a}: {sum(r[1] for (f, b), r in self.done.items() if b == a)} in "
            f"{sum(r[2] for (f, b), r in self.done.items() if b == a):.1f} s CPU" for a in ARCHS)
        files = sorted({f for f, _ in self.done})
        per_file = ", ".join(f"{f} " + "/".join(f"{self.done[(f, a)][2]:.0f}" if (f, a) in self.done else "-"
                                                for a in ARCHS) for f in files)
        return [f"NVRTC: compiled {n} kernel instantiations in {len(self.done)} programs "
                f"({per_arch}) in {wall:.1f} s wall on {self.workers} worker(s)",
                f"NVRTC seconds per program ({' / '.join(f'sm_{a}' for a in ARCHS)}): {per_file}"]


@pytest.fixture(scope="module")
def programs(request):
    pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings + nvidia-cuda-nvrtc (the test extra)")
    # Only the programs whose tests were selected (``-k``), all submitted now so they run in parallel.
    selected = [(it.callspec.params["file"], it.callspec.params["arch"]) for it in request.session.items
                if getattr(it, "originalname", None) == "test_every_instantiation_compiles"]
    # Under pytest-xdist the scheduler already spreads the tests: no pool of our own there.
    progs = _Programs(selected or _jobs(), parallel="PYTEST_XDIST_WORKER" not in os.environ)
    yield progs
    lines = progs.close()
    summary = getattr(request.config, "ssmkit_summary", None)
    if summary is not None:
        summary.extend(lines)         # printed by conftest at the end of the run
    else:
        print("\n" + "\n".join(lines))


# ---- tests ----------------------------------------------------------------------------------

def test_registry_lists_every_op():
    from ssmkit._registry import ops

    assert set(ops()) >= {"linear_scan", "selective_scan", "reduce_partials", "causal_conv1d",
                          "selective_state_update"}
    assert all(_names_by_file().values())


def test_every_params_mirror_is_checked():
    """Each Params mirror's C struct is found in at least one compiled file (its asserts ride along)."""
    params = _all_params()
    assert params, "no Params mirrors found in ssmkit.ops"
    checked = {p.c_name for ps in _params_by_file().values() for p in ps}
    missing = sorted(p.c_name for p in params if p.c_name not in checked)
    assert not missing, f"no compiled kernel file defines the C struct of {missing}"


@pytest.mark.parametrize("file,arch", _jobs(),
                         ids=[f"{f.rsplit('.', 1)[0]}-sm{a}" for f, a in _jobs()])
def test_every_instantiation_compiles(programs, file, arch):
    names = _names_by_file()[file]
    cubin_bytes, n_lowered, seconds, log = programs.result(file, arch)
    ops = ", ".join(_ops_by_file()[file])
    assert n_lowered == len(names), f"{file} ({ops}) sm_{arch}: {n_lowered} lowered names for {len(names)}"
    assert cubin_bytes > 0
    print(f"{file} ({ops}) sm_{arch}: {len(names)} instantiations, {cubin_bytes} B cubin, {seconds:.1f} s")

"""The compile/load machinery (``ssmkit._compile``, ``_launch``, ``_warmup``).

CPU tests: the sources hash that keys CuPy's disk cache, the compile options, the cache-folder
probe, ``warmup``'s progress bar and the launch limit checks (``get_kernel`` stubbed: no GPU).
GPU tests: a read-only or corrupted disk cache never breaks a call (fresh subprocesses, so
nothing is loaded yet), and the loader logs each compile with its time.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ssmkit
import ssmkit._compile as comp
import ssmkit._launch as launch_mod
import ssmkit._layout as layout
from ssmkit._compile import KernelRef
from ssmkit._registry import variants

REPO = Path(__file__).resolve().parents[1]


# ---- sources hash and compile options --------------------------------------------------------

@pytest.fixture
def kernels_copy(tmp_path, monkeypatch):
    """A private copy of kernels_cu/ that the loader reads instead of the real one."""
    src = layout.kernels_dir()
    dst = tmp_path / "kernels_cu"
    shutil.copytree(src, dst)
    comp.sources_hash.cache_clear()
    comp.read_source.cache_clear()
    monkeypatch.setattr(layout, "kernels_dir", lambda: dst)
    monkeypatch.setattr(comp, "kernels_dir", lambda: dst)
    yield dst
    monkeypatch.undo()
    comp.sources_hash.cache_clear()
    comp.read_source.cache_clear()


def _fresh_hash() -> str:
    comp.sources_hash.cache_clear()
    return comp.sources_hash()


def test_sources_hash_changes_with_every_file(kernels_copy):
    base = _fresh_hash()
    assert len(base) == 16 and int(base, 16) >= 0
    files = sorted(p for p in kernels_copy.iterdir() if p.suffix in (".cu", ".cuh"))
    assert {"common.cuh", "scan.cuh", "linear_scan.cu"} <= {p.name for p in files}
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original + b"\n// edited\n")
        assert _fresh_hash() != base, f"editing {path.name} did not change the sources hash"
        path.write_bytes(original)
        assert _fresh_hash() == base


def test_sources_hash_sees_new_and_renamed_headers_only(kernels_copy):
    base = _fresh_hash()
    (kernels_copy / "notes.txt").write_text("not a source file")
    assert _fresh_hash() == base
    (kernels_copy / "extra.cuh").write_text("// new header\n")
    assert _fresh_hash() != base
    (kernels_copy / "extra.cuh").rename(kernels_copy / "extra2.cuh")
    renamed = _fresh_hash()
    assert renamed != base
    (kernels_copy / "extra2.cuh").unlink()
    assert _fresh_hash() == base


def test_compile_options_carry_hash_and_include_dir(kernels_copy, monkeypatch):
    monkeypatch.delenv("SSMKIT_NVRTC_OPTIONS", raising=False)
    opts = comp.compile_options()
    h = _fresh_hash()
    assert "--std=c++17" in opts
    assert f"-I{kernels_copy}" in opts
    assert f"-DSSMKIT_SOURCES_HASH=0x{h}ull" in opts
    assert not any(o.startswith("-arch") or o.startswith("--gpu-architecture") for o in opts)
    (kernels_copy / "common.cuh").write_text((kernels_copy / "common.cuh").read_text() + "\n// x\n")
    comp.sources_hash.cache_clear()
    assert f"-DSSMKIT_SOURCES_HASH=0x{h}ull" not in comp.compile_options()


def test_compile_options_extra_from_env(monkeypatch):
    monkeypatch.setenv("SSMKIT_NVRTC_OPTIONS", "-DFOO=1  -DBAR=2")
    opts = comp.compile_options()
    assert opts[-2:] == ("-DFOO=1", "-DBAR=2")


def test_real_kernels_dir_is_used_by_default():
    kd = layout.kernels_dir()
    assert (kd / "common.cuh").is_file()
    assert comp.read_source("linear_scan.cu") == (kd / "linear_scan.cu").read_text()


# ---- cache folder probe ----------------------------------------------------------------------

def test_cache_dir_writable_for_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "not" / "yet" / "there"))
    assert comp._cache_dir_writable()


def test_cache_dir_under_a_file_is_not_writable(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocker / "kernel_cache"))
    assert not comp._cache_dir_writable()


def test_cache_dir_read_only_folder(tmp_path, monkeypatch):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root, so a read-only folder is writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        monkeypatch.setenv("CUPY_CACHE_DIR", str(ro / "kernel_cache"))
        assert not comp._cache_dir_writable()
    finally:
        ro.chmod(0o755)


# ---- warmup progress bar (get_kernel stubbed) ------------------------------------------------

def test_warmup_draws_a_progress_bar(monkeypatch, capsys):
    import ssmkit._warmup as wu

    seen = []
    monkeypatch.setattr(wu, "get_kernel", lambda ref: seen.append(ref))
    times = ssmkit.warmup("linear_scan")
    refs = variants("linear_scan")
    assert seen == refs
    assert isinstance(times, dict) and set(times) == {str(r) for r in refs}
    assert all(isinstance(t, float) and t >= 0 for t in times.values())
    err = capsys.readouterr().err
    assert "ssmkit warmup" in err and "[" in err and f"{len(refs)}/{len(refs)}" in err


def test_warmup_filters_explicit_list_and_quiet(monkeypatch, capsys):
    import ssmkit._warmup as wu

    seen = []
    monkeypatch.setattr(wu, "get_kernel", lambda ref: seen.append(ref))
    ssmkit.warmup(["linear_scan", "reduce_partials"], progress_bar=False)
    assert seen == variants("linear_scan") + variants("reduce_partials")
    assert capsys.readouterr().err == ""
    seen.clear()
    times = ssmkit.warmup("linear_scan", dtype="float32")
    assert seen == variants("linear_scan", dtype="float32") and len(times) == len(seen) >= 1
    seen.clear()
    one = [KernelRef("linear_scan.cu", "ssm::linear_scan<float>")]
    assert list(ssmkit.warmup(kernels=one, progress_bar=False)) == [str(one[0])] and seen == one


# ---- launch limit checks (get_kernel stubbed) ------------------------------------------------

class _StubKernel:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


@pytest.fixture
def stub_kernel(monkeypatch):
    pytest.importorskip("cupy")  # prepare() imports it (no device needed)
    k = _StubKernel()
    monkeypatch.setattr(launch_mod, "get_kernel", lambda ref: k)
    return k


REF = KernelRef("linear_scan.cu", "ssm::linear_scan<float>")


@pytest.mark.parametrize("block", [(1025,), (32, 33), (8, 8, 17), (0,), (32, 0)])
def test_prepare_rejects_bad_blocks(stub_kernel, block):
    with pytest.raises(ValueError, match="block"):
        launch_mod.prepare(REF, grid=(1,), block=block)


@pytest.mark.parametrize("grid", [(1, 65536), (1, 1, 65536), (2**31,), (0,), (4, 0)])
def test_prepare_rejects_bad_grids(stub_kernel, grid):
    with pytest.raises(ValueError, match="grid"):
        launch_mod.prepare(REF, grid=grid, block=(128,))


def test_prepare_rejects_bad_dims(stub_kernel):
    with pytest.raises(ValueError, match="1 to 3"):
        launch_mod.prepare(REF, grid=(1, 1, 1, 1), block=(32,))


def test_prepare_and_launch_at_the_limits(stub_kernel):
    p = launch_mod.prepare(REF, grid=(2**31 - 1, 65535, 65535), block=(32, 32))
    assert p.grid == (2**31 - 1, 65535, 65535) and p.block == (32, 32, 1) and p.shared_mem == 0
    launch_mod.launch(REF, grid=7, block=(256,), args=("x",))
    assert stub_kernel.calls == [((7, 1, 1), (256, 1, 1), ("x",), 0)]


# ---- GPU: the disk cache never breaks a call -------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    import numpy as np, cupy, ssmkit
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, (3, 5, 37)).astype(np.float32)
    b = rng.standard_normal((3, 5, 37)).astype(np.float32)
    want = ssmkit.linear_scan(a.astype(np.float64), b.astype(np.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ssmkit.linear_scan(cupy.asarray(a), cupy.asarray(b)).get()
    err = float(np.max(np.abs(got - want)))
    assert np.all(np.isfinite(got)) and err < 1e-4, err
    for w in caught:
        print("WARNING:", w.category.__name__, w.message)
    print("OK", err)
""")


def _run_fresh(cache_dir: str, prelude: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir)
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", prelude + _SCRIPT], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _root_writes_anyway(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.mark.gpu
def test_read_only_cache_dir_warns_and_compiles_in_memory(tmp_path):
    # An existing folder (CuPy itself creates CUPY_CACHE_DIR when it imports, and fails to import
    # when it cannot), made read-only. Root ignores permission bits: there the subprocess is told
    # the folder is not writable (os.access for that folder only), so ssmkit's side is what runs.
    ro = tmp_path / "kernel_cache"
    ro.mkdir()
    ro.chmod(0o555)
    prelude = ""
    try:
        if _root_writes_anyway(ro):
            prelude = textwrap.dedent(f"""
                import os
                _access = os.access
                def _ro_access(path, mode, *args, **kwargs):
                    if os.path.abspath(path) == {str(ro)!r} and mode & os.W_OK:
                        return False
                    return _access(path, mode, *args, **kwargs)
                os.access = _ro_access
            """)
        proc = _run_fresh(str(ro), prelude)
    finally:
        ro.chmod(0o755)
    assert "RuntimeWarning" in proc.stdout and "in memory" in proc.stdout, proc.stdout
    assert not any(ro.iterdir()), f"wrote into the read-only cache folder: {list(ro.iterdir())}"


@pytest.mark.gpu
def test_corrupted_cache_entries_are_recompiled(tmp_path):
    cache = tmp_path / "kernel_cache"
    _run_fresh(str(cache))
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files, "the first process wrote nothing into CUPY_CACHE_DIR"
    for p in files:
        p.write_bytes(os.urandom(max(64, p.stat().st_size // 2)))
    _run_fresh(str(cache))                 # correct results despite garbage in every entry
    _run_fresh(str(cache))                 # and whatever the second process rewrote is loadable


@pytest.mark.gpu
def test_loader_logs_compile_time(caplog):
    comp.clear_process_cache()
    ref = ssmkit.ops.linear_scan.kernel_ref("float32")
    with caplog.at_level(logging.DEBUG, logger="ssmkit.compile"):
        comp.get_kernel(ref)
        comp.get_kernel(ref)               # the second lookup is a dict hit: no second record
    recs = [r for r in caplog.records if r.name == "ssmkit.compile" and str(ref) in r.getMessage()]
    assert len(recs) == 1 and recs[0].levelno == logging.DEBUG
    assert " s" in recs[0].getMessage() and any(ch.isdigit() for ch in recs[0].getMessage())


@pytest.mark.gpu
def test_gpu_raw_launch_matches_cupy_launch(monkeypatch):
    """The direct cuLaunchKernel path and CuPy's launch give bitwise-equal results (selective scan
    forward and backward with its fold launch, conv forward, backward and decode update)."""
    import cupy
    import numpy as np

    rng = cupy.random.default_rng(3)
    B, D, L, N, W = 2, 24, 600, 8, 4
    u, dl, z = (rng.standard_normal((B, D, L), dtype=cupy.float32) for _ in range(3))
    dl = cupy.abs(dl) * 0.3
    A = -cupy.exp(rng.standard_normal((D, N), dtype=cupy.float32))
    Bm, Cm = rng.standard_normal((B, N, L), dtype=cupy.float32), rng.standard_normal((B, N, L), dtype=cupy.float32)
    x, w, b = rng.standard_normal((B, D, L), dtype=cupy.float32), rng.standard_normal((D, W), dtype=cupy.float32), \
        rng.standard_normal((D,), dtype=cupy.float32)
    dout = rng.standard_normal((B, D, L), dtype=cupy.float32)
    state = rng.standard_normal((B, D, W - 1), dtype=cupy.float32)
    xt = rng.standard_normal((B, D), dtype=cupy.float32)

    def run():
        o, last, saved = ssmkit.selective_scan_fwd(u, dl, A, Bm, Cm, z=z, delta_softplus=True)
        g = ssmkit.selective_scan_bwd(dout, u, dl, A, Bm, Cm, z=z, delta_softplus=True, saved=saved,
                                      deterministic=True)
        co = ssmkit.causal_conv1d(x, w, b, "silu")
        cg = ssmkit.causal_conv1d_bwd(x, w, b, dout, activation="silu")
        st = state.copy()
        cu = ssmkit.causal_conv1d_update(xt, st, w, b, "silu")
        return [a for a in (o, last, *g, co, *cg, cu, st) if a is not None]

    monkeypatch.setattr(launch_mod, "RAW_LAUNCH", True)
    raw = run()
    monkeypatch.setattr(launch_mod, "RAW_LAUNCH", False)
    via_cupy = run()
    cupy.cuda.runtime.deviceSynchronize()
    for i, (a, c) in enumerate(zip(raw, via_cupy)):
        assert bool(cupy.isfinite(a).all()), i
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(c), err_msg=f"output {i}")


@pytest.mark.gpu
def test_gpu_raw_launch_from_a_fresh_thread():
    """A plan built on the main thread launches from a new thread (one that has made no CUDA call,
    so no context is current for the driver API) and gives the main thread's result."""
    import threading

    import cupy

    rng = cupy.random.default_rng(4)
    u, dl = rng.standard_normal((1, 8, 300), dtype=cupy.float32), cupy.full((1, 8, 300), 0.1, cupy.float32)
    A = -cupy.ones((8, 4), cupy.float32)
    Bm, Cm = rng.standard_normal((1, 4, 300), dtype=cupy.float32), rng.standard_normal((1, 4, 300), dtype=cupy.float32)
    want = ssmkit.selective_scan(u, dl, A, Bm, Cm)
    out = cupy.empty_like(u)
    errors = []

    def worker():
        try:
            ssmkit.selective_scan(u, dl, A, Bm, Cm, out=out)
            cupy.cuda.runtime.deviceSynchronize()
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors, errors
    assert bool((out == want).all())

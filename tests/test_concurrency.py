"""Concurrency (issue 13, item 4): threads, fork() and processes sharing a kernel cache.

CPU (CI): the compile lock builds a kernel once however many threads ask; the raw launcher's
lock keeps pack and launch together when threads share a plan; the cross-process build lock
excludes, times out, and falls back where file locks are unavailable; fork detection
(``ssmkit._fork``) with simulated and real forks, and through a multiprocessing 'fork' pool.

GPU: several Python threads, each on its own CUDA stream (CuPy streams, and torch streams
through ``ssmkit.torch``), give bitwise the serial results for the selective scan (forward and
deterministic backward), causal conv1d (forward, backward, update), the decode step and
layer_norm, starting from empty kernel and plan caches so that first use races too; a process
forked after GPU use raises ``ForkedCUDAError`` naming 'spawn' (NumPy inputs still work
there), one forked before any GPU use runs the kernels, a 'spawn' pool runs them; two
processes started together on an empty ``CUPY_CACHE_DIR`` both build and run the same variant.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import ssmkit
from ssmkit import _compile, _fork, _launch, _plan
from ssmkit._compile import KernelRef

from compare import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fork_state(monkeypatch):
    """Save and restore ssmkit._fork's module state around a test that changes it."""
    for name in ("FORKED", "_used_pid", "_parent", "_reason"):
        monkeypatch.setattr(_fork, name, getattr(_fork, name))
    monkeypatch.setattr(_fork, "FORKED", False)
    monkeypatch.setattr(_fork, "_used_pid", None)
    monkeypatch.setattr(_fork, "_parent", None)
    monkeypatch.setattr(_fork, "_reason", None)
    return _fork


# ================================================================== CPU: threads

def test_get_kernel_builds_each_variant_once_across_threads(monkeypatch, fork_state):
    """16 threads ask for two kernels at once: each is built exactly once (under the compile
    lock), every thread gets that one object, and a hit takes no lock."""
    built = []

    def slow_build(ref):
        built.append(ref)
        time.sleep(0.05)                 # a wide window for a second build to slip in
        return object()

    monkeypatch.setattr(_compile, "_kernels", {})
    monkeypatch.setattr(_compile, "_build", slow_build)
    monkeypatch.setattr(_compile, "_current_device", lambda cupy: 0)
    refs = [KernelRef("a.cu", "ssm::k<1>"), KernelRef("a.cu", "ssm::k<2>")]
    barrier = threading.Barrier(16)
    got = [None] * 16

    def work(i):
        barrier.wait()
        got[i] = _compile.get_kernel(refs[i % 2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, built)) == sorted(map(str, refs))
    for i in range(16):
        assert got[i] is got[i % 2]
    assert got[0] is not got[1]

    class NoLock:                         # a hit must not touch the lock
        def __enter__(self):
            raise AssertionError("the compile lock was taken on a cache hit")

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(_compile, "_lock", NoLock())
    assert _compile.get_kernel(refs[0]) is got[0]


def test_raw_launch_keeps_pack_and_launch_together():
    """Threads sharing one plan launch through one packed buffer: the lock must keep each
    thread's pack and its launch together. The fake driver reads the buffer only after a
    pause (as the driver copies arguments at launch), so an unlocked interleaving would show up
    as a launch carrying another thread's row; each launch must also carry its own thread's
    (thread-local) stream."""
    from ssmkit._params import Params

    params = Params("ssm::Fake", [("a", "int64_t"), ("b", "int64_t")])

    class Fn:
        ptr = 1

    class Kernel:
        kernel = Fn()

    prepared = _launch.Prepared(Kernel(), (1, 1, 1), (32, 1, 1), 0)
    raw = _launch._RawLaunch(prepared, params)
    seen = []
    local = threading.local()

    def fake_launch(fptr, gx, gy, gz, bx, by, bz, smem, stream, argv_addr, extra):
        time.sleep(0.0005)
        buf_addr = ctypes.cast(argv_addr, ctypes.POINTER(ctypes.c_void_p))[0]
        a, b = params.struct.unpack(ctypes.string_at(buf_addr, params.struct.size))
        seen.append((stream, a, b))

    class Stream:
        def __init__(self, ptr):
            self.ptr = ptr

    raw.launch = fake_launch
    raw.stream = lambda: local.stream
    barrier = threading.Barrier(8)

    def work(i):
        local.stream = Stream(1000 + i)
        barrier.wait()
        for j in range(40):
            raw([i, j])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 * 40
    assert all(stream == 1000 + a for stream, a, _ in seen), "a launch carried another thread's stream"
    for i in range(8):
        assert sorted(b for s, a, b in seen if a == i) == list(range(40)), f"thread {i}'s rows were mixed up"


def test_opt_in_cache_is_not_fooled_by_a_reused_id(monkeypatch):
    """The shared-memory opt-in is remembered per kernel object, not per id(): a new kernel that
    happens to get a freed kernel's id must still opt in."""
    calls = []

    class Kernel:
        def __init__(self):
            self.max_dynamic_shared_size_bytes = 0

        def __setattr__(self, name, value):
            calls.append((id(self), value))
            object.__setattr__(self, name, value)

    k1 = Kernel()
    calls.clear()
    import cupy

    monkeypatch.setattr(_launch, "_opted_in", {})
    monkeypatch.setattr(_launch, "get_kernel", lambda ref: current[0])
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(cupy.cuda.runtime, "deviceGetAttribute", lambda attr, dev: 227 * 1024)
    current = [k1]
    ref = KernelRef("x.cu", "k")
    _launch.prepare(ref, grid=(1,), block=(32,), shared_mem=64 * 1024)
    _launch.prepare(ref, grid=(1,), block=(32,), shared_mem=64 * 1024)
    assert calls == [(id(k1), 64 * 1024)]            # once per kernel
    k2 = Kernel()
    calls.clear()
    _launch._opted_in[(0, id(k2))] = _launch._opted_in.pop((0, id(k1)))   # k2 "reuses" k1's id
    current[0] = k2
    _launch.prepare(ref, grid=(1,), block=(32,), shared_mem=64 * 1024)
    assert calls == [(id(k2), 64 * 1024)]


def test_plan_cache_threads():
    """PlanCache under threads: puts and gets from many threads never raise, every get returns
    a plan put under that key or None, and the size bound holds."""
    cache = _plan.PlanCache(max_size=32)
    errors = []

    def work(i):
        try:
            for j in range(2000):
                key = (i, j % 50)
                cache.put(key, (i, j % 50))
                got = cache.get((i, (j * 7) % 50))
                assert got is None or got == (i, (j * 7) % 50)
                assert len(cache) <= 32
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ================================================================== CPU: processes and the build lock

_HOLD_LOCK = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from ssmkit._compile import interprocess_lock
    path, log, go = sys.argv[1], sys.argv[2], sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.005)
    for _ in range(3):
        with interprocess_lock(path) as locked:
            assert locked
            with open(log, "a") as f:
                f.write(f"enter {{os.getpid()}}\\n")
            time.sleep(0.03)
            with open(log, "a") as f:
                f.write(f"exit {{os.getpid()}}\\n")
""")


def test_interprocess_lock_excludes_across_processes(tmp_path):
    """Three processes take the build lock three times each, started together: the log shows
    only enter/exit pairs of one process, never an interleaving."""
    path, log, go = tmp_path / "locks" / "x.lock", tmp_path / "log", tmp_path / "go"
    script = _HOLD_LOCK.format(root=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(log), str(go)]) for _ in range(3)]
    time.sleep(0.3)
    go.write_text("")
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = log.read_text().split()
    events = list(zip(lines[0::2], lines[1::2]))
    assert len(events) == 18
    for (e1, p1), (e2, p2) in zip(events[0::2], events[1::2]):
        assert (e1, e2) == ("enter", "exit") and p1 == p2, events


def test_interprocess_lock_times_out_and_degrades(tmp_path, monkeypatch):
    import fcntl

    path = str(tmp_path / "locks" / "y.lock")
    with _compile.interprocess_lock(path) as locked:
        assert locked and os.path.exists(path)
        # A second open file description conflicts with this one's flock, as another process would.
        t0 = time.monotonic()
        with _compile.interprocess_lock(path, timeout=0.2) as again:
            assert again is False
        assert time.monotonic() - t0 >= 0.2
    with _compile.interprocess_lock(path, timeout=0.2) as again:   # released: free again
        assert again is True
    # A folder that cannot be made: no lock, no error.
    blocker = tmp_path / "file"
    blocker.write_text("")
    with _compile.interprocess_lock(str(blocker / "sub" / "z.lock")) as locked:
        assert locked is False
    # A file system without flock: no lock, no error.
    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with _compile.interprocess_lock(path) as locked:
        assert locked is False


def test_build_holds_the_variant_lock(tmp_path, monkeypatch):
    """The first build of a variant runs inside its file lock, whose name is one per variant,
    in the cache folder."""
    import fcntl

    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    ref = KernelRef("selective_scan_fwd.cu", "ssm::selective_scan_fwd<float, float, true, true, 16>")
    other = KernelRef("selective_scan_fwd.cu", "ssm::selective_scan_fwd<float, float, false, true, 16>")
    path = _compile.lock_path(ref)
    assert path.startswith(str(tmp_path / "cache" / _compile.LOCK_DIR))
    assert path == _compile.lock_path(ref) and path != _compile.lock_path(other)
    held = []

    def fake_load(r):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return "kernel"

    monkeypatch.setattr(_compile, "_load", fake_load)
    assert _compile._build(ref) == "kernel"
    assert held == [True]


# ================================================================== CPU: fork detection

def _simulate_child(parent_used: bool):
    if parent_used:
        _fork.note_gpu_use()
    _fork._after_fork_in_child()


def test_fork_child_of_a_gpu_parent_raises_naming_spawn(fork_state):
    _simulate_child(parent_used=True)
    assert _fork.FORKED
    for _ in range(2):                        # and again on the next call
        with pytest.raises(_fork.ForkedCUDAError, match="'spawn'") as info:
            _fork.check()
        assert "fork()" in str(info.value) and str(os.getppid()) in str(info.value)
    assert _fork.FORKED


def test_fork_child_probe(fork_state, monkeypatch):
    """Parent did not use the GPU through ssmkit: one probe decides. Status 3 (not initialised)
    means the parent initialised CUDA some other way; success clears the flag for good."""
    monkeypatch.setattr(_fork, "_torch_bad_fork", lambda: False)
    probes = []
    monkeypatch.setattr(_fork, "_probe_status", lambda: probes.append(1) or 3)
    _simulate_child(parent_used=False)
    with pytest.raises(_fork.ForkedCUDAError, match="initialization error"):
        _fork.check()
    fork_state._reason = None
    monkeypatch.setattr(_fork, "_probe_status", lambda: probes.append(1) or None)
    _simulate_child(parent_used=False)
    _fork.check()
    assert not _fork.FORKED and _fork._used_pid == os.getpid()
    _fork.check()                             # cleared: no second probe
    assert len(probes) == 2
    _simulate_child(parent_used=False)       # a grandchild of the child that used the GPU
    with pytest.raises(_fork.ForkedCUDAError, match="ran ssmkit's GPU kernels"):
        _fork.check()
    fork_state._used_pid = None
    monkeypatch.setattr(_fork, "_probe_status", lambda: 35)    # another CUDA error: not ours to explain
    _simulate_child(parent_used=False)
    _fork.check()
    assert not _fork.FORKED


def test_fork_child_torch_bad_fork(fork_state, monkeypatch):
    monkeypatch.setattr(_fork, "_torch_bad_fork", lambda: True)
    monkeypatch.setattr(_fork, "_probe_status", lambda: pytest.fail("no CUDA call once torch says bad fork"))
    _simulate_child(parent_used=False)
    with pytest.raises(_fork.ForkedCUDAError, match="torch initialised CUDA"):
        _fork.check()


def test_fork_explain(fork_state):
    class Err(Exception):
        def __init__(self, status):
            self.status = status

    _fork.explain(Err(3))                     # not a forked child: nothing to explain
    _simulate_child(parent_used=False)
    _fork.explain(Err(35))
    with pytest.raises(_fork.ForkedCUDAError, match="'spawn'") as info:
        _fork.explain(Err(3))
    assert isinstance(info.value.__cause__, Err)


class _FakeCupyArray:
    """Stands in for cupy.ndarray in layout_key (shape, strides, dtype, data.ptr, data.device_id)."""

    class _Mem:
        ptr = 4096
        device_id = 0

    shape, strides, dtype = (2, 3), (24, 8), np.dtype(np.float64)
    data = _Mem()


def _in_forked_child(fn) -> str:
    """Run ``fn`` in a child made by os.fork(); returns what it wrote ("ok" or an error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # pragma: no cover - the child
        os.close(r)
        try:
            msg = fn()
        except BaseException as exc:
            msg = f"unexpected {type(exc).__name__}: {exc}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_real_fork_after_gpu_use(fork_state, monkeypatch):
    """A real os.fork() after (simulated) GPU use: in the child every GPU entry point raises
    ForkedCUDAError before any CUDA call, and the NumPy path still works."""
    _fork.note_gpu_use()
    monkeypatch.setattr(_plan, "_cupy_ndarray", _FakeCupyArray)
    monkeypatch.setattr(_compile, "_current_device",
                        lambda cupy: pytest.fail("get_kernel made a CUDA call in a forked child"))

    def child():
        from ssmkit import _arrays

        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((2, 3, 9)), rng.standard_normal((3, 4))
        out = ssmkit.causal_conv1d(x, w, activation="silu")           # CPU path: fine
        assert out.shape == (2, 3, 9)
        failures = []
        for what, call in (
                ("layout_key", lambda: _plan.layout_key([_FakeCupyArray()], ())),
                ("get_kernel", lambda: _compile.get_kernel(KernelRef("linear_scan.cu", "ssm::linear_scan<float>"))),
                ("backend_of", lambda: _arrays.backend_of("op", {"x": type("A", (), {"__module__": "cupy.x"})()}))):
            try:
                call()
                failures.append(f"{what}: no error")
            except _fork.ForkedCUDAError as exc:
                if "'spawn'" not in str(exc):
                    failures.append(f"{what}: {exc}")
        return "ok" if not failures else "; ".join(failures)

    assert _in_forked_child(child) == "ok"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_real_fork_before_gpu_use(fork_state, monkeypatch):
    """Forked before any GPU use: the child's check probes once and, CUDA being usable (the
    probe stubbed here: no GPU on CI), lets the call through."""
    monkeypatch.setattr(_fork, "_probe_status", lambda: None)
    monkeypatch.setattr(_fork, "_torch_bad_fork", lambda: False)

    def child():
        assert _fork.FORKED
        _fork.check()
        return "ok" if not _fork.FORKED else "still flagged"

    assert _in_forked_child(child) == "ok"


def _pool_worker(_):
    from ssmkit import _fork as f

    f.check()
    return "no error"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_fork_pool_error_reaches_the_parent(fork_state):
    """A multiprocessing 'fork' pool started after GPU use: the worker's ForkedCUDAError comes
    back to the parent (picklable), naming 'spawn'."""
    _fork.note_gpu_use()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        with pytest.raises(_fork.ForkedCUDAError, match="'spawn'"):
            pool.map(_pool_worker, [0])


# ================================================================== GPU helpers

def _clear_all_caches():
    """Empty every kernel and plan cache, so that the next calls are first uses."""
    from ssmkit.ops import causal_conv1d as conv, layer_norm as ln, selective_scan as ss
    from ssmkit.ops import selective_state_update as ssu

    _compile.clear_process_cache()
    for cache in (ss._FWD_PLANS, ss._BWD_PLANS, conv._FWD_PLANS, conv._BWD_PLANS, conv._UPDATE_PLANS,
                  ssu._CACHE, ln._FWD_PLANS, ln._BWD_PLANS):
        cache.clear()


def _problems(seed: int):
    """Host inputs (float32) for one instance of every op; same shapes for every seed (so the
    instances share plans), different values."""
    rng = np.random.default_rng(seed)
    f = np.float32
    B, D, L, N, W = 2, 96, 1536, 16, 4
    n = lambda *s: rng.standard_normal(s).astype(f)   # noqa: E731
    return {
        "scan": dict(u=n(B, D, L), delta=rng.uniform(-3, 0.5, (B, D, L)).astype(f),
                     A=-rng.uniform(0.5, 2, (D, N)).astype(f),
                     B=n(B, 1, N, L), C=n(B, 1, N, L), D=n(D), z=n(B, D, L), delta_bias=n(D) * 0.1, dout=n(B, D, L)),
        "conv": dict(x=n(B, D, L), weight=n(D, W), bias=n(D), dout=n(B, D, L)),
        "conv_update": dict(x=n(64, 512), state=n(64, 512, W - 1), weight=n(512, W), bias=n(512)),
        "ssu": dict(state=n(64, 512, N), x=n(64, 512), dt=n(64, 512), A=-rng.uniform(0.5, 2, (512, N)).astype(f),
                    B=n(64, N), C=n(64, N), D=n(512), z=n(64, 512), dt_bias=n(512) * 0.1),
        "ln": dict(x=n(256, 1024), residual=n(256, 1024), weight=n(1024), bias=n(1024), dout=n(256, 1024)),
    }


def _run_cupy_ops(p: dict) -> dict:
    """Every op on one instance (device inputs), on the current CuPy stream; host results."""
    import cupy

    s = p["scan"]
    args = [s[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=s["D"], z=s["z"], delta_bias=s["delta_bias"], delta_softplus=True)
    out = {}
    out["scan_out"] = ssmkit.selective_scan(*args, **kw)
    o, last, saved = ssmkit.selective_scan_fwd(*args, **kw)
    out["scan_train_out"], out["scan_last"] = o, last
    for name, g in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"),
                       ssmkit.selective_scan_bwd(s["dout"], *args, saved=saved, deterministic=True, **kw)):
        out["scan_" + name] = g
    c = p["conv"]
    out["conv_out"] = ssmkit.causal_conv1d(c["x"], c["weight"], c["bias"], activation="silu")
    for name, g in zip(("dx", "dweight", "dbias"),
                       ssmkit.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], c["dout"], activation="silu")[:3]):
        out["conv_" + name] = g
    u = p["conv_update"]
    state = u["state"].copy()                               # in place: a fresh copy per call
    out["update_out"] = ssmkit.causal_conv1d_update(u["x"], state, u["weight"], u["bias"], activation="silu")
    out["update_state"] = state
    q = p["ssu"]
    st = q["state"].copy()
    out["ssu_out"] = ssmkit.selective_state_update(st, q["x"], q["dt"], q["A"], q["B"], q["C"], D=q["D"], z=q["z"],
                                                   dt_bias=q["dt_bias"], dt_softplus=True)
    out["ssu_state"] = st
    n = p["ln"]
    y, rout, mean, rstd = ssmkit.layer_norm_fwd(n["x"], n["weight"], n["bias"], residual=n["residual"])
    out["ln_y"], out["ln_rout"] = y, rout
    for name, g in zip(("dx", "dweight", "dbias"),
                       ssmkit.layer_norm_bwd(n["dout"], rout, n["weight"], n["bias"], mean, rstd,
                                             has_residual=True)[:3]):
        out["ln_" + name] = g
    cupy.cuda.get_current_stream().synchronize()
    return {k: cupy.asnumpy(v) for k, v in out.items()}


def _to_device(p: dict) -> dict:
    import cupy

    return {op: {k: cupy.asarray(v) for k, v in d.items()} for op, d in p.items()}


def _assert_same(name, got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, f"{name} {k}"
        if not np.array_equal(got[k], want[k], equal_nan=True):
            bad = np.argwhere(got[k] != want[k])[:3]
            raise AssertionError(f"{name}: {k} differs from the serial result at {bad.tolist()}")


# ================================================================== GPU: threads and streams

N_THREADS = 6
ROUNDS = 3


@pytest.mark.gpu
def test_gpu_threads_on_cupy_streams_match_serial():
    """N_THREADS threads, each on its own non-blocking CuPy stream, run every op on their own
    instances (same shapes: the plans are shared) ROUNDS times, starting together from empty
    kernel and plan caches: every result equals the serial one bit for bit."""
    import cupy

    hosts = [_problems(seed) for seed in range(N_THREADS)]
    devs = [_to_device(p) for p in hosts]
    cupy.cuda.Device().synchronize()
    serial = [_run_cupy_ops(d) for d in devs]
    # the serial results are right, not just repeatable (one spot check per op family)
    from ssmkit.reference import selective_scan as ref_scan

    s = hosts[0]["scan"]
    want = ref_scan(*(s[k].astype(np.float64) for k in ("u", "delta", "A", "B", "C")), D=s["D"], z=s["z"],
                    delta_bias=s["delta_bias"], delta_softplus=True)
    assert_close("scan_out", serial[0]["scan_out"], want, "float32")

    _clear_all_caches()
    results = [[None] * ROUNDS for _ in range(N_THREADS)]
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def work(i):
        try:
            with cupy.cuda.Stream(non_blocking=True):
                barrier.wait()
                for r in range(ROUNDS):
                    results[i][r] = _run_cupy_ops(devs[(i + r) % N_THREADS])
        except BaseException as exc:
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(N_THREADS):
        for r in range(ROUNDS):
            _assert_same(f"thread {i} round {r}", results[i][r], serial[(i + r) % N_THREADS])


def _run_torch_ops(p: dict) -> dict:
    """The ssmkit.torch ops on one instance (CUDA tensors), on torch's current stream, with
    autograd for the differentiable ones; host results."""
    import torch

    import ssmkit.torch as st

    dev = "cuda"
    t = lambda a, grad=False: torch.tensor(a, device=dev, requires_grad=grad)   # noqa: E731
    out = {}
    s = p["scan"]
    ins = [t(s[k], True) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y = st.selective_scan_fn(*ins[:5], D=ins[5], z=ins[6], delta_bias=ins[7], delta_softplus=True)
    grads = torch.autograd.grad(y, ins, t(s["dout"]))
    out["scan_out"] = y
    for name, g in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"), grads):
        out["scan_" + name] = g
    c = p["conv"]
    ins = [t(c[k], True) for k in ("x", "weight", "bias")]
    y = st.causal_conv1d_fn(*ins, activation="silu")
    out["conv_out"] = y
    for name, g in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, ins, t(c["dout"]))):
        out["conv_" + name] = g
    u = p["conv_update"]
    state = t(u["state"])
    out["update_out"] = st.causal_conv1d_update(t(u["x"]), state, t(u["weight"]), t(u["bias"]), activation="silu")
    out["update_state"] = state
    q = p["ssu"]
    sts = t(q["state"])
    out["ssu_out"] = st.selective_state_update(sts, *(t(q[k]) for k in ("x", "dt", "A", "B", "C")), D=t(q["D"]),
                                               z=t(q["z"]), dt_bias=t(q["dt_bias"]), dt_softplus=True)
    out["ssu_state"] = sts
    n = p["ln"]
    ins = [t(n[k], True) for k in ("x", "weight", "bias", "residual")]
    y = st.layer_norm_fn(ins[0], ins[1], ins[2], residual=ins[3])
    out["ln_y"] = y
    for name, g in zip(("dx", "dweight", "dbias", "dresidual"), torch.autograd.grad(y, ins, t(n["dout"]))):
        out["ln_" + name] = g
    torch.cuda.current_stream().synchronize()
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


@pytest.mark.gpu
def test_gpu_threads_on_torch_streams_match_serial():
    """The same through ssmkit.torch: threads each under ``torch.cuda.stream`` of their own
    stream (the bridge wraps torch's current stream per thread, allocates from torch's caching
    allocator with the thread's stream), from empty caches, with autograd backward in every
    thread: bitwise the serial results (deterministic algorithms on, so the scan backward sums
    dB/dC in a fixed order)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    hosts = [_problems(seed) for seed in range(N_THREADS)]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        serial = [_run_torch_ops(p) for p in hosts]
        _clear_all_caches()
        results = [[None] * ROUNDS for _ in range(N_THREADS)]
        errors = []
        barrier = threading.Barrier(N_THREADS)

        def work(i):
            try:
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    barrier.wait()
                    for r in range(ROUNDS):
                        results[i][r] = _run_torch_ops(hosts[(i + r) % N_THREADS])
            except BaseException as exc:
                errors.append((i, exc))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert not errors, errors
    for i in range(N_THREADS):
        for r in range(ROUNDS):
            _assert_same(f"torch thread {i} round {r}", results[i][r], serial[(i + r) % N_THREADS])


# ================================================================== GPU: fork and spawn

_GPU_SCRIPT_HEAD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import numpy as np
    import ssmkit
    from ssmkit import _fork
    from ssmkit.reference import causal_conv1d as ref
    from compare import assert_close
    rng = np.random.default_rng(0)
    xh, wh = rng.standard_normal((2, 64, 300)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)

    def gpu_conv_checked():
        import cupy
        x, w = cupy.asarray(xh), cupy.asarray(wh)
        out = ssmkit.causal_conv1d(x, w, activation="silu")
        assert_close("out", out, ref(xh.astype(np.float64), wh.astype(np.float64), activation="silu"), "float32")
        return x, w
""")


def _script(tmp_path, body: str, name: str = "script.py") -> str:
    """A script file (not ``python -c``: a 'spawn' child re-imports its main module by path)."""
    path = tmp_path / name
    path.write_text(_GPU_SCRIPT_HEAD.format(root=ROOT, tests=os.path.join(ROOT, "tests")) + textwrap.dedent(body))
    return str(path)


def _run_script(tmp_path, body: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, _script(tmp_path, body)], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_gpu_fork_after_use_raises_clearly(tmp_path):
    """A process that ran a kernel forks: in the child the op (on the parent's arrays) raises
    ForkedCUDAError naming 'spawn' -- not a CUDA error -- and the NumPy path still works; the
    parent keeps working after the fork."""
    res = _run_script(tmp_path, """
        x, w = gpu_conv_checked()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ssmkit.causal_conv1d(x, w, activation="silu")
                code = 2
            except _fork.ForkedCUDAError as exc:
                code = 0 if "'spawn'" in str(exc) else 3
            except BaseException as exc:
                print("child:", type(exc).__name__, exc)
                code = 4
            if code == 0:
                try:
                    ssmkit.selective_scan(x, x, w, w, w)     # another entry point (layout_key)
                    code = 5
                except _fork.ForkedCUDAError:
                    pass
                except BaseException as exc:
                    print("child scan:", type(exc).__name__, exc)
                    code = 6
            out = ssmkit.causal_conv1d(xh, wh, activation="silu")      # NumPy: the reference, fine
            code = code or (0 if out.shape == xh.shape else 7)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
        gpu_conv_checked()                                   # the parent is unaffected
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_gpu_fork_after_cupy_only_use_raises_clearly(tmp_path):
    """The parent initialised CUDA through CuPy alone (no ssmkit kernel), then forked: the
    child's first ssmkit GPU call probes once and raises ForkedCUDAError, not a CUDA error."""
    res = _run_script(tmp_path, """
        import cupy
        x, w = cupy.asarray(xh), cupy.asarray(wh)            # CUDA initialised by CuPy only
        cupy.cuda.Device().synchronize()
        pid = os.fork()
        if pid == 0:
            try:
                ssmkit.causal_conv1d(x, w, activation="silu")
                os._exit(2)
            except _fork.ForkedCUDAError as exc:
                os._exit(0 if "'spawn'" in str(exc) else 3)
            except BaseException as exc:
                print("child:", type(exc).__name__, exc, flush=True)
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_gpu_fork_before_use_works(tmp_path):
    """Forked before the parent touched the GPU: the child runs the kernels (CUDA initialises
    there), and so does the parent afterwards."""
    res = _run_script(tmp_path, """
        pid = os.fork()
        if pid == 0:
            try:
                gpu_conv_checked()
                os._exit(0)
            except BaseException as exc:
                print("child:", type(exc).__name__, exc, flush=True)
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
        gpu_conv_checked()
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.gpu
def test_gpu_spawn_pool_after_use_works(tmp_path):
    """The remedy the error names: a 'spawn' pool started after GPU use runs the kernels."""
    res = _run_script(tmp_path, """
        import multiprocessing

        def job(seed):
            gpu_conv_checked()
            return seed

        if __name__ == "__main__":
            gpu_conv_checked()
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                assert pool.map(job, [0, 1]) == [0, 1]
            print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# ================================================================== GPU: two processes, one cache

_COMPILE_SCRIPT = """
    import time
    import cupy
    ready, go = sys.argv[1], sys.argv[2]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    t0 = time.perf_counter()
    gpu_conv_checked()
    print(f"ok {time.perf_counter() - t0:.2f}")
"""


@pytest.mark.gpu
def test_gpu_two_processes_compile_one_variant_into_one_cache(tmp_path):
    """Two processes started together on an empty CUPY_CACHE_DIR build and run the same
    variant: both succeed, the folder holds one entry for it (no temporary files left), and a
    third process runs from that entry."""
    cache = tmp_path / "cache"
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache))
    go = tmp_path / "go"
    script = _script(tmp_path, _COMPILE_SCRIPT)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in ready]
    deadline = time.monotonic() + 180
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.write_text("")                   # both are past their imports: they build at the same time
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("ok"), out + err
    files = sorted(os.listdir(cache))
    conv = [f for f in files if f.endswith(".cubin") and b"causal_conv1d" in (cache / f).read_bytes()]
    assert len(conv) == 1, files        # one variant (the channel-first fp32 forward), one entry
    assert not [f for f in files if f.startswith("tmp")], files
    assert os.listdir(cache / _compile.LOCK_DIR)
    third = subprocess.run([sys.executable, script, str(tmp_path / "ready2"), str(go)], capture_output=True,
                           text=True, env=env, timeout=300)
    assert third.returncode == 0 and third.stdout.startswith("ok"), third.stdout + third.stderr
    assert sorted(os.listdir(cache)) == files

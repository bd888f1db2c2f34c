"""Shared benchmark machinery (see ../shared/BENCHMARKS.md): CUDA-event timing of whole Python
calls, CUDA-graph timing for launch-bound rows, anchors, table and JSON output."""
from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE / "anchors" / "h200.json"
HBM_RW = 4.283658399587476e12     # bytes/s, 4 GiB device copy, read + write counted (anchors "limits")
EXP2_PER_S = 4.106755618448573e12


def load_anchors() -> dict[str, float]:
    """{anchor row name: ms} from benchmarks/anchors/h200.json (empty if missing)."""
    if not ANCHORS.is_file():
        return {}
    data = json.loads(ANCHORS.read_text())
    return {r["name"]: r["ms"] for r in data.get("results", [])}


def time_cuda(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median ms of ``fn()`` as the user sees it: CUDA events around each Python call."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    times = []
    stream = cupy.cuda.get_current_stream()
    for _ in range(iters):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def time_graph(fn, calls_per_graph: int = 20, warmup: int = 3, iters: int = 20) -> float:
    """Median ms per ``fn()`` call replayed inside a captured CUDA graph."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # compile/load outside the capture
        stream.synchronize()
        stream.begin_capture()
        for _ in range(calls_per_graph):
            fn()
        graph = stream.end_capture()
        for _ in range(warmup):
            graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(iters):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / calls_per_graph)
    return statistics.median(times)


def bf16_dtype():
    """NumPy's bfloat16 dtype (ml_dtypes), as CuPy arrays use it."""
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16)


def randn(shape, dtype: str, scale: float = 1.0):
    """Random normal device array (never zeros); bf16 by truncating fp32 bits (no bf16 kernels)."""
    import cupy

    a = cupy.random.standard_normal(shape, dtype=cupy.float32)
    if scale != 1.0:
        a *= scale
    if dtype == "float32":
        return a
    if dtype == "bfloat16":
        return (a.view(cupy.uint32) >> 16).astype(cupy.uint16).view(bf16_dtype())
    return a.astype(dtype)


def device_copy_rate(nbytes: int = 1 << 30) -> float:
    """Bytes/s (read + write counted) of a device-to-device copy of ``nbytes`` on the current GPU,
    median of CUDA-event timings: the same-card limit a streaming kernel is held to. (HBM_RW is the
    H200's; on another card, e.g. the H100 the device tool also lends, fractions of it mislead.)"""
    import cupy

    src = cupy.empty(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    src.fill(1.0)
    ms = time_cuda(lambda: cupy.copyto(dst, src), warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3)


def hbm_fraction(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / HBM_RW


def row(name: str, ms: float, anchors: dict[str, float], nbytes: float | None = None,
        exps: float | None = None, **extra) -> dict:
    """One result row: ssmkit ms, anchor ms, ratio (anchor / ssmkit, higher is better), rates."""
    a = anchors.get(name)
    r = {"name": name, "ms": round(ms, 5), "anchor_ms": a,
         "ratio": round(a / ms, 3) if a else None}
    if nbytes is not None:
        r["GBps"] = round(nbytes / (ms * 1e-3) / 1e9, 1)
        r["hbm_frac"] = round(hbm_fraction(nbytes, ms), 3)
    if exps is not None:
        r["exp_frac"] = round(exps / (ms * 1e-3) / EXP2_PER_S, 3)
    r.update(extra)
    return r


def print_table(rows: list[dict]) -> None:
    hdr = f"{'row':48s} {'ssmkit ms':>10s} {'anchor ms':>10s} {'ratio':>7s} {'GB/s':>8s} {'HBM%':>6s} {'exp%':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        def f(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        hbm = r.get("hbm_frac")
        ex = r.get("exp_frac")
        print(f"{r['name']:48s} {f('ms', '10.4f')} {f('anchor_ms', '10.4f')} {f('ratio', '7.2f')} "
              f"{f('GBps', '8.1f')} {(format(100 * hbm, '6.1f') if hbm else '-'):>6s} "
              f"{(format(100 * ex, '6.1f') if ex else '-'):>6s}")


def environment() -> dict:
    info = {"python": platform.python_version()}
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        info.update({
            "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "driver": cupy.cuda.runtime.driverGetVersion(),
            "runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__,
            "nvrtc": ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
        })
        try:
            import subprocess

            info["driver_version"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            pass
    except Exception as exc:  # CPU-only machine
        info["gpu"] = f"none ({type(exc).__name__})"
    return info


def write_json(path: str | Path, rows: list[dict], meta: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": environment(), "meta": meta or {}, "results": rows}, indent=1))

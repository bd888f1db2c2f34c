"""``ssmkit bench``: the kernel benchmarks, JSON and a PNG.

With a GPU: runs ``benchmarks/bench_*.py`` (each in its own process, as
``benchmarks/run_gpu.sh`` does) into ``--out``, merges their JSON into ``bench.json`` and draws
``bench.png`` (matplotlib, optional: ``pip install "ssmkit[plot]"``) with the ratios against the
upstream timings (``benchmarks/anchors/h200.json``) and the fraction of the hardware limit each
row reaches (``benchmarks/plot_results.py``). The benchmarks ship with the source checkout, not
the wheel.

Without a GPU: times a few small rows of the CPU path (NumPy inputs run the float64 reference)
and says so; they have no upstream comparison and no hardware fraction, so no PNG.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import CLIError, gpu_status


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the kernel benchmarks (GPU; small CPU reference rows without one)",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    p.add_argument("--op", action="append", default=None, metavar="NAME",
                   help="a benchmark to run: benchmarks/bench_NAME.py (repeatable; default: all of them)")
    p.add_argument("--quick", action="store_true", help="fewer rows and iterations (scripts that offer --quick)")
    p.add_argument("--out", default="ssmkit_bench", help="folder for the JSON and PNG (default: ./ssmkit_bench)")
    p.add_argument("--no-png", action="store_true", help="write no PNG")
    p.add_argument("--cpu", action="store_true", help="time the CPU reference rows even when a GPU is present")
    p.add_argument("--bench-dir", default=None,
                   help="folder holding bench_*.py (default: benchmarks/ of the source checkout)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark script (default: none)")
    p.set_defaults(run=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def bench_dir(given: str | None) -> Path | None:
    """The folder with bench_*.py and common.py, or None (an installed wheel has none)."""
    from .._layout import REPO_ROOT

    path = Path(given) if given else REPO_ROOT / "benchmarks"
    return path if path.is_dir() and any(path.glob("bench_*.py")) else None


def scripts(folder: Path) -> dict[str, Path]:
    """{name: benchmarks/bench_<name>.py}."""
    return {p.stem[len("bench_"):]: p for p in sorted(folder.glob("bench_*.py"))}


def run(args, extra) -> int:
    out = Path(args.out)
    n_gpus, why = (0, "--cpu given") if args.cpu else gpu_status()
    folder = bench_dir(args.bench_dir)
    if n_gpus < 1:
        return run_cpu(out, why, folder, args)
    if folder is None:
        where = args.bench_dir or "benchmarks/ of the source checkout"
        raise CLIError(f"the kernel benchmarks (bench_*.py) are not here ({where}): they ship with the source "
                       "checkout, not the wheel; run from a clone, or pass --bench-dir")
    return run_gpu(out, folder, args)


# ---- GPU: the benchmark scripts ---------------------------------------------------------------

def run_gpu(out: Path, folder: Path, args) -> int:
    found = scripts(folder)
    names = args.op or list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise CLIError(f"no benchmark {', '.join(unknown)} in {folder}; there are: {', '.join(found)}", code=2)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(folder.resolve().parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    merged, failed = {}, []
    for name in names:
        script = found[name]
        cmd = [sys.executable, str(script), "--out", str(out)]
        if args.quick and '"--quick"' in script.read_text():
            cmd.append("--quick")
        print(f"== {script.name}{' --quick' if '--quick' in cmd else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, env=env, cwd=root, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"== {script.name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        result = out / f"{name}.json"
        if rc == 0 and result.is_file():
            merged[name] = json.loads(result.read_text())
        else:
            failed.append(name)
    merged_path = out / "bench.json"
    merged_path.write_text(json.dumps(merged, indent=1))
    print(f"wrote {merged_path} ({', '.join(merged) or 'no results'})")
    if not args.no_png and merged:
        write_png(merged_path, out / "bench.png", folder)
    if failed:
        raise CLIError(f"{len(failed)} benchmark(s) failed: {', '.join(failed)} (their output is above)")
    return 0


def write_png(results: Path, png: Path, folder: Path | None) -> bool:
    """Draw ``png`` from ``results`` with benchmarks/plot_results.py; say why not when it cannot."""
    if importlib.util.find_spec("matplotlib") is None:
        print('no PNG: matplotlib is not installed (pip install "ssmkit[plot]")')
        return False
    plotter = (folder / "plot_results.py") if folder is not None else None
    if plotter is None or not plotter.is_file():
        print(f"no PNG: {plotter or 'plot_results.py'} not found")
        return False
    spec = importlib.util.spec_from_file_location("_ssmkit_plot_results", plotter)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    drawn = mod.plot(mod.load_rows([results]), png, title=_title(results))
    print(f"wrote {png} ({drawn['ratio_rows']} ratio rows, {drawn['fraction_rows']} hardware-fraction rows)")
    return True


def _title(results: Path) -> str:
    gpu = None
    for section in json.loads(results.read_text()).values():
        if isinstance(section, dict):
            gpu = section.get("env", {}).get("gpu") or gpu
    return f"ssmkit vs upstream (anchors: H200){f'; this run: {gpu}' if gpu else ''}"


# ---- CPU: small rows of the reference path ------------------------------------------------------

CPU_NOTE = ("CPU rows: NumPy inputs run ssmkit's float64 reference, not the GPU kernels; these times "
            "say nothing about GPU performance and have no upstream comparison")


def _time_ms(fn, min_s: float = 0.2, max_reps: int = 50) -> float:
    """Median ms of ``fn()`` over repeats filling about ``min_s`` seconds (at least 3)."""
    fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_rows(quick: bool = False) -> list[dict]:
    import numpy as np

    import ssmkit

    rng = np.random.default_rng(0)
    f32 = np.float32

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    rows = []
    B, D, L, N = (1, 32, 128, 16) if quick else (1, 64, 512, 16)
    u, delta, z, dout = randn(B, D, L), np.abs(randn(B, D, L, scale=0.5)), randn(B, D, L), randn(B, D, L)
    A = -np.tile(np.arange(1, N + 1, dtype=f32), (D, 1))
    Bm, Cm, Dv = randn(B, N, L), randn(B, N, L), randn(D)
    kw = dict(D=Dv, z=z, delta_softplus=True)
    tag = f"b{B} d{D} l{L} n{N} fp32"
    rows.append(("selective_scan fwd " + tag, lambda: ssmkit.selective_scan(u, delta, A, Bm, Cm, **kw)))
    rows.append(("selective_scan bwd " + tag,
                 lambda: ssmkit.selective_scan_bwd(dout, u, delta, A, Bm, Cm, **kw)))
    W = 4
    x, w, b, cdout = randn(B, 4 * D, L), randn(4 * D, W, scale=0.5), randn(4 * D), randn(B, 4 * D, L)
    ctag = f"b{B} d{4 * D} l{L} w{W} fp32"
    rows.append(("causal_conv1d fwd " + ctag, lambda: ssmkit.causal_conv1d(x, w, b, activation="silu")))
    rows.append(("causal_conv1d bwd " + ctag, lambda: ssmkit.causal_conv1d_bwd(x, w, b, cdout, activation="silu")))
    Bd, Dd = 4, 4 * D
    state, xs, dts = randn(Bd, Dd, N), randn(Bd, Dd), np.abs(randn(Bd, Dd, scale=0.5))
    Ad, Bs, Cs = -np.abs(randn(Dd, N)), randn(Bd, N), randn(Bd, N)
    rows.append((f"selective_state_update b{Bd} d{Dd} n{N} fp32",
                 lambda: ssmkit.selective_state_update(state, xs, dts, Ad, Bs, Cs, dt_softplus=True)))
    cstate = randn(Bd, Dd, W)
    rows.append((f"causal_conv1d_update b{Bd} d{Dd} w{W} fp32",
                 lambda: ssmkit.causal_conv1d_update(xs, cstate, w[:Dd], b[:Dd], activation="silu")))
    a_, b_ = rng.uniform(0.5, 1.0, (D, L)).astype(f32), randn(D, L)
    rows.append((f"linear_scan d{D} l{L} fp32", lambda: ssmkit.linear_scan(a_, b_)))
    out = []
    for name, fn in rows:
        out.append({"name": "cpu " + name, "ms": round(_time_ms(fn, 0.05 if quick else 0.2), 4),
                    "device": "cpu (float64 reference)", "anchor_ms": None, "ratio": None})
    return out


def cpu_env() -> dict:
    import numpy

    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": numpy.__version__}


def run_cpu(out: Path, why: str, folder: Path | None, args) -> int:
    print(f"no CUDA GPU: {why}.\nTiming small CPU rows instead.")
    print(f"NOTE: {CPU_NOTE}.")
    if folder is None:
        print("(the GPU benchmarks, benchmarks/bench_*.py, are not here: they ship with the source checkout, "
              "not the wheel)")
    rows = cpu_rows(quick=args.quick)
    width = max(len(r["name"]) for r in rows)
    print(f"{'row':<{width}}  {'ms (CPU reference)':>18}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['ms']:>18.3f}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_cpu.json"
    path.write_text(json.dumps({"cpu": {"env": cpu_env(), "meta": {"note": CPU_NOTE, "why_cpu": why},
                                        "results": rows}}, indent=1))
    print(f"wrote {path}")
    if not args.no_png:
        print("no PNG: the CPU rows have no upstream ratio and no hardware-limit fraction to plot")
    return 0


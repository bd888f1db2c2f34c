"""Probe: segments per warp of the channel-first causal_conv1d forward on the benchmark rows, next
to the fp32 single-round kernel. Not a benchmark of record.

Rows: conv_fwd b8 d3072 l2048 / b4 d8192 l2048 / b1 d10240 l8192, width 4, silu, bias, x / weight /
bias in bf16 and in fp32 (as bench_causal_conv1d). bf16 runs the pipelined kernel at each
segments-per-warp setting (``ssmkit.ops.causal_conv1d._CF_FWD_SEGS``, a runtime launch parameter;
the shipped default is 2), switched between calls in interleaved rounds so that drift cancels;
fp32 runs the single-round kernel (one segment per warp, whatever the setting).

Per variant: the call as the user makes it (bench_causal_conv1d's timing: CUDA events around each
Python call, host overhead included; the ratio to the anchor uses it) and the kernel alone
(pre-packed parameters, launches back to back: device time per launch). TB/s counts x read once
and out written once. Checks: every bf16 variant's output bitwise equal to one segment per warp,
and each variant against the float64 reference on small problems (seq_idx, initial / final
states, misaligned and strided x, L with a partial last group and segment).

    python benchmarks/probe_causal_conv1d.py --out DIR [--quick] [--segs 1,2,4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = [(8, 3072, 2048), (4, 8192, 2048), (1, 10240, 8192)]
DTYPES = ("bfloat16", "float32")
WIDTH = 4
SEGS = (1, 2, 4)


def _tag(dt: str) -> str:
    return "bf16" if dt == "bfloat16" else "fp32"


def _uint_view(a):
    import cupy

    return a.view(cupy.uint16 if a.dtype.itemsize == 2 else cupy.uint32)


def _back_to_back(fn, launches: int = 20, reps: int = 5) -> float:
    """Median ms per launch of ``fn`` queued back to back (device time, no launch gaps)."""
    import cupy

    fn()
    cupy.cuda.runtime.deviceSynchronize()
    stream = cupy.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        for _ in range(launches):
            fn()
        end.record(stream)
        end.synchronize()
        out.append(cupy.cuda.get_elapsed_time(start, end) / launches)
    return statistics.median(out)


def _segs_for(dt: str, segs_list: list[int]) -> list[int]:
    from ssmkit.ops import causal_conv1d as op

    return segs_list if op._CF_FWD[dt][2] else [segs_list[0]]   # the single-round kernel ignores it


def _reference_checks(segs_list: list[int]) -> list[dict]:
    """Small problems against the float64 reference, per dtype and segments-per-warp setting."""
    import cupy
    import numpy as np

    import ssmkit
    from ssmkit.ops import causal_conv1d as op
    from ssmkit.reference import causal_conv1d as ref

    sys.path.insert(0, str(ROOT / "tests"))
    from compare import assert_close  # noqa: E402
    from gpu_util import as64, rounded  # noqa: E402

    rng = np.random.default_rng(0)
    B, D, W = 2, 6, WIDTH
    checks = []
    for dt in DTYPES:
        L = 5 * 32 * op._CF_FWD[dt][1] + 37
        x64 = rng.standard_normal((B, D, L))
        w64 = rng.standard_normal((D, W)) / np.sqrt(W)
        b64 = rng.standard_normal(D)
        i64 = rng.standard_normal((B, D, W - 1))
        seq = np.sort(rng.integers(-1, 4, (B, L)), axis=1).astype(np.int32)
        xr, wr, br, ir = (rounded(a, dt) for a in (x64, w64, b64, i64))
        for segs in _segs_for(dt, segs_list):
            for case in ("plain", "seq_states", "misaligned", "strided"):
                name = f"ref {_tag(dt)} segs={segs} {case} L={L}"
                try:
                    op._CF_FWD_SEGS = segs
                    op._FWD_PLANS.clear()
                    if case == "misaligned":                  # base 1 element past an aligned one
                        flat = np.zeros(xr.size + 1, xr.dtype)
                        flat[1:] = xr.ravel()
                        xd = cupy.asarray(flat)[1:].reshape(xr.shape)
                    elif case == "strided":                   # every other element: no unit stride
                        buf = np.zeros(xr.shape + (2,), xr.dtype)
                        buf[..., 0] = xr
                        xd = cupy.asarray(buf)[..., 0]
                    else:
                        xd = cupy.asarray(xr)
                    kw = dict(activation="silu", return_final_states=True)
                    if case == "seq_states":
                        kw.update(seq_idx=cupy.asarray(seq), initial_states=cupy.asarray(ir))
                    got, fin = ssmkit.causal_conv1d(xd, cupy.asarray(wr), cupy.asarray(br), **kw)
                    cupy.cuda.runtime.deviceSynchronize()
                    want, wfin = ref(as64(xr), as64(wr), as64(br), activation="silu",
                                     seq_idx=seq if case == "seq_states" else None,
                                     initial_states=as64(ir) if case == "seq_states" else None,
                                     return_final_states=True)
                    rep = assert_close("out", as64(got), want, dt)
                    np.testing.assert_array_equal(as64(fin), wfin)
                    checks.append({"name": name, "ok": True, "max_abs": rep["max_abs"]})
                except Exception as exc:
                    checks.append({"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})
    return checks


def probe(args) -> dict:
    import cupy
    import numpy as np

    import ssmkit
    from benchmarks.bench_causal_conv1d import randn
    from benchmarks.common import load_anchors, time_cuda
    from ssmkit.ops import causal_conv1d as op

    segs_list = [1] + [int(s) for s in args.segs.split(",") if int(s) != 1]   # segs=1 first: the others compare with it
    default_segs = op._CF_FWD_SEGS
    anchors = load_anchors()
    res = {"default_segs": default_segs, "rows": [], "errors": []}
    t_start = time.perf_counter()
    try:
        res["checks"] = _reference_checks(segs_list)
    except BaseException as exc:   # also pytest's Skipped (no ml_dtypes) from the test helpers
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        traceback.print_exc()
        res["checks"] = [{"name": "reference checks", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}]

    for dt in DTYPES:
        for B, D, L in ROWS:
            row_name = f"conv_fwd b{B} d{D} l{L} w{WIDTH} {_tag(dt)}"
            try:
                x = randn((B, D, L), dt)
                w = randn((D, WIDTH), dt, 1.0 / np.sqrt(WIDTH))
                b = randn((D,), dt)
                out_k = cupy.empty_like(x)
                nbytes = 2 * x.nbytes
                variants, ref_out, seen = [], None, set()
                for segs in _segs_for(dt, segs_list):
                    op._CF_FWD_SEGS = segs
                    op._FWD_PLANS.clear()
                    out = ssmkit.causal_conv1d(x, w, b, activation="silu")
                    plan = next(iter(op._FWD_PLANS.values()))
                    iters = plan.vals[plan.I["seg_iters"]]
                    if iters in seen:                       # clamped to the same launch: skip
                        continue
                    seen.add(iters)
                    if ref_out is None:
                        ref_out = out
                    packed = (op._PACK_FWD.pack(op._with_ptrs(plan.vals, plan.I, x=x, weight=w, bias=b,
                                                              out=out_k)),)
                    attrs = plan.kernel.attributes
                    variants.append({
                        "segs": segs, "seg_iters": int(iters), "n_groups": int(plan.vals[plan.I["n_seg"]]),
                        "blocks": int(plan.grid[0]), "regs": attrs.get("num_regs"),
                        "local_bytes": attrs.get("local_size_bytes"),
                        "bitwise_vs_segs1": bool(cupy.array_equal(_uint_view(out), _uint_view(ref_out))),
                        "plan": plan, "packed": packed, "call": [], "kernel": []})
                for _ in range(2 if args.quick else 3):       # interleaved: drift hits all variants
                    for v in variants:
                        op._CF_FWD_SEGS = v["segs"]
                        op._FWD_PLANS.clear()                 # the next call plans with this setting

                        def call():
                            return ssmkit.causal_conv1d(x, w, b, activation="silu")

                        v["call"].append(time_cuda(call, warmup=3, iters=10 if args.quick else 30))
                        plan, packed = v["plan"], v["packed"]
                        k, grid, block = plan.kernel, plan.grid, plan.block
                        v["kernel"].append(_back_to_back(lambda: k(grid, block, packed),
                                                         launches=10 if args.quick else 20))
                anchor = anchors.get(row_name)
                for v in variants:
                    call_ms = statistics.median(v["call"])
                    kern_ms = statistics.median(v["kernel"])
                    res["rows"].append({
                        "name": row_name, "dtype": dt, "kernel": op.kernel_ref("fwd_cf", dt, dt, WIDTH).name,
                        "segs": v["segs"], "seg_iters": v["seg_iters"], "n_groups": v["n_groups"],
                        "blocks": v["blocks"], "regs": v["regs"], "local_bytes": v["local_bytes"],
                        "call_ms": round(call_ms, 5), "kernel_ms": round(kern_ms, 5),
                        "call_TBps": round(nbytes / (call_ms * 1e-3) / 1e12, 3),
                        "kernel_TBps": round(nbytes / (kern_ms * 1e-3) / 1e12, 3),
                        "anchor_ms": anchor, "ratio": round(anchor / call_ms, 3) if anchor else None,
                        "call_samples": [round(t, 5) for t in v["call"]],
                        "kernel_samples": [round(t, 5) for t in v["kernel"]],
                        "bitwise_vs_segs1": v["bitwise_vs_segs1"]})
                del x, out_k, ref_out, variants
                cupy.get_default_memory_pool().free_all_blocks()
            except Exception as exc:
                traceback.print_exc()
                res["errors"].append(f"{row_name}: {type(exc).__name__}: {exc}"[:400])
    op._CF_FWD_SEGS = default_segs
    op._FWD_PLANS.clear()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def _print(res: dict) -> None:
    hdr = (f"{'row':34s} {'segs':>4s} {'iter':>4s} {'regs':>4s} {'call ms':>8s} {'kern ms':>8s} "
           f"{'call TB/s':>9s} {'kern TB/s':>9s} {'anchor':>7s} {'ratio':>6s} {'bits':>5s}")
    print(hdr)
    print("-" * len(hdr))
    for row in res["rows"]:
        single = "_single<" in row["kernel"]
        seg = "-" if single else str(row["segs"])
        mark = "*" if single or row["segs"] == res["default_segs"] else " "
        bits = "ok" if row["bitwise_vs_segs1"] else "DIFF"
        print(f"{row['name']:34s} {seg:>3s}{mark} {row['seg_iters']:>4d} {row['regs'] or 0:>4d} "
              f"{row['call_ms']:8.4f} {row['kernel_ms']:8.4f} {row['call_TBps']:9.3f} {row['kernel_TBps']:9.3f} "
              f"{row['anchor_ms'] or 0:7.4f} {row['ratio'] or 0:6.3f} {bits:>5s}")
    bad = [c for c in res.get("checks", []) if not c["ok"]]
    n = len(res.get("checks", []))
    print(f"(* = shipped default) reference checks: {n - len(bad)}/{n} ok; {res.get('seconds', '-')} s")
    for c in bad[:8]:
        print(f"   FAIL {c['name']}: {c.get('error')}")
    for e in res.get("errors", []):
        print(f"   ERROR {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for probe_causal_conv1d.json")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--segs", default=",".join(map(str, SEGS)), help="bf16 segments per warp to try")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    res = probe(args)
    _print(res)
    print(f"total {time.perf_counter() - t0:.0f} s")
    from benchmarks.common import environment

    out = Path(args.out) / "probe_causal_conv1d.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": environment(), **res}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

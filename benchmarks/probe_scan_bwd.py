"""Probe: the selective-scan backward's three ways of summing variable dB/dC (for NOTES.md and
for choosing ``DETERMINISTIC_DEFAULT`` and ``BWD_STATES_PER_SYNC`` in ssmkit.ops.selective_scan). Not a benchmark of record.

Modes: deterministic (fixed-order per-block partials + a fold kernel) or fp32 atomics, each with
1 or 2 states per block barrier (``BWD_STATES_PER_SYNC``). Per anchor shape and dtype: the
backward call and forward + backward as bench_selective_scan times them, and each mode's largest
dB/dC difference from the first (relative to max |dB|).

    python benchmarks/probe_scan_bwd.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_selective_scan import SHAPES, make  # noqa: E402
from benchmarks.common import load_anchors, time_cuda  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    import cupy

    import ssmkit
    from ssmkit.ops import selective_scan as op

    anchors = load_anchors()
    rows = []
    for (B, D, L, N) in (SHAPES[:1] if a.quick else SHAPES):
        for dtype in ("bf16", "fp32"):
            args, kw, _ = make(B, D, L, N, dtype, True)
            dout = cupy.random.default_rng(1).standard_normal((B, D, L), dtype=cupy.float32).astype(args["u"].dtype)
            _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)
            name = f"b{B} d{D} l{L} n{N} {dtype}"
            anchor = anchors.get(f"ss_fwdbwd {name}")
            ref = None
            for mode, (det, sync) in enumerate(((True, 1), (True, 2), (False, 1), (False, 2))):
                op.BWD_STATES_PER_SYNC = sync
                op._BWD_PLANS.clear()
                bwd = lambda: ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved, deterministic=det)  # noqa: E731

                def fwdbwd():
                    _, _, s = ssmkit.selective_scan_fwd(**args, **kw)
                    return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=s, deterministic=det)

                g = bwd()
                dB, dC = g[3].astype(cupy.float32), g[4].astype(cupy.float32)
                if ref is None:
                    ref = (dB, dC)
                    diff = 0.0
                else:
                    diff = max(float(cupy.abs(x - r).max() / (cupy.abs(r).max() + 1e-30)) for x, r in zip((dB, dC), ref))
                ok = all(bool(cupy.isfinite(x).all()) for x in (dB, dC))
                t_bwd = time_cuda(bwd, 3, 15)
                t_fb = time_cuda(fwdbwd, 3, 15)
                r = {"name": name, "mode": mode, "deterministic": det, "sync_states": sync, "bwd_ms": round(t_bwd, 4), "fwdbwd_ms": round(t_fb, 4),
                     "anchor_ms": anchor, "ratio": round(anchor / t_fb, 3) if anchor else None,
                     "dBdC_rel_diff_vs_mode0": diff, "finite": ok}
                rows.append(r)
                print(json.dumps(r), flush=True)
            del args, kw, dout, saved, ref
            cupy.get_default_memory_pool().free_all_blocks()
    op.BWD_STATES_PER_SYNC = 2
    op._BWD_PLANS.clear()
    print(f"\n{'row':28s} {'det':>5s} {'sync':>4s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'ratio':>6s} {'rel diff':>9s}")
    for r in rows:
        print(f"{r['name']:28s} {str(r['deterministic']):>5s} {r['sync_states']:4d} {r['bwd_ms']:8.4f} {r['fwdbwd_ms']:8.4f} "
              f"{(r['ratio'] or 0):6.3f} {r['dBdC_rel_diff_vs_mode0']:9.2e}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_scan_bwd.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

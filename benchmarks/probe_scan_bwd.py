"""Probe: the selective-scan backward, A/B within one process (for NOTES.md and for choosing
``DETERMINISTIC_DEFAULT`` in ssmkit.ops.selective_scan). Not a benchmark of record.

Per anchor shape and dtype, the deterministic dB/dC sums and the fp32 atomics measured back to
back: the backward call and forward + backward as bench_selective_scan measures them, plus the
atomic variant's largest dB/dC difference from the deterministic one (relative to max |dB|).
To compare kernel versions, run it once per version in the same device call (spread between
device runs is ~5-10%).

    python benchmarks/probe_scan_bwd.py [--out DIR] [--quick] [--ncu] [--tag NAME]

``--ncu``: run one headline bf16 backward only (for ``ncu --launch-skip``), no timing.
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
    ap.add_argument("--tag", default="", help="label for the JSON file name and rows")
    ap.add_argument("--max-segments", type=int, default=None, help="cap the backward's time split")
    ap.add_argument("--ncu", action="store_true")
    a = ap.parse_args(argv)
    import cupy

    import ssmkit
    from ssmkit.ops import selective_scan as op

    if a.max_segments is not None:
        op.MAX_SEGMENTS = a.max_segments
    if a.ncu:
        args, kw, _ = make(8, 1536, 2048, 16, "bf16", True)
        _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)
        for _ in range(3):
            ssmkit.selective_scan_bwd(cupy.ones_like(args["u"]), **args, **kw, saved=saved)
        cupy.cuda.runtime.deviceSynchronize()
        return 0

    variants = [(f"{a.tag}det", True), (f"{a.tag}atomic", False)]
    anchors = load_anchors()
    rows = []
    for (B, D, L, N) in (SHAPES[:1] if a.quick else SHAPES):
        for dtype in ("bf16", "fp32"):
            args, kw, _ = make(B, D, L, N, dtype, True)
            dout = cupy.random.default_rng(1).standard_normal((B, D, L), dtype=cupy.float32).astype(args["u"].dtype)
            name = f"b{B} d{D} l{L} n{N} {dtype}"
            anchor = anchors.get(f"ss_fwdbwd {name}")
            ref = None
            for label, det in variants:
                _, _, saved = ssmkit.selective_scan_fwd(**args, **kw)
                bwd = lambda: ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved, deterministic=det)  # noqa: E731

                def fwdbwd():
                    _, _, s = ssmkit.selective_scan_fwd(**args, **kw)
                    return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=s, deterministic=det)

                g = bwd()
                dB, dC = g[3].astype(cupy.float32), g[4].astype(cupy.float32)
                if ref is None:
                    ref, diff = (dB, dC), 0.0
                else:
                    diff = max(float(cupy.abs(x - r).max() / (cupy.abs(r).max() + 1e-30)) for x, r in zip((dB, dC), ref))
                ok = all(bool(cupy.isfinite(x).all()) for x in (dB, dC))
                t_bwd = time_cuda(bwd, 3, 15)
                t_fb = time_cuda(fwdbwd, 3, 15)
                r = {"name": name, "variant": label, "bwd_ms": round(t_bwd, 4), "fwdbwd_ms": round(t_fb, 4),
                     "anchor_ms": anchor, "ratio": round(anchor / t_fb, 3) if anchor else None,
                     "dBdC_rel_diff": diff, "finite": ok}
                rows.append(r)
                print(json.dumps(r), flush=True)
            del args, kw, dout, saved, ref
            cupy.get_default_memory_pool().free_all_blocks()
    print(f"\n{'row':28s} {'variant':>12s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'ratio':>6s} {'rel diff':>9s}")
    for r in rows:
        print(f"{r['name']:28s} {r['variant']:>12s} {r['bwd_ms']:8.4f} {r['fwdbwd_ms']:8.4f} "
              f"{(r['ratio'] or 0):6.3f} {r['dBdC_rel_diff']:9.2e}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"probe_scan_bwd{('_' + a.tag) if a.tag else ''}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

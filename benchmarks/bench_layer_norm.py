"""layer_norm benchmark: fused residual add + RMSNorm / LayerNorm, forward and forward + backward,
in GB/s and as a fraction of the H200's copy bandwidth (4.28 TB/s, BENCHMARKS.md). No upstream
anchors exist for this op; the target (issue): forward >= 85% of copy bandwidth at (16384, 2048)
bf16 on the H200.

Rows (M rows x H, x and dy in the named dtype):

* ``ln_fwd mM hH dt rms res32``: the Mamba block pattern: ``layer_norm_fwd`` with a residual in
  fp32 (residual_in_fp32), weight in x's dtype, RMSNorm, keeping mean/rstd and residual_out for a
  backward. Bytes: x, residual read; y, residual_out written (2 + 4 + 2 + 4 bytes per element in
  bf16; mean/rstd and the weight are negligible).
* ``... res16``: residual in x's dtype (8 bytes per element in bf16); ``... nores``: no residual
  (x read, y written); ``... ln bias``: LayerNorm with a bias.
* ``ln_infer ...``: ``layer_norm(prenorm=True)`` (no statistics kept): the same bytes.
* ``ln_fwdbwd ...``: the forward above + ``layer_norm_bwd`` with the gradient of residual_out
  (prenorm). Backward bytes: residual_out, dy, dresidual_out read; dx written, and dresidual
  when its dtype differs from dx's; the partial dweight rows are not counted.
* ``ln_decode mM hH``: a decode-size call (launch-bound): ms per Python call and per call inside
  a captured CUDA graph ("graph").

    python benchmarks/bench_layer_norm.py --out DIR [--quick] [--sweep]

``--sweep`` also times the anchor row with other kIters (``op.MIN_ITERS``) for the forward and
other backward block sizes (``op.BWD_BLOCK``): the constants' measurements.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (HBM_RW, device_copy_rate, print_table, row, randn, time_cuda,  # noqa: E402
                               time_graph, write_json)

ANCHOR = (16384, 2048)
SHAPES = [ANCHOR, (4096, 4096), (2048, 8192), (65536, 768), (1024, 16384)]
DECODE = [(1, 2048), (64, 4096)]
TARGET = 0.85


def _item(dt):
    return 2 if dt in ("bfloat16", "float16") else np.dtype(dt).itemsize


class Case:
    """Inputs of one (M, H, dtype, residual, norm) row and its byte counts."""

    def __init__(self, M, H, dt, res, rms=True, bias=False):
        import cupy

        self.M, self.H, self.dt, self.res, self.rms = M, H, dt, res, rms
        self.x = randn((M, H), dt)
        self.w = randn((H,), dt, 0.5)
        self.b = randn((H,), dt) if bias else None
        self.r = None if res == "nores" else randn((M, H), "float32" if res == "res32" else dt)
        self.rif32 = res == "res32"
        e, ix = M * H, _item(dt)
        ir = 4 if res == "res32" else ix
        has_rout = res != "nores"
        self.fwd_bytes = e * (ix + (ir if self.r is not None else 0) + ix + (ir if has_rout else 0))
        xs_item = ir if has_rout else ix
        self.bwd_bytes = e * (xs_item + ix + (xs_item if has_rout else 0) + ix
                              + (ir if self.r is not None and ir != ix else 0))
        self.dy = randn((M, H), dt)
        self.drout = randn((M, H), "float32" if res == "res32" else dt) if has_rout else None
        norm = "rms" if rms else "ln"
        self.tag = f"m{M} h{H} {'bf16' if dt == 'bfloat16' else dt.replace('float', 'fp')} {norm} {res}" + \
            (" bias" if bias else "")
        cupy.cuda.runtime.deviceSynchronize()

    def fwd(self):
        import ssmkit

        return ssmkit.layer_norm_fwd(self.x, self.w, self.b, residual=self.r, residual_in_fp32=self.rif32,
                                     is_rms_norm=self.rms)

    def infer(self):
        import ssmkit

        return ssmkit.layer_norm(self.x, self.w, self.b, residual=self.r, prenorm=True,
                                 residual_in_fp32=self.rif32, is_rms_norm=self.rms)

    def fwdbwd(self):
        import ssmkit

        y, rout, mean, rstd = self.fwd()
        return ssmkit.layer_norm_bwd(self.dy, rout, self.w, self.b, mean, rstd, self.drout,
                                     has_residual=self.r is not None, is_rms_norm=self.rms)


def _rows_for(case, iters, fwdbwd=True, infer=False):
    out = [row(f"ln_fwd {case.tag}", time_cuda(case.fwd, warmup=5, iters=iters), {}, nbytes=case.fwd_bytes)]
    if infer:
        out.append(row(f"ln_infer {case.tag}", time_cuda(case.infer, warmup=5, iters=iters), {},
                       nbytes=case.fwd_bytes))
    if fwdbwd:
        out.append(row(f"ln_fwdbwd {case.tag}", time_cuda(case.fwdbwd, warmup=5, iters=iters), {},
                       nbytes=case.fwd_bytes + case.bwd_bytes))
    return out


def bench_rows(quick):
    iters = 20 if quick else 100
    rows = []
    cases = [(ANCHOR, "bfloat16", "res32", True, False), (ANCHOR, "bfloat16", "res16", True, False),
             (ANCHOR, "bfloat16", "nores", True, False), (ANCHOR, "bfloat16", "res32", False, True),
             (ANCHOR, "float32", "res32", True, False)]
    cases += [(s, "bfloat16", "res32", True, False) for s in SHAPES[1:]]
    if quick:
        cases = cases[:2]
    for (M, H), dt, res, rms, bias in cases:
        try:
            case = Case(M, H, dt, res, rms, bias)
            rows += _rows_for(case, iters, infer=(M, H) == ANCHOR and res == "res32" and rms)
            del case
        except Exception as exc:
            traceback.print_exc()
            rows.append({"name": f"ln {M}x{H} {dt} {res}", "error": f"{type(exc).__name__}: {exc}"})
    for M, H in DECODE if not quick else DECODE[:1]:
        try:
            case = Case(M, H, "bfloat16", "res32")
            name = f"ln_decode m{M} h{H} bf16 rms res32"
            rows.append(row(name, time_cuda(case.infer, warmup=20, iters=iters * 2), {}, nbytes=case.fwd_bytes))
            rows.append(row(f"{name} graph", time_graph(case.infer, calls_per_graph=100, iters=10), {},
                            nbytes=case.fwd_bytes))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"name": f"ln_decode m{M} h{H}", "error": f"{type(exc).__name__}: {exc}"})
    return rows


def sweep_rows(quick):
    """The anchor row with other kIters (forward) and backward block sizes."""
    from ssmkit.ops import layer_norm as op

    iters = 20 if quick else 100
    case = Case(*ANCHOR, "bfloat16", "res32")
    rows = []
    saved = (op.MIN_ITERS, op.BWD_BLOCK)
    try:
        for it in (1, 2, 4):
            op.MIN_ITERS = it
            op._FWD_PLANS.clear()
            op._BWD_PLANS.clear()
            rows.append(row(f"sweep ln_fwd {case.tag} kIters>={it}", time_cuda(case.fwd, warmup=5, iters=iters), {},
                            nbytes=case.fwd_bytes, min_iters=it))
        op.MIN_ITERS = saved[0]
        for blk in (256, 512, 1024):
            op.BWD_BLOCK = blk
            op._FWD_PLANS.clear()
            op._BWD_PLANS.clear()
            rows.append(row(f"sweep ln_fwdbwd {case.tag} bwd_block {blk}", time_cuda(case.fwdbwd, warmup=5,
                                                                                        iters=iters), {},
                            nbytes=case.fwd_bytes + case.bwd_bytes, bwd_block=blk))
    finally:
        op.MIN_ITERS, op.BWD_BLOCK = saved
        op._FWD_PLANS.clear()
        op._BWD_PLANS.clear()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for layer_norm.json")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and rows (smoke test)")
    ap.add_argument("--sweep", action="store_true", help="also time other kIters / backward block sizes")
    args = ap.parse_args(argv)
    rows = bench_rows(args.quick)
    if args.sweep:
        rows += sweep_rows(args.quick)
    print_table(rows)
    anchor = next((r for r in rows if r.get("name", "").startswith("ln_fwd m16384 h2048 bf16 rms res32")), None)
    copy = device_copy_rate()
    print(f"this GPU's device copy (1 GiB, read + write): {copy / 1e12:.2f} TB/s")
    if anchor is not None and "hbm_frac" in anchor:
        frac = anchor["hbm_frac"] * HBM_RW / copy        # of this card's own copy rate
        verdict = "meets" if frac >= TARGET else "misses"
        print(f"target: forward at (16384, 2048) bf16 = {100 * frac:.1f}% of this GPU's copy bandwidth "
              f"({100 * anchor['hbm_frac']:.1f}% of the H200's 4.28 TB/s); {verdict} the {100 * TARGET:.0f}% target")
        anchor["copy_frac_same_gpu"] = round(frac, 4)
    write_json(Path(args.out) / "layer_norm.json", rows,
               {"bytes": "fwd: x, residual read + y, residual_out written; bwd: residual_out, dy, dresidual_out "
                         "read + dx (and dresidual when its dtype differs) written",
                "copy_bandwidth": "4.28 TB/s (read + write, anchors limits)", "target_fwd_frac": TARGET,
                "device_copy_Bps": copy})


if __name__ == "__main__":
    main()

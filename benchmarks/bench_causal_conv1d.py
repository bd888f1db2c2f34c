"""causal_conv1d benchmark: forward, forward + backward and the decode update vs the upstream
anchors (benchmarks/anchors/h200.json).

Rows (names as the anchors define them):

* ``conv_fwd bB dD lL wW dt``: x (B, D, L) channel-first, weight (D, W) and bias (D,) in x's
  dtype, silu. GB/s counts one read of x and one write of out.
* ``conv_fwd_chlast ...``: the same with x a (B, D, L) view of a (B, L, D) array.
* ``conv_fwdbwd ...``: one ssmkit.causal_conv1d call + one ssmkit.causal_conv1d_bwd call (the
  anchor times forward + backward through autograd). GB/s counts x read twice, out written,
  dout read, dx written (5 x the bytes of x; dweight/dbias and the workspace are negligible).
* extra rows without anchors: widths 2, 3, 8 and channel-last forward + backward.
* ``conv_update bB dD wW``: one decode step, x (B, D) bf16, conv_state (B, D, 4) bf16, silu
  (as the anchor). Timed as the user calls it (output allocated per call: the anchor row), with
  a preallocated ``out=`` ("... out") and per call inside a captured CUDA graph ("... graph").
  Every call steps a different conv_state buffer, rotating over >= 64 of them and >= 256 MiB in
  all, so L2 (60 MB) holds none of them between uses. GB/s counts x read, out written, state read
  and written.

    python benchmarks/bench_causal_conv1d.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import load_anchors, print_table, row, time_cuda, time_graph, write_json, bf16_dtype, randn  # noqa: E402

SHAPES = [(8, 3072, 2048), (4, 8192, 2048), (1, 10240, 8192)]
EXTRA_WIDTHS = [2, 3, 8]
UPDATE_ROWS = [(1, 5120, 4), (64, 5120, 4), (256, 4096, 4)]
UPDATE_STATE_LEN = 4                 # the anchor's conv_state (B, D, 4)
ROTATE_BYTES = 256 << 20
MIN_BUFFERS, MAX_BUFFERS = 64, 2048


def _chlast(shape, dtype):
    B, D, L = shape
    return randn((B, L, D), dtype).transpose(0, 2, 1)


def conv_rows(anchors, quick):
    import ssmkit

    iters = 20 if quick else 100
    rows = []
    cases = [(s, 4, dt) for dt in ("bfloat16", "float32") for s in SHAPES]
    cases += [(SHAPES[0], w, "bfloat16") for w in EXTRA_WIDTHS]
    if quick:
        cases = [(SHAPES[0], 4, "bfloat16"), (SHAPES[0], 4, "float32"), (SHAPES[0], 8, "bfloat16")]
    for (B, D, L), W, dt in cases:
        tag = f"b{B} d{D} l{L} w{W} {'bf16' if dt == 'bfloat16' else 'fp32'}"
        item = np.dtype(bf16_dtype() if dt == "bfloat16" else dt).itemsize
        xbytes = B * D * L * item
        weight = randn((D, W), dt, 1.0 / math.sqrt(W))
        bias = randn((D,), dt)
        for layout in ("cf", "cl"):
            x = randn((B, D, L), dt) if layout == "cf" else _chlast((B, D, L), dt)
            dout = randn((B, D, L), dt) if layout == "cf" else _chlast((B, D, L), dt)
            fwd_name = f"conv_fwd {tag}" if layout == "cf" else f"conv_fwd_chlast {tag}"
            fb_name = f"conv_fwdbwd {tag}" if layout == "cf" else f"conv_fwdbwd_chlast {tag}"

            def fwd():
                return ssmkit.causal_conv1d(x, weight, bias, activation="silu")

            def fwdbwd():
                ssmkit.causal_conv1d(x, weight, bias, activation="silu")
                return ssmkit.causal_conv1d_bwd(x, weight, bias, dout, activation="silu")

            try:
                rows.append(row(fwd_name, time_cuda(fwd, warmup=5, iters=iters), anchors, nbytes=2 * xbytes))
                rows.append(row(fb_name, time_cuda(fwdbwd, warmup=5, iters=iters), anchors, nbytes=5 * xbytes))
            except Exception as exc:
                traceback.print_exc()
                rows.append({"name": fwd_name, "error": f"{type(exc).__name__}: {exc}"})
            del x, dout
    return rows


def update_rows(anchors, quick):
    import cupy
    import ssmkit

    iters = 30 if quick else 200
    rows = []
    for B, D, W in UPDATE_ROWS:
        S = UPDATE_STATE_LEN
        name = f"conv_update b{B} d{D} w{W}"
        per = B * D * S * 2
        n = max(MIN_BUFFERS, min(MAX_BUFFERS, math.ceil(ROTATE_BYTES / per)))
        big = randn((n, B, D, S), "bfloat16")
        states = [big[i] for i in range(n)]
        x = randn((B, D), "bfloat16")
        weight = randn((D, W), "bfloat16", 0.5)
        bias = randn((D,), "bfloat16")
        out = cupy.empty((B, D), bf16_dtype())
        cyc = itertools.cycle(states)
        nbytes = 2 * B * D * 2 + 2 * per

        def call():
            return ssmkit.causal_conv1d_update(x, next(cyc), weight, bias, activation="silu")

        def call_out():
            return ssmkit.causal_conv1d_update(x, next(cyc), weight, bias, activation="silu", out=out)

        cupy.cuda.runtime.deviceSynchronize()
        try:
            rows.append(row(name, time_cuda(call, warmup=20, iters=iters), anchors, nbytes=nbytes, buffers=n))
            rows.append(row(f"{name} out", time_cuda(call_out, warmup=20, iters=iters), anchors, nbytes=nbytes))
            calls = min(n, 1000)
            g = time_graph(call_out, calls_per_graph=calls, warmup=2, iters=5 if quick else 20)
            rows.append(row(f"{name} graph", g, anchors, nbytes=nbytes, calls_per_graph=calls))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
        del big, states
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for causal_conv1d.json")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and rows (smoke test)")
    args = ap.parse_args(argv)
    anchors = load_anchors()
    rows = conv_rows(anchors, args.quick) + update_rows(anchors, args.quick)
    print_table(rows)
    write_json(Path(args.out) / "causal_conv1d.json", rows,
               {"bytes": "fwd: x + out; fwdbwd: 5 x bytes(x); update: x + out + 2 x state",
                "weights": "x's dtype", "activation": "silu"})


if __name__ == "__main__":
    main()

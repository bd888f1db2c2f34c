"""Representative selective-scan and linear-scan variants, each run once at small sizes, for
compute-sanitizer (memcheck / racecheck):

    compute-sanitizer --tool memcheck python benchmarks/sanitize_selective_scan.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402


def main():
    import cupy
    import ssmkit
    from ssmkit.ops import selective_scan as op
    from test_selective_scan import _pinned, cast_inputs
    from gpu_util import to_device

    cases = [
        ("bfloat16", _pinned(batch=2, dim=9, seqlen=600, dstate=16, kinds=("var", "var"))),
        # odd L: B/C staged into aligned rows, the checked path with L2 prefetches
        ("bfloat16", _pinned(batch=2, dim=9, seqlen=301, dstate=16, kinds=("var", "var"))),
        ("float32", _pinned(batch=2, dim=4, seqlen=300, dstate=5, kinds=("group", "group"), groups=2)),
        ("float32", _pinned(batch=1, dim=3, seqlen=70, dstate=256, kinds=("const", "var"))),
        ("float32", _pinned(batch=1, dim=3, seqlen=257, dstate=4, kinds=("var", "const"), complex_A=True)),
        ("float64", _pinned(batch=1, dim=2, seqlen=513, dstate=3, kinds=("var", "var"), flags=False)),
    ]
    for dtype, spec in cases:
        host = cast_inputs(spec.build(), dtype)
        dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
        args = [dev[k] for k in ("u", "delta", "A", "B", "C")]
        kw = dict(D=dev["D"], z=dev["z"], delta_bias=dev["delta_bias"], delta_softplus=dev["delta_softplus"],
                  initial_state=dev["initial_state"])
        out, last, saved = ssmkit.selective_scan_fwd(*args, **kw)
        for det, max_seg in ((True, 16), (False, 16), (False, 1)):   # dB/dC sums; time split or not
            op.MAX_SEGMENTS = max_seg
            op._BWD_PLANS.clear()
            ssmkit.selective_scan_bwd(cupy.ones_like(out), *args, saved=saved, dlast_state=cupy.ones_like(last),
                                      deterministic=det, **kw)
            cupy.cuda.runtime.deviceSynchronize()
        print("ok", dtype, spec.B_kind, spec.C_kind, spec.dstate, spec.seqlen, flush=True)
    a = cupy.asarray(np.random.default_rng(0).uniform(0.5, 1, (3, 700)).astype(np.float32))
    b = cupy.asarray(np.random.default_rng(1).standard_normal((3, 700)).astype(np.float32))
    ssmkit.linear_scan_bwd(a, b, b, reverse=True)
    cupy.cuda.runtime.deviceSynchronize()
    print("ok linear_scan")


if __name__ == "__main__":
    main()

"""Representative selective_state_update variants, each run once at small sizes, for
compute-sanitizer (memcheck / racecheck):

    compute-sanitizer --tool memcheck python benchmarks/sanitize_selective_state_update.py
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
    from test_selective_state_update import _mamba1, _mamba2, _to_gpu

    cases = [
        # (label, args, state dtype, input dtype, transform[, per-argument dtypes])
        ("m1 fp32/bf16 pool+padding", dict(_mamba1(batch=3, dim=37, dstate=16, pool=5, seed=1),
                                           state_batch_indices=np.array([4, -1, 1])), "float32", "bfloat16", None),
        ("m1 bf16/fp32 N=20 scalar path", _mamba1(batch=2, dim=9, dstate=20, seed=2), "bfloat16", "float32", None),
        ("m2 fp32/bf16 tied N=128", _mamba2(batch=2, heads=4, headdim=6, groups=2, dstate=128, seed=3),
         "float32", "bfloat16", "tie"),
        ("m2 fp16/fp16 N=300 chunks", _mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=300, seed=4),
         "float16", "float16", None),
        ("m2 fp64 strided", _mamba2(batch=2, heads=3, headdim=5, groups=3, dstate=8, seed=5), "float64", "float64",
         "strided"),
        ("m1 fp32 no optional args", {**_mamba1(batch=1, dim=5, dstate=1, seed=6), "D": None, "z": None,
                                      "dt_bias": None, "dt_softplus": False}, "float32", "float32", None),
        # dtype combinations (issue 13): D / dt_bias typed per call, fp32 B/C with 16-bit x
        # (32-byte B/C chunks per 16-byte state chunk), host-widened arguments
        ("m1 upstream step bf16 state/D/dt_bias, fp32 A", _mamba1(batch=2, dim=40, dstate=16, seed=7),
         "bfloat16", "bfloat16", None, dict(D="bfloat16", dt_bias="bfloat16")),
        ("m1 transformers bf16 D, fp32 dt_bias", _mamba1(batch=2, dim=40, dstate=16, seed=8),
         "bfloat16", "bfloat16", None, dict(D="bfloat16")),
        ("m2 fp16 state, fp32 B/C, fp16 D, bf16 dt_bias, tied", _mamba2(batch=2, heads=4, headdim=6, groups=2,
                                                                        dstate=64, seed=9),
         "float16", "float16", "tie", dict(B="float32", C="float32", D="float16", dt_bias="bfloat16")),
        ("m2 bf16 state, fp32 B/C N=20 scalar path", _mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=20,
                                                              seed=10),
         "bfloat16", "bfloat16", None, dict(B="float32", C="float32")),
        ("m1 widened: bf16 A, fp16 dt with fp32 x (functional only)", _mamba1(batch=2, dim=9, dstate=16, seed=11),
         "float32", "float32", "no_plan", dict(A="bfloat16", dt="float16")),
    ]
    for label, args, sdt, idt, how, *over in cases:
        dev, _ = _to_gpu(args, sdt, idt, dtypes=over[0] if over else None)
        if how == "tie":
            H, P, N = dev["A"].shape
            dev["A"] = cupy.broadcast_to(dev["A"][:, :1, :], (H, P, N))
            dev["dt"] = cupy.broadcast_to(dev["dt"][:, :, :1], dev["dt"].shape)
            dev["dt_bias"] = cupy.broadcast_to(dev["dt_bias"][:, :1], (H, P))
        if how == "strided":
            big = cupy.empty(dev["state"].shape[:-1] + (2 * dev["state"].shape[-1],), dev["state"].dtype)
            big[..., ::2] = dev["state"]
            dev["state"] = big[..., ::2]
            dev["B"] = cupy.asfortranarray(dev["B"])
        out = cupy.empty(dev["x"].shape, dev["x"].dtype)
        ssmkit.selective_state_update(**dev, out=out)
        if how == "no_plan":  # a plan refuses arguments that need a widening copy
            cupy.cuda.runtime.deviceSynchronize()
            print("ok", label, flush=True)
            continue
        plan = ssmkit.SelectiveStateUpdatePlan(**dev, out=out)
        plan()
        cupy.cuda.runtime.deviceSynchronize()
        print("ok", label, "tied" if plan.tied else "general", flush=True)


if __name__ == "__main__":
    main()

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
        # (label, args, state dtype, input dtype, transform)
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
    ]
    for label, args, sdt, idt, how in cases:
        dev, _ = _to_gpu(args, sdt, idt)
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
        plan = ssmkit.SelectiveStateUpdatePlan(**dev, out=out)
        plan()
        cupy.cuda.runtime.deviceSynchronize()
        print("ok", label, "tied" if plan.tied else "general", flush=True)


if __name__ == "__main__":
    main()

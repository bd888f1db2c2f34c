"""``python -m ssmkit.demo`` (or ``ssmkit-demo``): the main job in one command.

Runs the selective scan (variable B/C, D, z, delta_bias, softplus) and the causal conv1d
(W=4, silu), forward and backward, on the GPU when CuPy sees one (16-bit or fp32 inputs), and
prints the shapes, the time per call and the error against the float64 reference. Without a GPU
(or with ``--cpu``) the same calls take NumPy arrays, which run the float64 reference itself:
the demo then says so, and its comparison is with a direct reference call.

    python -m ssmkit.demo                  # GPU if present, else the CPU reference path
    python -m ssmkit.demo --cpu            # force the CPU reference path
    python -m ssmkit.demo --size large     # Mamba-1 sized problem (B=4, D=1536, L=2048)
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SIZES = {  # B batch, D channels, L length, N state size, W conv width
    "small": dict(B=2, D=64, L=512, N=16, W=4),
    "large": dict(B=4, D=1536, L=2048, N=16, W=4),
}
# Pass/fail bound on max|err| / max|ref| per input dtype (the test suite's tolerances are tighter
# and element-wise; this only flags a broken install).
REL_BOUND = {"bfloat16": 5e-2, "float16": 2e-2, "float32": 2e-3, "float64": 1e-9}


def _gpu_name():
    """The current GPU's name when CuPy can use one, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _f64(x):
    if x is None:
        return None
    if hasattr(x, "get"):
        x = x.get()
    x = np.asarray(x)
    if x.dtype.kind == "V" or x.dtype.name == "bfloat16":
        x = x.astype(np.float32)
    return x.astype(np.float64)


def _err(got, want):
    """(max abs error, max abs error / max |reference|)."""
    g, w = _f64(got), _f64(want)
    if g.shape != w.shape:
        raise AssertionError(f"shape {g.shape} != reference {w.shape}")
    if not np.all(np.isfinite(g)):
        return float("inf"), float("inf")
    diff = float(np.max(np.abs(g - w))) if g.size else 0.0
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    return diff, diff / scale if scale > 0 else diff


class _Timer:
    """Milliseconds per call: CUDA events around repeated calls on the GPU, wall clock on the CPU."""

    def __init__(self, gpu: bool, reps: int):
        self.gpu, self.reps = gpu, reps

    def __call__(self, fn):
        if not self.gpu:
            t0 = time.perf_counter()
            for _ in range(self.reps):
                fn()
            return (time.perf_counter() - t0) * 1e3 / self.reps
        import cupy

        for _ in range(3):
            fn()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(self.reps):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / self.reps


def _first_call(fn, gpu: bool):
    """Seconds for the first call (on the GPU: compile, or load from the disk cache)."""
    t0 = time.perf_counter()
    res = fn()
    if gpu:
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
    return res, time.perf_counter() - t0


def _report(rows, dtype, failures):
    bound = REL_BOUND[dtype]
    for name, got, want in rows:
        if want is None:
            continue
        mx, rel = _err(got, want)
        ok = rel <= bound
        if not ok:
            failures.append(name)
        print(f"      {name:<12} {str(tuple(np.shape(want))):<16} max abs err {mx:9.2e}   "
              f"rel {rel:9.2e}   {'ok' if ok else 'MISMATCH (bound %.0e)' % bound}")


def _shape(x):
    return str(tuple(x.shape))


def run(size: str = "small", cpu: bool = False, dtype: str | None = None, reps: int | None = None) -> int:
    import ssmkit
    from ssmkit import reference as ref

    gpu_name = None if cpu else _gpu_name()
    gpu = gpu_name is not None
    if dtype is None:
        try:
            _np_dtype("bfloat16")
            dtype = "bfloat16" if gpu else "float32"
        except Exception:
            dtype = "float32"
    if not gpu and dtype == "bfloat16":
        dtype = "float32"
    reps = reps or (20 if gpu else 1)
    s = SIZES[size]
    Bn, Dn, L, N, W = s["B"], s["D"], s["L"], s["N"], s["W"]

    print(f"ssmkit {ssmkit.__version__} demo ({size}: B={Bn} D={Dn} L={L} N={N} W={W})")
    if gpu:
        import cupy

        print(f"  device: {gpu_name} (CuPy {cupy.__version__}); inputs {dtype}, state/accumulation fp32; "
              f"errors against the float64 reference on the same rounded inputs")
        xp = cupy
    else:
        why = "--cpu given" if cpu else "no CUDA GPU visible to CuPy"
        print(f"  CPU ({why}): NumPy inputs run the float64 NumPy reference, so this demo ran the "
              f"reference itself; its comparison with a direct reference call is trivially exact")
        xp = np
    timer = _Timer(gpu, reps)
    rng = np.random.default_rng(0)
    dt = _np_dtype(dtype)

    def make(shape, scale=1.0, shift=0.0, as_dtype=dt):
        host = (rng.standard_normal(shape) * scale + shift).astype(as_dtype)
        return host, (xp.asarray(host) if gpu else host)

    failures: list[str] = []

    # ---- selective scan ----------------------------------------------------------------
    u_h, u = make((Bn, Dn, L))
    delta_h, delta = make((Bn, Dn, L), 0.5)
    z_h, z = make((Bn, Dn, L))
    B_h, Bv = make((Bn, N, L))
    C_h, Cv = make((Bn, N, L))
    dout_h, dout = make((Bn, Dn, L))
    A_h = -np.tile(np.arange(1, N + 1, dtype=np.float32), (Dn, 1))      # S4D-real style A
    A = xp.asarray(A_h) if gpu else A_h
    Dp_h, Dp = make((Dn,), as_dtype=np.float32)
    db_h = np.log(np.expm1(rng.uniform(1e-3, 1e-1, Dn))).astype(np.float32)   # dt in [1e-3, 0.1]
    db = xp.asarray(db_h) if gpu else db_h
    kw = dict(D=Dp, z=z, delta_bias=db, delta_softplus=True)

    print(f"\n  selective_scan  u/delta/z/dout {_shape(u)} {dtype}, A {_shape(A)} fp32, B/C {_shape(Bv)} "
          f"{dtype}, D/delta_bias ({Dn},) fp32, softplus")
    fwd = lambda: ssmkit.selective_scan_fwd(u, delta, A, Bv, Cv, **kw)  # noqa: E731
    (out, last, saved), t_first_f = _first_call(fwd, gpu)
    bwd = lambda: ssmkit.selective_scan_bwd(dout, u, delta, A, Bv, Cv, saved=saved, **kw)  # noqa: E731
    grads, t_first_b = _first_call(bwd, gpu)
    if gpu:
        print(f"    first call (compile, or load from the disk cache): forward {t_first_f:.2f} s, "
              f"backward {t_first_b:.2f} s")
    t_f, t_b = timer(fwd), timer(bwd)
    # GPU: the reference in float64 on the rounded inputs. CPU: the very same call, made directly.
    r = _f64 if gpu else (lambda v: v)
    a64 = [r(v) for v in (u_h, delta_h, A_h, B_h, C_h)]
    kw64 = dict(D=r(Dp_h), z=r(z_h), delta_bias=r(db_h), delta_softplus=True)
    want_out = ref.selective_scan(*a64, **kw64)
    want_grads = ref.selective_scan_bwd(r(dout_h), *a64, **kw64)
    print(f"    forward   {t_f:9.3f} ms/call")
    _report([("out", out, want_out)], dtype, failures)
    print(f"    backward  {t_b:9.3f} ms/call")
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
    _report([(n, g, w) for n, g, w in zip(names, grads, want_grads) if g is not None], dtype, failures)

    # ---- causal conv1d -----------------------------------------------------------------
    x_h, x = make((Bn, Dn, L))
    w_h, w = make((Dn, W), 0.5)
    b_h, b = make((Dn,), 0.1)
    cdout_h, cdout = make((Bn, Dn, L))
    print(f"\n  causal_conv1d  x/dout {_shape(x)} {dtype}, weight {_shape(w)} {dtype}, bias ({Dn},), silu")
    cf = lambda: ssmkit.causal_conv1d(x, w, b, activation="silu")  # noqa: E731
    cb = lambda: ssmkit.causal_conv1d_bwd(x, w, b, cdout, activation="silu")  # noqa: E731
    cout, t_first_f = _first_call(cf, gpu)
    cgrads, t_first_b = _first_call(cb, gpu)
    if gpu:
        print(f"    first call (compile, or load from the disk cache): forward {t_first_f:.2f} s, "
              f"backward {t_first_b:.2f} s")
    t_f, t_b = timer(cf), timer(cb)
    c64 = [r(v) for v in (x_h, w_h, b_h)]
    want_cout = ref.causal_conv1d(*c64, activation="silu")
    want_cgrads = ref.causal_conv1d_bwd(*c64, r(cdout_h), activation="silu")
    print(f"    forward   {t_f:9.3f} ms/call")
    _report([("out", cout, want_cout)], dtype, failures)
    print(f"    backward  {t_b:9.3f} ms/call")
    _report([(n, g, wnt) for n, g, wnt in zip(("dx", "dweight", "dbias"), cgrads, want_cgrads)
             if g is not None], dtype, failures)

    where = f"on the GPU ({gpu_name})" if gpu else "on the CPU (float64 reference path)"
    if failures:
        print(f"\nFAILED {where}: {', '.join(failures)} outside the demo's bound")
        return 1
    print(f"\nall outputs and gradients match the float64 reference, {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ssmkit-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="force the CPU (NumPy float64 reference) path")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: B=2 D=64 L=512 N=16 (default); large: B=4 D=1536 L=2048 N=16")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="GPU input dtype (default bfloat16 when ml_dtypes is installed, else float32)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per op (default 20 on GPU, 1 on CPU)")
    args = p.parse_args(argv)
    return run(size=args.size, cpu=args.cpu, dtype=args.dtype, reps=args.reps)


if __name__ == "__main__":
    sys.exit(main())

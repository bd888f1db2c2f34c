"""Upstream and ssmkit timed in the same process, on the anchor rows (benchmarks/anchors/h200.json).

The anchors were measured on another day, machine and driver; device runs differ by up to ~10%
(NOTES.md). This script builds upstream's extensions from .upstream/ (benchmarks/upstream_build.py;
the two builds run in parallel subprocesses, cached in --build-dir) and then times, row by row and
with the same inputs, the same CUDA-event median of whole Python calls for:

* ``upstream``: mamba_ssm's ``selective_scan_fn`` / causal_conv1d's ``causal_conv1d_fn`` and
  ``causal_conv1d_update`` (upstream's own Python, imported from .upstream/, over the built
  extensions; if that import fails, the extension called the same way by upstream_build's
  callables), mamba_ssm's Triton ``selective_state_update``;
* ``ssmkit``: the call that bench_selective_scan / bench_causal_conv1d / bench_decode time for the
  row (CuPy arrays, ssmkit's host API: the numbers NOTES.md compares with the anchors);
* ``ssmkit_torch``: ssmkit.torch's adapter with upstream's signature, on the same torch tensors
  (forward + backward through autograd, as upstream's rows).

Inputs come from those benchmark modules' own helpers (``make``, ``randn``, ``Rotation``) as CuPy
arrays; upstream gets torch views of the same memory (DLPack). Rows: fwd = one forward call;
fwdbwd = forward + backward (autograd for the torch paths: ``torch.autograd.grad`` over every input,
so no .grad accumulation); decode rows rotate over many states so L2 holds none of them.

Columns: upstream ms, ssmkit ms, ratio = upstream / ssmkit (higher is better for ssmkit), anchor ms,
ssmkit.torch ms and its ratio, anchor / upstream (how this card and run compare with the anchors').

    python3 benchmarks/bench_upstream_same_run.py --out $OUT --deadline 560
    python3 benchmarks/bench_upstream_same_run.py --cpu-check     # no GPU: sources, flags, rows

JSON: --out/upstream_same_run.json, rewritten after every row (a kill still leaves the rows so far).
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks import upstream_build as ub  # noqa: E402
from benchmarks.common import ANCHORS, environment, load_anchors  # noqa: E402

IMPLS = ("upstream", "ssmkit", "ssmkit_torch")
# What the rows reuse from ssmkit's own benchmarks (checked by --cpu-check).
HELPERS = {"benchmarks.bench_selective_scan": ["make"],
           "benchmarks.bench_causal_conv1d": ["_chlast", "ROTATE_BYTES", "MIN_BUFFERS", "MAX_BUFFERS",
                                              "UPDATE_STATE_LEN"],
           "benchmarks.bench_decode": ["Rotation", "bf16"],
           "benchmarks.common": ["randn", "time_cuda", "load_anchors", "environment"]}
CARRY_LIMIT = 64 << 20

_ROW_RES = [
    ("ss", re.compile(r"^ss_(fwd|fwdbwd) b(\d+) d(\d+) l(\d+) n(\d+) (bf16|fp32)$")),
    ("ss_ref", re.compile(r"^ss_ref_torch_fwd b(\d+) d(\d+) l(\d+) n(\d+) (bf16|fp32)$")),
    ("conv", re.compile(r"^conv_(fwd|fwd_chlast|fwdbwd|fwdbwd_chlast) b(\d+) d(\d+) l(\d+) w(\d+) (bf16|fp32)$")),
    ("ssu", re.compile(r"^ssu_step b(\d+) d(\d+) n(\d+)$")),
    ("conv_update", re.compile(r"^conv_update b(\d+) d(\d+) w(\d+)$")),
    ("copy", re.compile(r"^copy_\w*rw$")),
]


def parse_row(name: str) -> dict | None:
    """The anchor row name -> what to run (None: a row this script does not know)."""
    for kind, rx in _ROW_RES:
        m = rx.match(name)
        if not m:
            continue
        g = m.groups()
        if kind == "ss":
            return {"kind": kind, "mode": g[0], "B": int(g[1]), "D": int(g[2]), "L": int(g[3]), "N": int(g[4]),
                    "dtype": g[5]}
        if kind == "ss_ref":
            return {"kind": kind, "B": int(g[0]), "D": int(g[1]), "L": int(g[2]), "N": int(g[3]), "dtype": g[4]}
        if kind == "conv":
            return {"kind": kind, "mode": g[0], "B": int(g[1]), "D": int(g[2]), "L": int(g[3]), "W": int(g[4]),
                    "dtype": g[5]}
        if kind == "ssu":
            return {"kind": kind, "B": int(g[0]), "D": int(g[1]), "N": int(g[2])}
        if kind == "conv_update":
            return {"kind": kind, "B": int(g[0]), "D": int(g[1]), "W": int(g[2])}
        return {"kind": kind}
    return None


def anchor_rows() -> list[tuple[str, float]]:
    data = json.loads(ANCHORS.read_text())
    return [(r["name"], r["ms"]) for r in data.get("results", [])]


# ---------------------------------------------------------------------------------------------
# inputs: ssmkit's benchmark helpers (CuPy), torch views of the same memory
# ---------------------------------------------------------------------------------------------

def to_torch(a):
    """Torch tensor sharing ``a``'s memory (bf16 through an int16 view: DLPack-safe)."""
    import cupy
    import torch

    if str(a.dtype) == "bfloat16":
        return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def _grad_runner(fn, leaves, dout, **kw):
    import torch

    def run():
        out = fn(*leaves, **kw)
        return torch.autograd.grad(out, leaves, dout)

    return run


def case_ss(spec, up):
    import cupy
    import ssmkit
    import ssmkit.torch as st

    from benchmarks.bench_selective_scan import make

    args, kw, _ = make(spec["B"], spec["D"], spec["L"], spec["N"], spec["dtype"], full=True)
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    arrays = {**args, **{k: kw[k] for k in ("D", "z", "delta_bias")}}
    T = [to_torch(arrays[k]) for k in order]
    fns = {}
    if spec["mode"] == "fwd":
        fns["ssmkit"] = lambda: ssmkit.selective_scan(**args, **kw)
        if up.get("selective_scan"):
            fns["upstream"] = lambda: up["selective_scan"](*T, delta_softplus=True)
        fns["ssmkit_torch"] = lambda: st.selective_scan_fn(*T, delta_softplus=True)
        return fns, (args, kw, T)
    shape = (spec["B"], spec["D"], spec["L"])
    dout = cupy.asarray(cupy.random.default_rng(1).standard_normal(shape, dtype=cupy.float32)).astype(args["u"].dtype)
    dout_t = to_torch(dout)

    def ssmkit_fwdbwd():
        out, last, saved = ssmkit.selective_scan_fwd(**args, **kw)
        return ssmkit.selective_scan_bwd(dout, **args, **kw, saved=saved)

    fns["ssmkit"] = ssmkit_fwdbwd
    leaves = [t.detach().requires_grad_() for t in T]
    if up.get("selective_scan"):
        fns["upstream"] = _grad_runner(up["selective_scan"], leaves, dout_t, delta_softplus=True)
    fns["ssmkit_torch"] = _grad_runner(st.selective_scan_fn, leaves, dout_t, delta_softplus=True)
    return fns, (args, kw, T, dout, leaves)


def case_ss_ref(spec, up):
    from benchmarks.bench_selective_scan import make

    args, kw, _ = make(spec["B"], spec["D"], spec["L"], spec["N"], spec["dtype"], full=True)
    T = [to_torch({**args, **kw}[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    fns = {}
    if up.get("selective_scan_ref"):
        fns["upstream"] = lambda: up["selective_scan_ref"](*T, delta_softplus=True)
    return fns, (args, kw, T)


def case_conv(spec, up):
    import ssmkit
    import ssmkit.torch as st

    from benchmarks.bench_causal_conv1d import _chlast
    from benchmarks.common import randn

    B, D, L, W = spec["B"], spec["D"], spec["L"], spec["W"]
    dt = {"bf16": "bfloat16", "fp32": "float32"}[spec["dtype"]]
    chlast = spec["mode"].endswith("chlast")
    weight = randn((D, W), dt, 1.0 / math.sqrt(W))
    bias = randn((D,), dt)
    x = _chlast((B, D, L), dt) if chlast else randn((B, D, L), dt)
    xt, wt, bt = to_torch(x), to_torch(weight), to_torch(bias)
    fns = {}
    if spec["mode"].startswith("fwdbwd"):
        dout = _chlast((B, D, L), dt) if chlast else randn((B, D, L), dt)
        dout_t = to_torch(dout)

        def ssmkit_fwdbwd():
            ssmkit.causal_conv1d(x, weight, bias, activation="silu")
            return ssmkit.causal_conv1d_bwd(x, weight, bias, dout, activation="silu")

        fns["ssmkit"] = ssmkit_fwdbwd
        leaves = [t.detach().requires_grad_() for t in (xt, wt, bt)]
        if up.get("causal_conv1d_fn"):
            fns["upstream"] = _grad_runner(up["causal_conv1d_fn"], leaves, dout_t, activation="silu")
        fns["ssmkit_torch"] = _grad_runner(st.causal_conv1d_fn, leaves, dout_t, activation="silu")
        return fns, (x, weight, bias, dout, leaves)
    fns["ssmkit"] = lambda: ssmkit.causal_conv1d(x, weight, bias, activation="silu")
    if up.get("causal_conv1d_fn"):
        fns["upstream"] = lambda: up["causal_conv1d_fn"](xt, wt, bt, activation="silu")
    fns["ssmkit_torch"] = lambda: st.causal_conv1d_fn(xt, wt, bt, activation="silu")
    return fns, (x, weight, bias)


def _cycle(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def case_conv_update(spec, up):
    import ssmkit
    import ssmkit.torch as st

    from benchmarks.bench_causal_conv1d import MAX_BUFFERS, MIN_BUFFERS, ROTATE_BYTES, UPDATE_STATE_LEN
    from benchmarks.common import randn

    B, D, W = spec["B"], spec["D"], spec["W"]
    S = UPDATE_STATE_LEN
    per = B * D * S * 2
    n = max(MIN_BUFFERS, min(MAX_BUFFERS, math.ceil(ROTATE_BYTES / per)))
    big = randn((n, B, D, S), "bfloat16")
    states = [big[i] for i in range(n)]
    states_t = [to_torch(s) for s in states]
    x = randn((B, D), "bfloat16")
    weight = randn((D, W), "bfloat16", 0.5)
    bias = randn((D,), "bfloat16")
    xt, wt, bt = to_torch(x), to_torch(weight), to_torch(bias)
    nxt, nxt_u, nxt_t = _cycle(states), _cycle(states_t), _cycle(states_t)
    fns = {"ssmkit": lambda: ssmkit.causal_conv1d_update(x, nxt(), weight, bias, activation="silu"),
           "ssmkit_torch": lambda: st.causal_conv1d_update(xt, nxt_t(), wt, bt, activation="silu")}
    if up.get("causal_conv1d_update"):
        fns["upstream"] = lambda: up["causal_conv1d_update"](xt, nxt_u(), wt, bt, activation="silu")
    return fns, (big, states, states_t, x, weight, bias)


def case_ssu(spec, up):
    import ssmkit
    import ssmkit.torch as st

    from benchmarks.bench_decode import ssu_inputs

    states, x, dt, A, Bm, Cm, kw = ssu_inputs(spec["B"], spec["D"], spec["N"])
    Dv, z, bias, out = kw["D"], kw["z"], kw["dt_bias"], kw["out"]
    T = {k: to_torch(v) for k, v in dict(x=x, dt=dt, A=A, B=Bm, C=Cm, D=Dv, z=z, dt_bias=bias).items()}
    states_t = [to_torch(s) for s in states.buffers]
    nxt_u, nxt_t = _cycle(states_t), _cycle(states_t)
    targs = (T["x"], T["dt"], T["A"], T["B"], T["C"])
    tkw = dict(D=T["D"], z=T["z"], dt_bias=T["dt_bias"], dt_softplus=True)
    fns = {"ssmkit": lambda: ssmkit.selective_state_update(states.next(), x, dt, A, Bm, Cm, **kw),
           "ssmkit_torch": lambda: st.selective_state_update(nxt_t(), *targs, **tkw)}
    if up.get("selective_state_update"):
        fns["upstream"] = lambda: up["selective_state_update"](nxt_u(), *targs, **tkw)
    return fns, (states, states_t, T, x, dt, z, Bm, Cm, A, Dv, bias, out)


def case_copy(spec, up):
    import cupy

    n = (2 << 30) // 4                  # 2 GiB each way: 4 GiB moved, as the anchor row's GB/s x ms
    src = cupy.empty(n, cupy.float32)
    dst = cupy.empty_like(src)
    src.fill(1.0)
    src_t, dst_t = to_torch(src), to_torch(dst)
    return {"upstream": lambda: dst_t.copy_(src_t), "ssmkit": lambda: cupy.copyto(dst, src)}, (src, dst, src_t, dst_t)


CASES = {"ss": case_ss, "ss_ref": case_ss_ref, "conv": case_conv, "conv_update": case_conv_update,
         "ssu": case_ssu, "copy": case_copy}


# ---------------------------------------------------------------------------------------------
# upstream: builds (subprocesses, in parallel) and the callables
# ---------------------------------------------------------------------------------------------

class Builds:
    """Both extensions built in parallel subprocesses (each its own process group, killed at the
    deadline), then loaded in this process from the build folder (ninja finds them up to date)."""

    def __init__(self, build_dir: Path, arch: str, full: bool):
        self.build_dir, self.arch, self.full = build_dir, arch, full
        self.procs, self.info = {}, {}

    def start(self):
        self.build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1), PYTHONUNBUFFERED="1")
        for kind in ("causal_conv1d", "selective_scan"):
            log = self.build_dir / f"{kind}.log"
            cmd = [sys.executable, str(HERE / "upstream_build.py"), "--kind", kind, "--build-dir", str(self.build_dir),
                   "--arch", self.arch] + (["--full"] if self.full else [])
            fh = open(log, "w")
            self.procs[kind] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                                                 start_new_session=True), fh, time.perf_counter(), log)
            print(f"build started: {kind} (log {log})", flush=True)

    def running(self) -> bool:
        return any(p.poll() is None for p, *_ in self.procs.values())

    def wait(self, until: float):
        for kind, (p, fh, t0, log) in self.procs.items():
            try:
                p.wait(timeout=max(1.0, until - time.monotonic()))
                status = "ok" if p.returncode == 0 else f"failed (rc {p.returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)       # the build's own process group (nvcc, ninja)
                p.wait()
                status = "killed at the deadline"
            fh.close()
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            self.info[kind] = {"status": status, "wall_s": round(time.perf_counter() - t0, 1), "log_tail": tail}
            print(f"build {kind}: {status} after {self.info[kind]['wall_s']} s", flush=True)
            if status != "ok":
                print(tail[-1500:], flush=True)

    def load(self) -> dict:
        mods = {}
        for kind, info in self.info.items():
            if info["status"] != "ok":
                continue
            try:
                t0 = time.perf_counter()
                mods[kind] = ub.build(kind, self.build_dir, self.arch, full=self.full)
                info["load_s"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:
                traceback.print_exc()
                info["status"] = f"load failed: {type(exc).__name__}: {exc}"
        return mods


def upstream_callables(mods: dict, direct: bool) -> tuple[dict, dict]:
    """{role: callable} for the rows, and {role: where it came from or why it is missing}."""
    up, where = {}, {}

    def attempt(role, fn, label):
        try:
            up[role] = fn()
            where[role] = label
        except Exception as exc:
            where[f"{role} <- {label}"] = f"unavailable: {type(exc).__name__}: {exc}"[:500]
            print(f"upstream {role} <- {label}: {type(exc).__name__}: {exc}", flush=True)

    if "selective_scan" in mods:
        if not direct:
            attempt("selective_scan", ub.upstream_selective_scan_fn, "mamba_ssm selective_scan_fn (upstream Python)")
            attempt("selective_scan_ref", lambda: _interface_attr("selective_scan_ref"),
                    "mamba_ssm selective_scan_ref (upstream Python)")
        if "selective_scan" not in up:
            attempt("selective_scan", ub.upstream_selective_scan, "selective_scan_cuda.fwd/.bwd via upstream_build")
    else:
        where["selective_scan"] = "not built"
    if "causal_conv1d" in mods:
        if not direct:
            attempt("causal_conv1d_fn", lambda: ub.upstream_causal_conv1d_python().causal_conv1d_fn,
                    "causal_conv1d.causal_conv1d_fn (upstream Python)")
            attempt("causal_conv1d_update", lambda: ub.upstream_causal_conv1d_python().causal_conv1d_update,
                    "causal_conv1d.causal_conv1d_update (upstream Python)")
        if "causal_conv1d_fn" not in up:
            attempt("causal_conv1d_fn", _direct_conv_fn, "causal_conv1d_cuda via upstream_build (autograd here)")
        if "causal_conv1d_update" not in up:
            attempt("causal_conv1d_update", ub.upstream_causal_conv1d_update_raw, "causal_conv1d_cuda.causal_conv1d_update")
    else:
        where["causal_conv1d_fn"] = where["causal_conv1d_update"] = "not built"
    attempt("selective_state_update", ub.upstream_selective_state_update, "mamba_ssm Triton selective_state_update")
    return up, where


def _interface_attr(name):
    return getattr(sys.modules["mamba_ssm.ops.selective_scan_interface"], name)


def _direct_conv_fn():
    """causal_conv1d_fn(x, weight, bias, activation) over the extension's fwd/bwd (upstream's
    Python package could not be imported)."""
    import torch

    fwd, bwd = ub.upstream_causal_conv1d_fwd(), ub.upstream_causal_conv1d_bwd()

    class _Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, activation):
            ctx.save_for_backward(x, weight, bias)
            ctx.activation = activation
            return fwd(x, weight, bias, activation)

        @staticmethod
        def backward(ctx, dout):
            x, weight, bias = ctx.saved_tensors
            dx, dw, db = bwd(x, weight, bias, dout, ctx.activation)
            return dx, dw, db, None

    return lambda x, weight, bias=None, activation=None: _Conv.apply(x, weight, bias, activation)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def _free():
    import cupy
    import torch

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def run_row(name, spec, anchor_ms, up, warmup, iters, impls=IMPLS) -> dict:
    from benchmarks.common import time_cuda

    r = {"name": name, "anchor_ms": anchor_ms}
    try:
        fns, keep = CASES[spec["kind"]](spec, up)
    except Exception as exc:
        traceback.print_exc()
        r["error"] = f"setup: {type(exc).__name__}: {exc}"[:500]
        return r
    for impl in impls:
        fn = fns.get(impl)
        if fn is None:
            continue
        try:
            r[f"{impl}_ms"] = round(time_cuda(fn, warmup=warmup, iters=iters), 5)
        except Exception as exc:
            traceback.print_exc()
            r[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:500]
    del fns, keep
    _free()
    u, s, t = r.get("upstream_ms"), r.get("ssmkit_ms"), r.get("ssmkit_torch_ms")
    if u and s:
        r["ratio"] = round(u / s, 3)
    if u and t:
        r["ratio_torch"] = round(u / t, 3)
    if u and anchor_ms:
        r["anchor_over_upstream"] = round(anchor_ms / u, 3)
    return r


def prewarm(rows, up, until_fn):
    """While upstream builds: one call of each ssmkit path per row (NVRTC compiles, disk cache)."""
    done = 0
    for name, spec, _ in rows:
        if not until_fn():
            break
        if spec["kind"] in ("copy", "ss_ref"):
            continue
        try:
            fns, keep = CASES[spec["kind"]](spec, up)
            for impl in ("ssmkit", "ssmkit_torch"):
                if impl in fns:
                    fns[impl]()
            del fns, keep
            _free()
            done += 1
        except Exception as exc:
            print(f"prewarm {name}: {type(exc).__name__}: {exc}", flush=True)
    return done


def summary(results) -> dict:
    """Geometric means of the ratios per row family (the name's first word)."""
    groups: dict[str, dict] = {}
    for r in results:
        g = groups.setdefault(r["name"].split()[0], {"rows": 0})
        g["rows"] += 1
        for k in ("ratio", "ratio_torch", "anchor_over_upstream"):
            if isinstance(r.get(k), (int, float)) and r[k] > 0:
                g.setdefault("_" + k, []).append(math.log(r[k]))
    for g in groups.values():
        for k in ("ratio", "ratio_torch", "anchor_over_upstream"):
            logs = g.pop("_" + k, None)
            if logs:
                g[k] = round(math.exp(sum(logs) / len(logs)), 3)
    return groups


def _fmt(v, f="10.4f"):
    if isinstance(v, (int, float)):
        return format(v, f)
    width = re.match(r"\d*", f).group()
    return "-".rjust(int(width)) if width else "-"


HEADER = (f"{'row':44s} {'upstream':>10s} {'ssmkit':>10s} {'ratio':>7s} {'anchor':>10s} "
          f"{'ssmkit.torch':>12s} {'ratio_t':>7s} {'anc/up':>7s}")


def row_line(r) -> str:
    err = "  ERR " + "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("error"))[:200] \
        if any(k.endswith("error") for k in r) else ""
    return (f"{r['name']:44s} {_fmt(r.get('upstream_ms'))} {_fmt(r.get('ssmkit_ms'))} {_fmt(r.get('ratio'), '7.3f')} "
            f"{_fmt(r.get('anchor_ms'))} {_fmt(r.get('ssmkit_torch_ms'), '12.4f')} {_fmt(r.get('ratio_torch'), '7.3f')} "
            f"{_fmt(r.get('anchor_over_upstream'), '7.3f')}{err}")


def versions_meta() -> dict:
    meta = {"upstream": {}}
    for kind in ub.KINDS:
        try:
            meta["upstream"][ub.KINDS[kind]["package"]] = ub.version_of(kind)
        except Exception as exc:
            meta["upstream"][ub.KINDS[kind]["package"]] = f"missing: {exc}"
    for mod in ("torch", "triton"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as exc:
            meta[mod] = f"unavailable: {type(exc).__name__}"
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        meta["cuda_home"] = CUDA_HOME
        out = subprocess.run([str(Path(CUDA_HOME) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        meta["nvcc"] = out.strip().splitlines()[-1] if out.strip() else None
    except Exception as exc:
        meta["nvcc"] = f"unavailable: {type(exc).__name__}"
    return meta


# ---------------------------------------------------------------------------------------------
# CPU check
# ---------------------------------------------------------------------------------------------

def cpu_check(arch: str) -> int:
    ok = True
    print(f"upstream sources: {ub.UPSTREAM}")
    versions = ub.UPSTREAM / "VERSIONS.txt"
    print(f"  VERSIONS.txt: {'present' if versions.is_file() else 'MISSING'}")
    total = sum(f.stat().st_size for f in ub.UPSTREAM.rglob("*") if f.is_file()) if ub.UPSTREAM.is_dir() else 0
    print(f"  size {total / 2**20:.2f} MiB (carry limit 64 MiB, shared with anything else carried)")
    if total > CARRY_LIMIT:
        ok = False
        print("  TOO LARGE to carry")
    with tempfile.TemporaryDirectory(prefix="upstream_gen_") as tmp:
        for kind in ub.KINDS:
            try:
                print(ub.describe(kind, arch, gen_dir=Path(tmp) / kind))
                for f in sorted((Path(tmp) / kind).iterdir()):
                    print(f"    generated {f.name}: {len(f.read_text().splitlines())} lines")
            except Exception as exc:
                ok = False
                print(f"{kind}: {type(exc).__name__}: {exc}")
    py_files = []
    for kind, rel in (("selective_scan", "mamba_ssm/ops/triton/selective_state_update.py"),
                      ("selective_scan", "mamba_ssm/ops/triton/softplus.py"),
                      ("selective_scan", "mamba_ssm/ops/triton/layer_norm.py"),
                      ("selective_scan", "mamba_ssm/ops/selective_scan_interface.py"),
                      ("selective_scan", "mamba_ssm/utils/torch.py"),
                      ("selective_scan", "mamba_ssm/utils/determinism.py"),
                      ("causal_conv1d", "causal_conv1d/__init__.py"),
                      ("causal_conv1d", "causal_conv1d/causal_conv1d_interface.py"),
                      ("causal_conv1d", "causal_conv1d/cpp_functions.py")):
        try:
            py_files.append(ub.source_root(kind) / rel)
        except FileNotFoundError as exc:
            ok = False
            print(exc)
    for f in py_files:
        try:
            tree = ast.parse(f.read_text(), str(f))
            defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            print(f"  ast ok: {f.relative_to(ub.UPSTREAM)} ({len(defs)} top-level defs)")
        except (OSError, SyntaxError) as exc:
            ok = False
            print(f"  ast FAILED: {f}: {exc}")
    ssu = ub.source_root("selective_scan") / "mamba_ssm/ops/triton/selective_state_update.py"
    if ssu.is_file() and "def selective_state_update(" not in ssu.read_text():
        ok = False
        print("  selective_state_update() not defined in the Triton file")
    # the benchmark helpers reused for the inputs (importable without a GPU)
    import importlib

    for module, names in HELPERS.items():
        mod = importlib.import_module(module)
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            ok = False
        print(f"  helpers from {module}: {'ok' if not missing else 'MISSING ' + ', '.join(missing)}")
    print(f"anchor rows ({ANCHORS}):")
    for name, ms in anchor_rows():
        spec = parse_row(name)
        impls = "upstream only" if spec and spec["kind"] == "ss_ref" else \
            ("torch copy / CuPy copy" if spec and spec["kind"] == "copy" else ", ".join(IMPLS))
        print(f"  {name:44s} {ms:9.4f} ms  -> {spec['kind'] + ': ' + impls if spec else 'UNKNOWN (skipped)'}")
    print("device command: python3 benchmarks/bench_upstream_same_run.py --out $OUT --deadline 560  "
          "(carry [\".upstream\"])")
    print("cpu-check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for upstream_same_run.json")
    ap.add_argument("--build-dir", default="/tmp/upstream_build")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds from start: stop building/timing in time and still write the JSON (0: none)")
    ap.add_argument("--arch", default=None, help="sm arch without the dot (default: the GPU's)")
    ap.add_argument("--rows", default=None, help="regex: only anchor rows whose name matches")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--full", action="store_true", help="build upstream's whole dtype list (slower)")
    ap.add_argument("--direct", action="store_true",
                    help="call the extensions through upstream_build's callables, not upstream's Python")
    ap.add_argument("--no-prewarm", action="store_true", help="do not compile ssmkit's kernels during the builds")
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: sources, flags, rows; exit 0 when all is in place")
    a = ap.parse_args(argv)
    if a.cpu_check:
        return cpu_check(a.arch or "90")

    t_start = time.monotonic()
    end = t_start + a.deadline if a.deadline > 0 else float("inf")
    left = lambda: end - time.monotonic()  # noqa: E731
    out_path = Path(a.out) / "upstream_same_run.json"
    anchors = load_anchors()
    rows = []
    for name, ms in anchor_rows():
        spec = parse_row(name)
        if spec is None:
            print(f"unknown anchor row, skipped: {name}")
            continue
        if a.rows and not re.search(a.rows, name):
            continue
        rows.append((name, spec, anchors.get(name)))

    import cupy
    import torch

    arch = a.arch or "".join(map(str, torch.cuda.get_device_capability()))
    meta = {"arch": arch, "deadline_s": a.deadline or None, "warmup": a.warmup, "iters": a.iters,
            "timing": "benchmarks.common.time_cuda: CUDA events around each Python call, median",
            "ratio": "upstream_ms / ssmkit_ms (ssmkit = the CuPy host API call of the matching benchmark)",
            "ratio_torch": "upstream_ms / ssmkit_torch_ms (ssmkit.torch adapter, same torch tensors)",
            "anchor_over_upstream": "anchor_ms / upstream_ms: this run's upstream against the anchors' upstream",
            **versions_meta(), "skipped": []}
    streams = (torch.cuda.current_stream().cuda_stream, cupy.cuda.get_current_stream().ptr)
    meta["streams"] = {"torch": streams[0], "cupy": streams[1]}
    if streams != (0, 0):
        print(f"WARNING: torch/CuPy current streams are {streams}, not both the legacy default stream", flush=True)
    results: list[dict] = []
    env = environment()
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        meta["summary"] = summary(results)
        out_path.write_text(json.dumps({"env": env, "meta": meta, "results": results}, indent=1))

    save()
    builds = Builds(Path(a.build_dir), arch, a.full)
    builds.start()
    reserve = 30.0 + 2.0 * len(rows)   # the rows need at least this much after the builds
    if not a.no_prewarm:
        t0 = time.perf_counter()
        n = prewarm(rows, {}, lambda: builds.running() and left() > reserve)
        meta["prewarm"] = {"rows": n, "s": round(time.perf_counter() - t0, 1)}
        print(f"ssmkit prewarm: {n} rows in {meta['prewarm']['s']} s", flush=True)
    builds.wait(until=min(end - reserve, time.monotonic() + 3600))
    mods = builds.load()
    meta["builds"] = builds.info
    up, where = upstream_callables(mods, a.direct)
    meta["upstream_paths"] = where
    save()

    print(HEADER)
    print("-" * len(HEADER))
    for name, spec, anchor_ms in rows:
        if left() < 10:
            meta["skipped"].append(name)
            continue
        r = run_row(name, spec, anchor_ms, up, a.warmup, a.iters)
        results.append(r)
        print(row_line(r), flush=True)
        save()
    if meta["skipped"]:
        print(f"deadline: {len(meta['skipped'])} rows not timed: {', '.join(meta['skipped'])}")
    for group, g in summary(results).items():
        print(f"{group:18s} rows {g['rows']:2d}  geomean ratio {_fmt(g.get('ratio'), '.3f')}  "
              f"ratio_torch {_fmt(g.get('ratio_torch'), '.3f')}  anchor/upstream {_fmt(g.get('anchor_over_upstream'), '.3f')}")
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    print(f"wrote {out_path} ({len(results)} rows, {meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

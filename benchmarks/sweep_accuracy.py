#!/usr/bin/env python3
"""Accuracy sweep (issue 13, item 2): ssmkit against a float64 truth over a grid like upstream
mamba_ssm's own test_selective_scan, widened.

    python benchmarks/sweep_accuracy.py --out DIR              # the GPU sweep (CuPy + torch CUDA)
    python benchmarks/sweep_accuracy.py --out DIR --quick      # a few seqlens, two flag sets
    python benchmarks/sweep_accuracy.py --out DIR --cpu-smoke  # NumPy arrays stand in for the GPU

What runs, per op (float16 / bfloat16 / float32 inputs; weights fp32 / complex64):

* selective scan (``ssmkit.selective_scan_fwd`` + ``selective_scan_bwd`` on CuPy arrays), real and
  complex A, seqlen in ``SCAN_SEQLENS`` (upstream's commented-out full list, plus 1). Per (dtype,
  real/complex, seqlen): a pairwise covering set of the flag combinations (``pairwise_cover``:
  every pair of values of two flags appears in at least one row), plus all-on and all-off. Flags:
  D, z, delta_bias, delta_softplus, return_last_state (with a dlast_state gradient), variable B,
  variable C, groups 1/2 (variable B/C), initial_state (ours), upstream's input distribution or a
  wide one, deterministic backward.
* mamba_inner_fn (``ssmkit.torch``, CUDA against the same weights on the CPU in float64), causal
  conv1d forward + backward (widths 2, 3, 4, 8; seq_idx; initial/final states; channel-first/last;
  weights in x's dtype or fp32), selective_state_update (Mamba-1/2, the decode step's dtype
  combinations, tied heads, pools with padding, 1 or 4 steps) and causal_conv1d_update: smaller
  pairwise grids.

Inputs are fresh random values rounded to the dtype the kernel reads BEFORE the reference sees
them: the float64 reference computes on exactly the rounded values, so an error measured here is
ssmkit's, not the inputs' rounding.

Per (op, dtype, kind, output or gradient) the report gives the largest relative error
|got - want| / max(|want|, rms(want)), the case that produced it, the largest error over the
tolerance (``err/tol`` <= 1 passes) and the count of cases that miss it, for two criteria:

* ours: tests/compare.py's TOL by the dtype the tests judge that output at (the same choices as
  tests/test_<op>.py), gradients x GRAD_FACTOR (3); conv dweight/dbias x sqrt(B L / 64) as
  tests/test_causal_conv1d.py; element limit atol + rtol max(|want|, rms(want));
* upstream: the numbers in upstream's own tests (``UPSTREAM``), element limit atol + rtol |want|
  (torch.allclose). Upstream's reference is not float64, and upstream asserts only some outputs
  (n/a where it asserts none).

A miss of a case with 16-bit inputs (a float16/bfloat16 case, or fp32 x with a 16-bit SSM state
or conv weight) is re-run with a diagnostic: the same case with every 16-bit input widened to
float32 (the same values; a 16-bit SSM state is kept: it is the decode step's storage), its results
rounded to the dtypes the 16-bit run stores them in. The miss is then

* "fp16 range": a value stored in float16 (an output, a gradient, or the scan's saved un-gated
  output) reaches 65504 in the truth, or the result overflowed to inf (with values past 32752);
* "input/output rounding": fp32 arithmetic on the same inputs, rounded as the 16-bit run stores
  its results, misses too: the 16-bit storage itself cannot meet the tolerance;
* "ours": fp32 arithmetic would have passed: the 16-bit run computes worse than that (for the
  scan with z this includes the un-gated output kept in u's dtype for the backward, as upstream;
  for mamba_inner_fn the 16-bit intermediates between its ops, as upstream's composition).

Cases run in a spawn ``multiprocessing.Pool`` (one process per core): each process computes the
float64 truth, runs the kernel and diagnoses its cases; the cases are ordered round-robin over the
kernel variants they need, so the processes compile different variants at the start (the compile
lock in ssmkit._compile makes a second process wait for, then load, a variant another one builds).
``--time-limit`` stops handing out cases (results so far are written, marked incomplete).

Files under --out: results.json (every case's errors, the summary rows, the diagnosed misses)
and sweep.md (the tables). A short summary is printed. Exit status 1 if a case raised.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from compare import GRAD_FACTOR, TOL  # noqa: E402  (the project's one tolerance table)

# ---------------------------------------------------------------- grids

DTYPES = ("float32", "float16", "bfloat16")
HALF = ("float16", "bfloat16")
FP16_MAX = 65504.0
# Upstream test_selective_scan's full seqlen list (commented out there in favour of a short one), plus 1.
SCAN_SEQLENS = (1, 8, 16, 32, 64, 128, 256, 372, 512, 784, 1024, 1134, 2048, 4096)
CONV_SEQLENS = (1, 8, 129, 372, 1134, 4096)
INNER_SEQLENS = (16, 256, 1134)
QUICK = dict(scan=(8, 372, 2048), conv=(8, 1134), inner=(128,))
SMOKE = dict(scan=(1, 9, 40), conv=(1, 9, 40), inner=(12,))
OPS = ("selective_scan", "mamba_inner_fn", "causal_conv1d", "selective_state_update", "causal_conv1d_update")
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

B01 = (False, True)
SCAN_FACTORS = {"D": B01, "z": B01, "delta_bias": B01, "softplus": B01, "last_state": B01, "var_B": B01,
                "var_C": B01, "groups": (1, 2), "initial_state": B01, "inputs": ("upstream", "wide"),
                "deterministic": B01}
SCAN_ON = dict(D=True, z=True, delta_bias=True, softplus=True, last_state=True, var_B=True, var_C=True, groups=2,
               initial_state=True, inputs="upstream", deterministic=True)
SCAN_OFF = dict(D=False, z=False, delta_bias=False, softplus=False, last_state=False, var_B=False, var_C=False,
                groups=1, initial_state=False, inputs="upstream", deterministic=False)

CONV_FACTORS = {"width": (2, 3, 4, 8), "seq_idx": B01, "initial_states": B01, "final_states": B01,
                "layout": ("cf", "cl"), "bias": B01, "silu": B01, "weight": ("x", "float32")}
CONV_ON = dict(width=4, seq_idx=True, initial_states=True, final_states=True, layout="cl", bias=True, silu=True,
               weight="float32")
CONV_OFF = dict(width=4, seq_idx=False, initial_states=False, final_states=False, layout="cf", bias=False,
                silu=False, weight="x")

INNER_FACTORS = {"var_B": B01, "var_C": B01, "ckpt": (0, 1), "out_bias": B01, "width": (2, 3, 4), "D": B01,
                 "delta_bias": B01}
INNER_ON = dict(var_B=True, var_C=True, ckpt=1, out_bias=True, width=4, D=True, delta_bias=True)
INNER_OFF = dict(var_B=False, var_C=False, ckpt=0, out_bias=False, width=4, D=False, delta_bias=False)

# "other16": the other 16-bit dtype (bf16 for fp32 / fp16 x, fp16 for bf16 x).
SSU_FACTORS = {"mamba": (1, 2), "state": ("float32", "x", "other16"), "bc": ("x", "float32"),
               "D": ("none", "float32", "x"), "dt_bias": ("none", "float32", "x"), "z": B01, "softplus": B01,
               "indices": ("none", "perm", "pad"), "tie": B01, "steps": (1, 4)}
SSU_ON = dict(mamba=2, state="float32", bc="x", D="x", dt_bias="float32", z=True, softplus=True, indices="pad",
              tie=True, steps=4)
SSU_OFF = dict(mamba=1, state="x", bc="x", D="none", dt_bias="none", z=False, softplus=False, indices="none",
               tie=False, steps=1)

UPD_FACTORS = {"width": (2, 3, 4, 8), "state": ("x", "float32"), "weight": ("x", "float32", "other16"),
               "new": ("2d", 1, 4), "extra_state": B01, "cache_seqlens": B01, "indices": ("none", "perm", "pad"),
               "bias": B01, "silu": B01}
UPD_ON = dict(width=4, state="float32", weight="float32", new=4, extra_state=True, cache_seqlens=True,
              indices="pad", bias=True, silu=True)
UPD_OFF = dict(width=4, state="x", weight="x", new="2d", extra_state=False, cache_seqlens=False, indices="none",
               bias=False, silu=False)


def pairwise_cover(factors: dict, valid=lambda c: True, seed: int = 0) -> list[dict]:
    """A small set of rows (dicts factor -> value) in which every pair of values of two factors
    that some valid row holds appears at least once. Greedy: repeatedly take the valid row that
    covers the most uncovered pairs (ties broken by a permutation seeded with ``seed``)."""
    names = list(factors)
    rows = [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    rows = [r for r in rows if valid(r)]
    # Row x pair incidence: column (a, b, value index of a, value index of b) for factors a < b.
    level = np.array([[factors[n].index(r[n]) for n in names] for r in rows])
    sizes = [len(factors[n]) for n in names]
    cols = []
    for i, j in itertools.combinations(range(len(names)), 2):
        cols.append(level[:, i] * sizes[j] + level[:, j] + sum(
            sizes[a] * sizes[b] for a, b in itertools.combinations(range(len(names)), 2) if (a, b) < (i, j)))
    cols = np.stack(cols, axis=1)                               # (rows, pairs of factors)
    total = sum(sizes[a] * sizes[b] for a, b in itertools.combinations(range(len(names)), 2))
    hit = np.zeros((len(rows), total), bool)
    hit[np.arange(len(rows))[:, None], cols] = True
    need = hit.any(axis=0)                                      # pairs some valid row holds
    order = np.random.default_rng(seed).permutation(len(rows))
    hit = hit[order]
    out = []
    while need.any():
        best = int(np.argmax(hit[:, need].sum(axis=1)))         # first maximum in the seeded order
        out.append(rows[order[best]])
        need &= ~hit[best]
    return out


def _crc(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _other16(dt: str) -> str:
    return "float16" if dt == "bfloat16" else "bfloat16"


def _flags(row: dict) -> str:
    def v(x):
        return {True: "1", False: "0"}.get(x, str(x))
    return ",".join(f"{k}={v(x)}" for k, x in row.items())


def _rows(factors, on, off, valid, seed, quick):
    rows = [] if quick else pairwise_cover(factors, valid, seed)
    for extra in (on, off):
        if extra not in rows:
            rows.append(extra)
    return rows


def build_cases(ops, dtypes, quick=False, smoke=False, seqlens=None) -> list[dict]:
    """Every case of the sweep: dicts of JSON scalars (op, dtype, kind, seqlen, flags, seed, id)."""
    lens = SMOKE if smoke else QUICK if quick else dict(scan=SCAN_SEQLENS, conv=CONV_SEQLENS, inner=INNER_SEQLENS)
    if seqlens:
        lens = dict(scan=seqlens, conv=seqlens, inner=seqlens)
    cases = []

    def add(op, dtype, kind, L, row):
        cid = f"{op}:{SHORT[dtype]}:{kind}:L{L}:{_flags(row)}"
        cases.append(dict(op=op, dtype=dtype, kind=kind, seqlen=L, **row, seed=_crc(cid) % 2**31, id=cid))

    for dt in dtypes:
        if "selective_scan" in ops:
            for cplx in (False, True):
                for L in lens["scan"]:
                    valid = (lambda r: r["groups"] == 1 or r["var_B"] or r["var_C"])
                    for row in _rows(SCAN_FACTORS, SCAN_ON, SCAN_OFF, valid, _crc(dt, cplx, L), quick):
                        add("selective_scan", dt, "complex" if cplx else "real", L, row)
        if "mamba_inner_fn" in ops:
            for cplx in (False, True):
                for L in lens["inner"]:
                    for row in _rows(INNER_FACTORS, INNER_ON, INNER_OFF, lambda r: True, _crc("inner", dt, cplx, L),
                                     quick):
                        add("mamba_inner_fn", dt, "complex" if cplx else "real", L, row)
        if "causal_conv1d" in ops:
            for L in lens["conv"]:
                valid = (lambda r: dt != "float32" or r["weight"] == "x")
                for row in _rows(CONV_FACTORS, CONV_ON, CONV_OFF, valid, _crc("conv", dt, L), quick):
                    add("causal_conv1d", dt, row["layout"], L, row)
        if "selective_state_update" in ops:
            valid = (lambda r: (r["mamba"] == 2 or not r["tie"]) and (dt != "float32" or r["bc"] == "x"))
            for row in _rows(SSU_FACTORS, SSU_ON, SSU_OFF, valid, _crc("ssu", dt), quick):
                add("selective_state_update", dt, f"mamba{row['mamba']}", 1, row)
        if "causal_conv1d_update" in ops:
            valid = (lambda r: dt != "float32" or r["state"] == "x")
            for row in _rows(UPD_FACTORS, UPD_ON, UPD_OFF, valid, _crc("upd", dt), quick):
                add("causal_conv1d_update", dt, "-", 1, row)
    return cases


def _group(case) -> tuple:
    """The kernel variants a case needs (cases of one group compile the same kernels)."""
    op = case["op"]
    if op == "selective_scan":
        return (op, case["dtype"], case["kind"], case["var_B"], case["var_C"])
    if op == "causal_conv1d":
        return (op, case["dtype"], case["weight"], case["width"], case["seq_idx"], case["layout"])
    if op == "selective_state_update":
        return (op, case["dtype"], case["state"], case["bc"], case["tie"])
    if op == "causal_conv1d_update":
        return (op, case["dtype"], case["state"], case["weight"])
    return (op, case["dtype"], case["kind"], case["width"])


def _cost(case) -> float:
    L = case["seqlen"]
    if case["op"] == "selective_scan":
        return L * (2.0 if case["kind"] == "complex" else 1.0)
    if case["op"] == "mamba_inner_fn":
        return 50.0 + L * 2.0
    return 10.0 + L / 20.0


def schedule(cases: list[dict]) -> list[dict]:
    """Round-robin over kernel groups (costliest groups and cases first), so the first cases the
    processes take need different kernels and the long cases do not trail at the end."""
    groups: dict = {}
    for c in cases:
        groups.setdefault(_group(c), []).append(c)
    lists = sorted((sorted(g, key=_cost, reverse=True) for g in groups.values()),
                   key=lambda g: -sum(_cost(c) for c in g))
    out = []
    for i in range(max((len(g) for g in lists), default=0)):
        out.extend(g[i] for g in lists if i < len(g))
    return out


# ---------------------------------------------------------------- dtypes and the array backend

def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rounded(a, dtype: str):
    """float64 / complex128 copy of ``a`` holding the values of ``a`` rounded to ``dtype``."""
    if a is None:
        return None
    a = np.asarray(a)
    if dtype.startswith("complex"):
        return a.astype(np.complex128).astype(dtype).astype(np.complex128)
    return a.astype(np_dtype(dtype)).astype(np.float32 if dtype in HALF else np.float64).astype(np.float64)


def _bits16(dtype: str) -> bool:
    return dtype in HALF


class Backend:
    """Where the kernels under test run: CuPy arrays + torch CUDA (``gpu``), or NumPy arrays + torch
    CPU (``cpu``: ssmkit's NumPy path, i.e. the reference in float64 cast to the input dtypes)."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "gpu":
            import cupy

            self.xp = cupy
            self.torch_device = "cuda"
        else:
            self.xp = np
            self.torch_device = "cpu"

    def put(self, a64, dtype: str, channel_last: bool = False):
        if a64 is None:
            return None
        host = np.asarray(a64).astype(np_dtype(dtype))
        if channel_last:               # a (B, D, L) view of a (B, L, D) array
            host = np.ascontiguousarray(host.swapaxes(1, 2))
            return self.xp.asarray(host).swapaxes(1, 2)
        return self.xp.asarray(np.ascontiguousarray(host))

    @staticmethod
    def get(x):
        """(float64 / complex128 NumPy copy, dtype name) of a NumPy / CuPy array or torch tensor."""
        if x is None:
            return None
        if hasattr(x, "detach"):                      # torch
            name = str(x.dtype).replace("torch.", "")
            t = x.detach().cpu()
            t = t.cdouble() if t.is_complex() else t.double()
            return t.numpy(), name
        if hasattr(x, "get"):
            x = x.get()
        x = np.asarray(x)
        name = x.dtype.name if x.dtype != np_dtype("bfloat16") else "bfloat16"
        if name in HALF:
            x = x.astype(np.float32)
        return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64), name

    def sync(self):
        if self.kind == "gpu":
            self.xp.cuda.runtime.deviceSynchronize()


def _put_all(be: Backend, inputs: dict, skip=()) -> dict:
    return {k: be.put(v, dt) for k, (v, dt) in inputs.items() if k not in skip}


def _normal(rng, shape, cplx=False):
    if cplx:
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / math.sqrt(2.0)
    return rng.standard_normal(shape)


def _inp(a, dtype):
    """An input: (values rounded to ``dtype`` as float64/complex128, dtype) or (None, dtype)."""
    return (rounded(a, dtype), dtype)


# ---------------------------------------------------------------- selective scan

def scan_make(case):
    rng = np.random.default_rng(case["seed"])
    act, cplx = case["dtype"], case["kind"] == "complex"
    w = "complex64" if cplx else "float32"
    Bsz, L = 2, case["seqlen"]
    Dm, N, G = int(rng.choice([8, 12, 16])), int(rng.choice([8, 16])), case["groups"]
    if case["inputs"] == "upstream":      # upstream test_selective_scan's distributions
        A = -0.5 * rng.random((Dm, N))
        if cplx:
            A = A - 0.5j * rng.random((Dm, N))
        delta = 0.5 * rng.random((Bsz, Dm, L))
        dbias = 0.5 * rng.random(Dm)
    else:                                 # tests/strategies.py: fast and slow decays, large delta
        A = -np.exp(rng.normal(0.0, 1.0, (Dm, N)))
        if cplx:
            A = A + 1j * rng.normal(0.0, 2.0, (Dm, N))
        delta = rng.uniform(-4.0, 0.5, (Bsz, Dm, L)) if case["softplus"] else rng.uniform(0.01, 1.0, (Bsz, Dm, L))
        dbias = rng.uniform(-0.5, 0.5, Dm) if case["softplus"] else rng.uniform(0.0, 0.3, Dm)

    def bc(var):
        if not var:
            return _inp(_normal(rng, (Dm, N), cplx), w)
        shape = (Bsz, N, L) if G == 1 else (Bsz, G, N, L)
        return _inp(_normal(rng, shape, cplx), w if cplx else act)

    return dict(
        u=_inp(rng.standard_normal((Bsz, Dm, L)), act), delta=_inp(delta, act), A=_inp(A, w),
        B=bc(case["var_B"]), C=bc(case["var_C"]),
        D=_inp(rng.standard_normal(Dm) if case["D"] else None, "float32"),
        z=_inp(rng.standard_normal((Bsz, Dm, L)) if case["z"] else None, act),
        delta_bias=_inp(dbias if case["delta_bias"] else None, "float32"),
        initial_state=_inp(_normal(rng, (Bsz, Dm, N), cplx) if case["initial_state"] else None, w),
        dout=_inp(rng.standard_normal((Bsz, Dm, L)), act),
        dlast_state=_inp(_normal(rng, (Bsz, Dm, N), cplx) if case["last_state"] else None, w),
    )


SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
SCAN_GRADS = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")


def scan_truth(case, inp):
    from ssmkit.reference import selective_scan as ref_fwd, selective_scan_bwd as ref_bwd

    a = {k: inp[k][0] for k in SCAN_ARGS}
    kw = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"], delta_softplus=case["softplus"],
              initial_state=a["initial_state"])
    out, last = ref_fwd(a["u"], a["delta"], a["A"], a["B"], a["C"], return_last_state=True, **kw)
    grads = ref_bwd(inp["dout"][0], a["u"], a["delta"], a["A"], a["B"], a["C"], dlast_state=inp["dlast_state"][0],
                    **kw)
    want = {"out": out}
    if case["last_state"]:
        want["last_state"] = last
    want.update({n: g for n, g in zip(SCAN_GRADS, grads) if g is not None})
    return want


def scan_intermediates(case, inp):
    """Values the 16-bit scan stores besides its outputs: the un-gated output y + D u (saved for dz)."""
    if not case["z"]:
        return {}
    from ssmkit.reference import selective_scan as ref_fwd

    a = {k: inp[k][0] for k in SCAN_ARGS}
    y = ref_fwd(a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], delta_bias=a["delta_bias"],
                delta_softplus=case["softplus"], initial_state=a["initial_state"])
    return {"saved y (un-gated out)": y}


def scan_run(case, inp, be: Backend):
    import ssmkit

    d = _put_all(be, inp)
    kw = dict(D=d["D"], z=d["z"], delta_bias=d["delta_bias"], delta_softplus=case["softplus"],
              initial_state=d["initial_state"])
    out, last, saved = ssmkit.selective_scan_fwd(d["u"], d["delta"], d["A"], d["B"], d["C"], **kw)
    grads = ssmkit.selective_scan_bwd(d["dout"], d["u"], d["delta"], d["A"], d["B"], d["C"], saved=saved,
                                      dlast_state=d["dlast_state"], deterministic=case["deterministic"], **kw)
    be.sync()
    got = {"out": be.get(out)}
    if case["last_state"]:
        got["last_state"] = be.get(last)
    got.update({n: be.get(g) for n, g in zip(SCAN_GRADS, grads) if g is not None})
    return got


def scan_tol(case, q):
    """(TOL key, gradient?, scale): tests/test_selective_scan.py's check_forward/check_backward."""
    act = case["dtype"]
    state = "complex64" if case["kind"] == "complex" else "float32"
    if q == "out":
        return act, False, 1.0
    if q == "last_state":
        return state, False, 1.0
    if q in ("du", "ddelta", "dz") or act in HALF:
        return act, True, 1.0
    return state, True, 1.0


def scan_upstream(case, q):
    """Upstream tests/ops/test_selective_scan.py (the version that still asserted gradients)."""
    rtol, atol = UPSTREAM["selective_scan"][case["dtype"]]
    rtolw, atolw = 1e-3, 1e-3
    if case["z"]:        # upstream: "If we have z, the errors on the weights seem higher"
        rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    return {"out": (rtol, atol), "last_state": (rtol, atol), "du": (2 * rtol, 2 * atol),
            "ddelta": (5 * rtol, 10 * atol), "dA": (rtolw, 5 * atolw),
            "dB": (rtol, atol) if case["var_B"] else (rtolw, atolw),
            "dC": (rtol, atol) if case["var_C"] else (rtolw, atolw),
            "dD": (rtolw, atolw), "dz": (rtolw, atolw), "ddelta_bias": (rtolw, atolw)}.get(q)


# ---------------------------------------------------------------- causal conv1d (fwd + bwd)

def conv_make(case):
    rng = np.random.default_rng(case["seed"])
    act = case["dtype"]
    wd = act if case["weight"] == "x" else case["weight"]
    Bsz, L, W = 2, case["seqlen"], case["width"]
    Dm = int(rng.choice([16, 37, 64]))
    seq = None
    if case["seq_idx"]:
        seq = np.zeros((Bsz, L), np.int64)
        for b in range(Bsz):
            cuts = np.sort(rng.choice(np.arange(1, L), size=min(3, L - 1), replace=False)) if L > 1 else []
            for c in cuts:
                seq[b, c:] += 1
            if rng.random() < 0.5:                # one segment is padding (-1)
                seq[b][seq[b] == rng.integers(0, seq[b].max() + 1)] = -1
    return dict(
        x=_inp(rng.standard_normal((Bsz, Dm, L)), act),
        weight=_inp(rng.standard_normal((Dm, W)) / math.sqrt(W), wd),
        bias=_inp(rng.standard_normal(Dm) if case["bias"] else None, wd),
        seq_idx=(seq, "int32"),
        initial_states=_inp(rng.standard_normal((Bsz, Dm, W - 1)) if case["initial_states"] else None, act),
        dout=_inp(rng.standard_normal((Bsz, Dm, L)), act),
        dfinal_states=_inp(rng.standard_normal((Bsz, Dm, W - 1)) if case["final_states"] else None, act),
    )


CONV_GRADS = ("dx", "dweight", "dbias", "dinitial_states")


def conv_truth(case, inp):
    from ssmkit.reference import causal_conv1d as ref_fwd, causal_conv1d_bwd as ref_bwd

    a = {k: v for k, (v, _) in inp.items()}
    act = "silu" if case["silu"] else None
    out, fin = ref_fwd(a["x"], a["weight"], a["bias"], activation=act, seq_idx=a["seq_idx"],
                       initial_states=a["initial_states"], return_final_states=True)
    grads = ref_bwd(a["x"], a["weight"], a["bias"], a["dout"], activation=act, seq_idx=a["seq_idx"],
                    initial_states=a["initial_states"], dfinal_states=a["dfinal_states"])
    want = {"out": out}
    if case["final_states"]:
        want["final_states"] = fin
    want.update({n: g for n, g in zip(CONV_GRADS, grads) if g is not None})
    return want


def conv_run(case, inp, be: Backend):
    import ssmkit

    cl = case["layout"] == "cl"
    d = {k: be.put(v, dt, channel_last=cl and k in ("x", "dout", "initial_states", "dfinal_states"))
         for k, (v, dt) in inp.items()}
    act = "silu" if case["silu"] else None
    res = ssmkit.causal_conv1d(d["x"], d["weight"], d["bias"], activation=act, seq_idx=d["seq_idx"],
                               initial_states=d["initial_states"], return_final_states=case["final_states"])
    out, fin = res if case["final_states"] else (res, None)
    grads = ssmkit.causal_conv1d_bwd(d["x"], d["weight"], d["bias"], d["dout"], activation=act,
                                     seq_idx=d["seq_idx"], initial_states=d["initial_states"],
                                     dfinal_states=d["dfinal_states"])
    be.sync()
    got = {"out": be.get(out)}
    if fin is not None:
        got["final_states"] = be.get(fin)
    got.update({n: be.get(g) for n, g in zip(CONV_GRADS, grads) if g is not None})
    return got


def conv_tol(case, q):
    """tests/test_causal_conv1d.py: dweight/dbias in the weight's dtype, x sqrt(B L / 64)."""
    act = case["dtype"]
    if q in ("out", "final_states"):
        return act, False, 1.0
    if q in ("dx", "dinitial_states"):
        return act, True, 1.0
    wd = act if case["weight"] == "x" else case["weight"]
    return wd, True, max(1.0, math.sqrt(2 * case["seqlen"] / 64.0))


def conv_upstream(case, q):
    """Upstream causal-conv1d tests/test_causal_conv1d.py."""
    rtol, atol = UPSTREAM["causal_conv1d"][case["dtype"]]
    return (1e-3, 1e-3) if q in ("dweight", "dbias") else (rtol, atol)


# ---------------------------------------------------------------- selective_state_update

def ssu_make(case):
    rng = np.random.default_rng(case["seed"])
    act = case["dtype"]

    def pick(choice):
        return {"x": act, "other16": _other16(act), "float32": "float32", "none": "float32"}[choice]

    K, m2 = case["steps"], case["mamba"] == 2
    Bsz = 3
    pool = Bsz + 2 if case["indices"] != "none" else Bsz
    N = int(rng.choice([8, 16, 32]))
    if m2:
        H, P = 4, int(rng.choice([8, 16]))
        G = int(rng.choice([1, 2]))
        chan = (H, P)
    else:
        H, P, G = 1, int(rng.choice([16, 40])), 1
        chan = (P,)
    tie = case["tie"]

    def tied(base):
        """A value constant along P (Mamba-2 tied heads): ``base`` (..., H) repeated P times."""
        return np.repeat(base[..., None], P, axis=-1)

    if tie:
        A = np.repeat((-rng.random((H, N)) - 1.0)[:, None, :], P, axis=1)
        dt = tied(rng.standard_normal((K, Bsz, H)) if case["softplus"] else 0.5 * rng.random((K, Bsz, H)))
        dtb = tied(rng.random(H) - 4.0 if case["softplus"] else 0.1 * rng.random(H))
    else:
        A = -rng.random(chan + (N,)) - 1.0
        dt = rng.standard_normal((K, Bsz) + chan) if case["softplus"] else 0.5 * rng.random((K, Bsz) + chan)
        dtb = rng.random(chan) - 4.0 if case["softplus"] else 0.1 * rng.random(chan)
    bc_shape = (K, Bsz, G, N) if m2 else (K, Bsz, N)
    idx = None
    if case["indices"] != "none":
        idx = rng.permutation(pool)[:Bsz].astype(np.int64)
        if case["indices"] == "pad":
            idx[rng.integers(0, Bsz)] = -1
    return dict(
        state=_inp(rng.standard_normal((pool,) + chan + (N,)), pick(case["state"])),
        x=_inp(rng.standard_normal((K, Bsz) + chan), act), dt=_inp(dt, act), A=_inp(A, "float32"),
        B=_inp(rng.standard_normal(bc_shape), pick(case["bc"])),
        C=_inp(rng.standard_normal(bc_shape), pick(case["bc"])),
        D=_inp(None if case["D"] == "none" else rng.standard_normal(chan), pick(case["D"])),
        z=_inp(rng.standard_normal((K, Bsz) + chan) if case["z"] else None, act),
        dt_bias=_inp(None if case["dt_bias"] == "none" else dtb, pick(case["dt_bias"])),
        state_batch_indices=(idx, "int32"),
    )


def ssu_truth(case, inp):
    from ssmkit.reference import selective_state_update as ref

    a = {k: v for k, (v, _) in inp.items()}
    state = a["state"].copy()
    outs = []
    for k in range(case["steps"]):
        outs.append(ref(state, a["x"][k], a["dt"][k], a["A"], a["B"][k], a["C"][k], D=a["D"],
                        z=None if a["z"] is None else a["z"][k], dt_bias=a["dt_bias"], dt_softplus=case["softplus"],
                        state_batch_indices=a["state_batch_indices"]))
    return {"out": np.stack(outs), "state": state}


def ssu_run(case, inp, be: Backend):
    import ssmkit

    d = _put_all(be, inp)
    if case["tie"]:        # A, dt, dt_bias as stride-0 views along P (Mamba-2's expand)
        def tie(name, p_axis):
            arr = d[name]
            if arr is None:
                return None
            sl = [slice(None)] * arr.ndim
            sl[p_axis] = slice(0, 1)
            return be.xp.broadcast_to(arr[tuple(sl)], arr.shape)
        d["A"], d["dt"], d["dt_bias"] = tie("A", 1), tie("dt", 3), tie("dt_bias", 1)
    outs = []
    for k in range(case["steps"]):
        o = ssmkit.selective_state_update(d["state"], d["x"][k], d["dt"][k], d["A"], d["B"][k], d["C"][k], D=d["D"],
                                          z=None if d["z"] is None else d["z"][k], dt_bias=d["dt_bias"],
                                          dt_softplus=case["softplus"], state_batch_indices=d["state_batch_indices"])
        be.sync()
        outs.append(be.get(o))
    return {"out": (np.stack([o[0] for o in outs]), outs[0][1]), "state": be.get(d["state"])}


def ssu_tol(case, q):
    """tests/test_selective_state_update.py: out by x's dtype, state by the state's dtype. Over K
    steps (x2 for 16-bit, as the K-step test) each step re-reads the stored state: out is judged at
    the looser of x's and the state's dtype."""
    act = case["dtype"]
    st = {"x": act, "other16": _other16(act), "float32": "float32"}[case["state"]]
    if q == "out":
        if case["steps"] == 1:
            return act, False, 1.0
        key = max(act, st, key=lambda d: TOL[d][0])
        return key, False, (2.0 if key in HALF else 1.0)
    return st, False, 1.0


def ssu_upstream(case, q):
    """Upstream tests/ops/triton/test_selective_state_update.py (state in x's dtype there)."""
    return UPSTREAM["selective_state_update"][f"mamba{case['mamba']}"][case["dtype"]]


# ---------------------------------------------------------------- causal_conv1d_update

def upd_make(case):
    rng = np.random.default_rng(case["seed"])
    act = case["dtype"]
    sd = act if case["state"] == "x" else "float32"
    wd = {"x": act, "float32": "float32", "other16": _other16(act)}[case["weight"]]
    Bsz, W = 3, case["width"]
    Dm = int(rng.choice([24, 40, 64]))
    S = W - 1 + (5 if case["extra_state"] else 0)
    pool = Bsz + 2 if case["indices"] != "none" else Bsz
    xshape = (Bsz, Dm) if case["new"] == "2d" else (Bsz, Dm, case["new"])
    idx = None
    if case["indices"] != "none":
        idx = rng.permutation(pool)[:Bsz].astype(np.int64)
        if case["indices"] == "pad":
            idx[rng.integers(0, Bsz)] = -1
    return dict(
        x=_inp(rng.standard_normal(xshape), act), conv_state=_inp(rng.standard_normal((pool, Dm, S)), sd),
        weight=_inp(rng.standard_normal((Dm, W)) / math.sqrt(W), wd),
        bias=_inp(rng.standard_normal(Dm) if case["bias"] else None, wd),
        cache_seqlens=(rng.integers(0, 100, Bsz) if case["cache_seqlens"] else None, "int32"),
        conv_state_indices=(idx, "int32"),
    )


def upd_truth(case, inp):
    from ssmkit.reference import causal_conv1d_update as ref

    a = {k: v for k, (v, _) in inp.items()}
    state = a["conv_state"].copy()
    out = ref(a["x"], state, a["weight"], a["bias"], activation="silu" if case["silu"] else None,
              cache_seqlens=a["cache_seqlens"], conv_state_indices=a["conv_state_indices"])
    return {"out": out, "conv_state": state}


def upd_run(case, inp, be: Backend):
    import ssmkit

    d = _put_all(be, inp)
    out = ssmkit.causal_conv1d_update(d["x"], d["conv_state"], d["weight"], d["bias"],
                                      activation="silu" if case["silu"] else None, cache_seqlens=d["cache_seqlens"],
                                      conv_state_indices=d["conv_state_indices"])
    be.sync()
    return {"out": be.get(out), "conv_state": be.get(d["conv_state"])}


def upd_tol(case, q):
    """tests/test_causal_conv1d.py _check_update: out by x's dtype, conv_state by its own."""
    if q == "out":
        return case["dtype"], False, 1.0
    return (case["dtype"] if case["state"] == "x" else "float32"), False, 1.0


def upd_upstream(case, q):
    """Upstream causal-conv1d test_causal_conv1d_update: out allclose, conv_state torch.equal."""
    return UPSTREAM["causal_conv1d"][case["dtype"]] if q == "out" else (0.0, 0.0)


# ---------------------------------------------------------------- mamba_inner_fn (torch)

INNER_ARGS = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
              "out_proj_bias", "A", "B", "C", "D", "delta_bias")


def inner_make(case):
    rng = np.random.default_rng(case["seed"])
    act, cplx = case["dtype"], case["kind"] == "complex"
    w = "complex64" if cplx else "float32"
    Bsz, L, R, od, W = 2, case["seqlen"], 4, 12, case["width"]
    Dm = int(rng.choice([16, 24]))
    N = 4 if cplx else 8                   # d_state = 8 either way (complex: 4 conjugate pairs)
    rows = R + (case["var_B"] + case["var_C"]) * 8
    A = -0.5 * rng.random((Dm, N))
    if cplx:
        A = A - 0.5j * rng.random((Dm, N))
    return dict(
        xz=_inp(rng.standard_normal((Bsz, 2 * Dm, L)), act),
        conv1d_weight=_inp(rng.standard_normal((Dm, 1, W)) / math.sqrt(W), act),
        conv1d_bias=_inp(rng.standard_normal(Dm), act),
        x_proj_weight=_inp(rng.standard_normal((rows, Dm)) / math.sqrt(Dm), act),
        delta_proj_weight=_inp(rng.standard_normal((Dm, R)) / math.sqrt(R), act),
        out_proj_weight=_inp(rng.standard_normal((od, Dm)) / math.sqrt(Dm), act),
        out_proj_bias=_inp(rng.standard_normal(od) if case["out_bias"] else None, act),
        A=_inp(A, w),
        B=_inp(None if case["var_B"] else _normal(rng, (Dm, N), cplx), w),
        C=_inp(None if case["var_C"] else _normal(rng, (Dm, N), cplx), w),
        D=_inp(rng.standard_normal(Dm) if case["D"] else None, "float32"),
        delta_bias=_inp(0.5 * rng.random(Dm) if case["delta_bias"] else None, "float32"),
        dout=_inp(rng.standard_normal((Bsz, L, od)), act),
    )


def _inner(case, inp, device, dtypes):
    import torch
    import ssmkit.torch as st

    def tensor(name):
        v, dt = inp[name]
        if v is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(v)).to(device=device, dtype=getattr(torch, dtypes(dt)))

    args = [tensor(n) for n in INNER_ARGS]
    for t in args:
        if t is not None:
            t.requires_grad_(True)
    out = st.mamba_inner_fn(*args[:8], B=args[8], C=args[9], D=args[10], delta_bias=args[11], delta_softplus=True,
                            checkpoint_lvl=case["ckpt"])
    out.backward(tensor("dout"))
    got = {"out": out}
    for n, t in zip(INNER_ARGS, args):
        if t is not None:
            got["d" + n] = t.grad
    return got


def inner_truth(case, inp):
    got = _inner(case, inp, "cpu", lambda dt: "complex128" if dt.startswith("complex") else "float64")
    return {k: Backend.get(v)[0] for k, v in got.items()}


def inner_run(case, inp, be: Backend):
    got = _inner(case, inp, be.torch_device, lambda dt: dt)
    if be.kind == "gpu":
        import torch

        torch.cuda.synchronize()
    return {k: Backend.get(v) for k, v in got.items()}


def inner_tol(case, q):
    """Outputs and gradients judged at the input dtype (fp32 / complex64 share fp32's numbers)."""
    return case["dtype"], q != "out", 1.0


def inner_upstream(case, q):
    """Upstream test_mamba_inner_fn asserts the output only (scan tolerances)."""
    return UPSTREAM["selective_scan"][case["dtype"]] if q == "out" else None


# ---------------------------------------------------------------- tolerances, measurement, diagnosis

# Upstream's own test tolerances, (rtol, atol), read from their test files:
# mamba_ssm tests/ops/test_selective_scan.py, causal-conv1d tests/test_causal_conv1d.py and
# mamba_ssm tests/ops/triton/test_selective_state_update.py.
UPSTREAM = {
    "selective_scan": {"float32": (6e-4, 2e-3), "float16": (3e-3, 5e-3), "bfloat16": (3e-2, 5e-2)},
    "causal_conv1d": {"float32": (3e-4, 1e-3), "float16": (3e-3, 5e-3), "bfloat16": (1e-2, 5e-2)},
    "selective_state_update": {
        "mamba1": {"float32": (3e-4, 1e-3), "float16": (5e-3, 1e-2), "bfloat16": (1e-2, 5e-2)},
        "mamba2": {"float32": (3e-4, 1e-3), "float16": (5e-3, 3e-2), "bfloat16": (1e-2, 1e-1)},
    },
}
UPSTREAM_NOTES = [
    "selective scan (test_selective_scan): out and last_state (rtol, atol); rtolw, atolw = 1e-3, 1e-3, raised "
    "to (rtol, atol) with z; du (2 rtol, 2 atol); ddelta (5 rtol, 10 atol); dA (rtolw, 5 atolw); dB/dC "
    "(rtol, atol) when variable, else (rtolw, atolw); dD, dz, ddelta_bias (rtolw, atolw). The gradient "
    "asserts are commented out in upstream's current file; these are the numbers of the version that ran "
    "them. No initial-state gradient upstream (n/a).",
    "mamba_inner_fn (test_mamba_inner_fn): the output only, at the scan's (rtol, atol).",
    "causal_conv1d: out, final_states, dx, dinitial_states (rtol, atol); dweight, dbias (1e-3, 1e-3).",
    "causal_conv1d_update: out (rtol, atol); conv_state exact (torch.equal).",
    "selective_state_update: out and state (rtol, atol), Mamba-1 and Mamba-2 (heads) numbers; upstream keeps "
    "the state in x's dtype.",
]

OP_FUNCS = {
    "selective_scan": dict(make=scan_make, truth=scan_truth, run=scan_run, tol=scan_tol, upstream=scan_upstream,
                           intermediates=scan_intermediates, keep=()),
    "causal_conv1d": dict(make=conv_make, truth=conv_truth, run=conv_run, tol=conv_tol, upstream=conv_upstream,
                          intermediates=None, keep=()),
    "selective_state_update": dict(make=ssu_make, truth=ssu_truth, run=ssu_run, tol=ssu_tol, upstream=ssu_upstream,
                                   intermediates=None, keep=("state",)),
    "causal_conv1d_update": dict(make=upd_make, truth=upd_truth, run=upd_run, tol=upd_tol, upstream=upd_upstream,
                                 intermediates=None, keep=()),
    "mamba_inner_fn": dict(make=inner_make, truth=inner_truth, run=inner_run, tol=inner_tol,
                           upstream=inner_upstream, intermediates=None, keep=()),
}


def _ratio(diff, lim):
    """diff / lim elementwise, with 0/0 = 0 and x/0 = inf (an exact criterion)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = diff / lim
    return np.where(diff == 0, 0.0, np.where(lim > 0, r, np.inf))


def measure(got, want, key: str, grad: bool, scale: float, upstream) -> dict:
    """Errors of ``got`` against the truth ``want`` (both float64/complex128 NumPy)."""
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape:
        raise AssertionError(f"shape {g.shape} != truth {w.shape}")
    if w.size == 0:
        return dict(max_rel=0.0, ratio=0.0, miss=False, n_bad=0, max_abs=0.0, rel_rms=0.0, up_ratio=None,
                    up_miss=None)
    diff = np.abs(g - w)
    diff = np.where(np.isnan(diff), np.inf, diff)          # NaN never passes
    rms = float(np.sqrt(np.mean(np.abs(w) ** 2))) or 1.0
    denom = np.maximum(np.abs(w), rms)
    rel = diff / denom
    rtol, atol = TOL[key]
    if grad:
        rtol, atol = rtol * GRAD_FACTOR, atol * GRAD_FACTOR
    rtol, atol = rtol * scale, atol * scale
    ratio = diff / (atol + rtol * denom)
    k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    fin = diff[np.isfinite(diff)]
    res = dict(max_rel=float(rel.max()), ratio=float(ratio.max()), miss=bool(ratio.max() > 1.0),
               n_bad=int((ratio > 1.0).sum()), max_abs=float(diff.max()),
               rel_rms=float(np.sqrt(np.mean(fin ** 2)) / rms) if fin.size == diff.size else math.inf,
               at=[int(i) for i in k], got_at=_num(g[k]), want_at=_num(w[k]), tol=[rtol, atol])
    if upstream is None:
        res.update(up_ratio=None, up_miss=None)
    else:
        ur = _ratio(diff, upstream[1] + upstream[0] * np.abs(w))
        res.update(up_ratio=float(ur.max()), up_miss=bool(ur.max() > 1.0))
    return res


def _num(v):
    v = complex(v) if np.iscomplexobj(v) else float(v)
    return [v.real, v.imag] if isinstance(v, complex) else v


def _tol_ratio(got, want, key, grad, scale) -> float:
    return measure(got, want, key, grad, scale, None)["ratio"]


def classify(r32_rounded: float, fp16_peak: float | None, nonfinite: bool) -> str:
    """The cause of a 16-bit miss (see the module docstring). ``fp16_peak``: the largest true
    value stored in float16 (None: nothing is); ``nonfinite``: inf/NaN where the truth is finite."""
    if fp16_peak is not None and (fp16_peak >= FP16_MAX or (nonfinite and fp16_peak >= 0.5 * FP16_MAX)):
        return "fp16 range"
    if r32_rounded > 1.0:
        return "input/output rounding"
    return "ours"


def diagnose(case, f, inp, want, got, misses, be, tol_scale) -> dict:
    """Re-run a 16-bit case with its 16-bit inputs widened to float32 (same values) and classify
    each missed output."""
    wide = {k: (v, "float32" if (_bits16(dt) and k not in f["keep"]) else dt) for k, (v, dt) in inp.items()}
    got32 = f["run"](case, wide, be)
    inter = {}
    if case["dtype"] == "float16" and f["intermediates"] is not None:
        inter = f["intermediates"](case, inp)
    stored16 = [want[q] for q in want if got[q][1] == "float16"] + list(inter.values())
    peak = None
    if stored16 or any(dt == "float16" for _, dt in inp.values()):
        peak = max((float(np.max(np.abs(v))) for v in stored16 if np.size(v)), default=0.0)
    out = {}
    for q in misses:
        g16, stor = got[q]
        g32 = got32[q][0]
        key, grad, scale = f["tol"](case, q)
        scale *= tol_scale
        r16 = _tol_ratio(g16, want[q], key, grad, scale)
        r32r = _tol_ratio(rounded(g32, stor) if _bits16(stor) else g32, want[q], key, grad, scale)
        nonfinite = bool(np.any(~np.isfinite(g16) & np.isfinite(want[q])))
        note = ""
        if case["op"] == "selective_scan" and case["z"]:
            note = "z: the un-gated output is kept in u's dtype for the backward (as upstream)"
        elif case["op"] == "mamba_inner_fn":
            note = "composite: 16-bit intermediates between its ops (as upstream's mamba_inner_fn)"
        out[q] = dict(cls=classify(r32r, peak, nonfinite), ratio16=r16, ratio32_rounded=r32r,
                      ratio32=_tol_ratio(g32, want[q], key, grad, scale),
                      ratio_truth_rounded=(_tol_ratio(rounded(want[q], stor), want[q], key, grad, scale)
                                           if _bits16(stor) else 0.0),
                      stored_as=stor, fp16_peak=peak, nonfinite=nonfinite, note=note)
    return out


def evaluate(case: dict, be: Backend, tol_scale: float = 1.0) -> dict:
    """One case: truth, the kernel, the errors, and a diagnosis of any 16-bit miss."""
    t0 = time.perf_counter()
    f = OP_FUNCS[case["op"]]
    inp = f["make"](case)
    want = f["truth"](case, inp)
    t1 = time.perf_counter()
    got = f["run"](case, inp, be)
    t2 = time.perf_counter()
    if set(got) != set(want):
        raise AssertionError(f"outputs {sorted(got)} != truth's {sorted(want)}")
    q = {}
    for name, w in want.items():
        key, grad, scale = f["tol"](case, name)
        m = measure(got[name][0], w, key, grad, scale * tol_scale, f["upstream"](case, name))
        m["stored_as"] = got[name][1]
        q[name] = m
    misses = [n for n, m in q.items() if m["miss"]]
    diag = None
    if misses and any(_bits16(dt) for _, dt in inp.values()):
        diag = diagnose(case, f, inp, want, got, misses, be, tol_scale)
    return dict(case=case, q=q, diag=diag, t_ref=t1 - t0, t_run=t2 - t1, t_diag=time.perf_counter() - t2)


# ---------------------------------------------------------------- process pool

_STATE: dict = {}


def _init(kind: str, tol_scale: float):
    _STATE["be"] = Backend(kind)
    _STATE["tol_scale"] = tol_scale


def _task(case: dict) -> dict:
    try:
        return evaluate(case, _STATE["be"], _STATE["tol_scale"])
    except Exception as exc:  # one broken case must not end the sweep: it is reported
        return dict(case=case, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc(limit=6))


def run_cases(cases, kind, jobs, tol_scale, time_limit, log=print) -> tuple[list, bool]:
    """(results, complete). ``jobs`` <= 1 runs in this process."""
    t0 = time.perf_counter()
    results, complete = [], True
    step = max(1, len(cases) // 10)

    def note(r):
        results.append(r)
        if len(results) % step == 0 or len(results) == len(cases):
            log(f"  [{len(results)}/{len(cases)}] {time.perf_counter() - t0:.0f} s")

    if jobs <= 1:
        _init(kind, tol_scale)
        for c in cases:
            if time_limit and time.perf_counter() - t0 > time_limit:
                complete = False
                break
            note(_task(c))
        return results, complete
    # One thread per process (the children inherit the environment): torch's CPU reference and any
    # BLAS would otherwise start a thread per core in each of the ``jobs`` processes.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(jobs, initializer=_init, initargs=(kind, tol_scale))
    try:
        it = pool.imap_unordered(_task, cases, chunksize=1)
        while len(results) < len(cases):
            left = None if not time_limit else time_limit - (time.perf_counter() - t0)
            if left is not None and left <= 0:
                complete = False
                break
            try:
                note(it.next(timeout=left))
            except mp.TimeoutError:
                complete = False
                break
    finally:
        if complete:
            pool.close()
        else:
            pool.terminate()
        pool.join()
    return results, complete


# ---------------------------------------------------------------- report

def _f(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:.{digits}g}"


def summarize(results: list) -> tuple[list, list, list]:
    """(summary rows per (op, dtype, kind, output), misses, errors)."""
    rows: dict = {}
    misses, errors = [], []
    for r in results:
        c = r["case"]
        if "error" in r:
            errors.append(dict(id=c["id"], error=r["error"], tb=r.get("tb", "")))
            continue
        for q, m in r["q"].items():
            k = (c["op"], c["dtype"], c["kind"], q)
            row = rows.setdefault(k, dict(op=c["op"], dtype=c["dtype"], kind=c["kind"], output=q, cases=0,
                                          max_rel=0.0, max_rel_case=None, max_ratio=0.0, max_ratio_case=None,
                                          misses=0, up_max_ratio=None, up_max_ratio_case=None, up_misses=None,
                                          classes={}))
            row["cases"] += 1
            if m["max_rel"] > row["max_rel"] or row["max_rel_case"] is None:
                row["max_rel"], row["max_rel_case"] = m["max_rel"], c["id"]
            if m["ratio"] > row["max_ratio"] or row["max_ratio_case"] is None:
                row["max_ratio"], row["max_ratio_case"] = m["ratio"], c["id"]
            if m["up_ratio"] is not None:
                if row["up_max_ratio"] is None or m["up_ratio"] > row["up_max_ratio"]:
                    row["up_max_ratio"], row["up_max_ratio_case"] = m["up_ratio"], c["id"]
                row["up_misses"] = (row["up_misses"] or 0) + int(m["up_miss"])
            if m["miss"]:
                row["misses"] += 1
                d = (r.get("diag") or {}).get(q)
                cls = d["cls"] if d else ("not diagnosed (fp32)" if c["dtype"] == "float32" else "?")
                row["classes"][cls] = row["classes"].get(cls, 0) + 1
                misses.append(dict(id=c["id"], op=c["op"], dtype=c["dtype"], kind=c["kind"], output=q,
                                   max_rel=m["max_rel"], ratio=m["ratio"], n_bad=m["n_bad"], at=m["at"],
                                   got_at=m["got_at"], want_at=m["want_at"], up_ratio=m["up_ratio"], cls=cls,
                                   diag=d))
    order = {op: i for i, op in enumerate(OPS)}
    seen: dict = {}                      # outputs in the order the ops return them
    for r in rows.values():
        seen.setdefault((r["op"], r["output"]), len(seen))
    out = sorted(rows.values(), key=lambda r: (order.get(r["op"], 99), DTYPES.index(r["dtype"])
                                               if r["dtype"] in DTYPES else 9, r["kind"],
                                               seen[(r["op"], r["output"])]))
    misses.sort(key=lambda m: -m["ratio"])
    return out, misses, errors


def _meta(kind, args, elapsed, complete, n_cases, n_done) -> dict:
    meta = dict(mode=kind, quick=args.quick, elapsed_s=round(elapsed, 1), complete=complete, cases=n_cases,
                cases_done=n_done, jobs=args.jobs, tol_scale=args.tol_scale, python=platform.python_version(),
                numpy=np.__version__, host=platform.node(), argv=sys.argv[1:])
    try:
        meta["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    if kind == "gpu":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            meta.update(gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                        cupy=cupy.__version__, nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())),
                        driver=cupy.cuda.runtime.driverGetVersion())
        except Exception as exc:
            meta["gpu_error"] = repr(exc)
    try:
        import torch

        meta["torch"] = torch.__version__
    except Exception:
        pass
    return meta


def _slim(r: dict) -> dict:
    """A case's record for results.json: parameters and rounded per-output errors."""
    if "error" in r:
        return dict(case=r["case"], error=r["error"])
    q = {k: {a: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for a, v in m.items()
             if a in ("max_rel", "ratio", "up_ratio", "miss", "stored_as")} for k, m in r["q"].items()}
    return dict(case=r["case"], q=q, t=[round(r["t_ref"], 3), round(r["t_run"], 3), round(r["t_diag"], 3)])


def write_report(out_dir: Path, meta, summary, misses, errors, results):
    out_dir.mkdir(parents=True, exist_ok=True)
    tol = dict(ours={k: list(v) for k, v in TOL.items()}, grad_factor=GRAD_FACTOR, upstream=UPSTREAM,
               upstream_notes=UPSTREAM_NOTES)
    doc = dict(meta=meta, tolerances=tol, summary=summary, misses=misses, errors=errors,
               cases=[_slim(r) for r in results])
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=str, allow_nan=True))
    L = ["# Accuracy sweep: ssmkit against a float64 truth", ""]
    L.append(f"Mode {meta['mode']}" + (f" on {meta.get('gpu')}" if meta.get("gpu") else "")
             + f", commit {meta.get('commit', '?')}, {meta['cases_done']} of {meta['cases']} cases in "
               f"{meta['elapsed_s']} s" + ("" if meta["complete"] else " (INCOMPLETE: time limit)")
             + (f", tolerances x {meta['tol_scale']}" if meta["tol_scale"] != 1.0 else "") + ".")
    L += ["", "Inputs are rounded to the kernel's dtypes before the float64 reference sees them. "
          "`max rel` = max |got - want| / max(|want|, rms(want)); `err/tol` = the largest error over the "
          "element's limit (<= 1 passes); ours: tests/compare.py TOL (gradients x3), upstream: upstream's "
          "test tolerances (torch.allclose). Misses of 16-bit cases are classified in the last column "
          "(see benchmarks/sweep_accuracy.py).", ""]
    for op in OPS:
        rows = [r for r in summary if r["op"] == op]
        if not rows:
            continue
        L += [f"## {op}", "", "| dtype | kind | output | cases | max rel | worst case (max rel) | err/tol ours | "
              "misses ours | err/tol upstream | misses upstream | miss causes |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cls = ", ".join(f"{k}: {v}" for k, v in sorted(r["classes"].items())) or "-"
            L.append(f"| {r['dtype']} | {r['kind']} | {r['output']} | {r['cases']} | {_f(r['max_rel'])} | "
                     f"`{r['max_rel_case']}` | {_f(r['max_ratio'])} | {r['misses']} | {_f(r['up_max_ratio'])} | "
                     f"{'n/a' if r['up_misses'] is None else r['up_misses']} | {cls} |")
        L.append("")
    L += ["## Misses (ours), worst first", ""]
    if not misses:
        L += ["None.", ""]
    else:
        L += ["| case | output | err/tol | max rel | cause | fp32 run, rounded as stored: err/tol | note |",
              "|---|---|---|---|---|---|---|"]
        for m in misses[:300]:
            d = m["diag"] or {}
            L.append(f"| `{m['id']}` | {m['output']} | {_f(m['ratio'])} | {_f(m['max_rel'])} | {m['cls']} | "
                     f"{_f(d.get('ratio32_rounded'))} | {d.get('note', '')} |")
        if len(misses) > 300:
            L.append(f"| ... {len(misses) - 300} more in results.json | | | | | | |")
        L.append("")
    L += ["## Errors (cases that raised)", ""]
    L += ([f"- `{e['id']}`: {e['error']}" for e in errors] or ["None."]) + [""]
    L += ["## Tolerances", "", "ours (tests/compare.py TOL, (rtol, atol)): "
          + ", ".join(f"{k} {tuple(v)}" for k, v in TOL.items()) + f"; gradients x {GRAD_FACTOR}.", ""]
    L += ["upstream: " + json.dumps(UPSTREAM), ""] + [f"- {n}" for n in UPSTREAM_NOTES] + [""]
    (out_dir / "sweep.md").write_text("\n".join(L))


def print_summary(meta, summary, errors, log=print):
    log(f"sweep: {meta['cases_done']}/{meta['cases']} cases in {meta['elapsed_s']} s"
        + ("" if meta["complete"] else " (INCOMPLETE)") + f", {len(errors)} errors")
    agg: dict = {}
    for r in summary:
        a = agg.setdefault((r["op"], r["dtype"]), dict(ratio=0.0, rel=0.0, misses=0, up=0, classes={}))
        a["ratio"] = max(a["ratio"], r["max_ratio"])
        a["rel"] = max(a["rel"], r["max_rel"])
        a["misses"] += r["misses"]
        a["up"] += r["up_misses"] or 0
        for k, v in r["classes"].items():
            a["classes"][k] = a["classes"].get(k, 0) + v
    log(f"{'op':24s} {'dtype':9s} {'max rel':>9s} {'err/tol':>8s} {'misses':>6s} {'upstream':>8s}  causes")
    for (op, dt), a in agg.items():
        cls = ", ".join(f"{k}: {v}" for k, v in sorted(a["classes"].items()))
        log(f"{op:24s} {dt:9s} {a['rel']:9.3g} {a['ratio']:8.3g} {a['misses']:6d} {a['up']:8d}  {cls}")
    for e in errors[:5]:
        log(f"error {e['id']}: {e['error']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and sweep.md")
    p.add_argument("--quick", action="store_true", help="a few seqlens, the all-on and all-off flag sets")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="NumPy arrays stand in for the GPU (ssmkit's NumPy path) on a tiny grid")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--seqlens", nargs="+", type=int, default=None, help="override every op's seqlens")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: the CPU count; 1 with --cpu-smoke)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which no new case starts (default 200 on the GPU, none with --cpu-smoke)")
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply every tolerance (tests of the diagnosis)")
    p.add_argument("--max-cases", type=int, default=None, help="take only the first N scheduled cases")
    args = p.parse_args(argv)
    kind = "cpu" if args.cpu_smoke else "gpu"
    if args.jobs is None:
        args.jobs = 1 if args.cpu_smoke else (os.cpu_count() or 1)
    if args.time_limit is None:
        args.time_limit = 0.0 if args.cpu_smoke else 200.0
    t0 = time.perf_counter()
    cases = schedule(build_cases(args.ops, args.dtypes, quick=args.quick, smoke=args.cpu_smoke,
                                 seqlens=args.seqlens))
    if args.max_cases:
        cases = cases[:args.max_cases]
    print(f"sweep_accuracy: {len(cases)} cases ({kind}, {args.jobs} processes)", flush=True)
    results, complete = run_cases(cases, kind, args.jobs, args.tol_scale, args.time_limit,
                                  log=lambda s: print(s, flush=True))
    summary, misses, errors = summarize(results)
    meta = _meta(kind, args, time.perf_counter() - t0, complete, len(cases), len(results))
    write_report(Path(args.out), meta, summary, misses, errors, results)
    print_summary(meta, summary, errors)
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'sweep.md'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

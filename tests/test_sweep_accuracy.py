"""benchmarks/sweep_accuracy.py on the CPU: the pairwise covering sets, the error measure and the
miss classification, and the whole harness end to end with NumPy arrays standing in for the GPU
(ssmkit's NumPy path against the float64 reference: errors at the level of the output dtype's
rounding). The GPU sweep itself: ``python benchmarks/sweep_accuracy.py --out DIR`` on the H200."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ml_dtypes")

from benchmarks import sweep_accuracy as sw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _pairs(rows, names):
    return {(a, repr(r[a]), b, repr(r[b])) for r in rows for i, a in enumerate(names) for b in names[i + 1:]}


@pytest.mark.parametrize("factors, valid", [
    (sw.SCAN_FACTORS, lambda r: r["groups"] == 1 or r["var_B"] or r["var_C"]),
    (sw.SSU_FACTORS, lambda r: r["mamba"] == 2 or not r["tie"]),
    (sw.CONV_FACTORS, lambda r: True),
    (sw.UPD_FACTORS, lambda r: True),
])
def test_pairwise_cover_holds_every_pair(factors, valid):
    names = list(factors)
    every = [dict(zip(names, v)) for v in itertools.product(*factors.values())]
    every = [r for r in every if valid(r)]
    for seed in (0, 1):
        rows = sw.pairwise_cover(factors, valid, seed)
        assert all(valid(r) for r in rows)
        assert _pairs(every, names) <= _pairs(rows, names)
        # far fewer rows than the product: at most the largest two factor sizes' product, doubled
        sizes = sorted(len(v) for v in factors.values())
        assert len(rows) <= 2 * sizes[-1] * sizes[-2] + 4, len(rows)


def test_scan_grid_shape():
    """Per (dtype, real/complex, seqlen): the covering rows plus all-on and all-off, ~8-12 cases."""
    cases = sw.build_cases(["selective_scan"], ["bfloat16"])
    cells: dict = {}
    for c in cases:
        cells.setdefault((c["kind"], c["seqlen"]), []).append(c)
    assert set(L for _, L in cells) == set(sw.SCAN_SEQLENS)
    for cell in cells.values():
        assert 8 <= len(cell) <= 14
        flags = [{k: c[k] for k in sw.SCAN_FACTORS} for c in cell]
        assert sw.SCAN_ON in flags and sw.SCAN_OFF in flags
    assert len({c["id"] for c in cases}) == len(cases)
    # the schedule is a permutation that starts with one case per kernel group
    sched = sw.schedule(cases)
    assert sorted(c["id"] for c in sched) == sorted(c["id"] for c in cases)
    n_groups = len({sw._group(c) for c in cases})
    assert len({sw._group(c) for c in sched[:n_groups]}) == n_groups


def test_measure():
    w = np.array([1.0, -2.0, 0.5])
    m = sw.measure(w * (1 + 1e-3), w, "float32", False, 1.0, (6e-4, 2e-3))
    assert math.isclose(m["max_rel"], 1e-3, rel_tol=1e-6) and not m["miss"]
    rms = math.sqrt(np.mean(w ** 2))
    assert math.isclose(m["ratio"], 2e-3 / (2e-3 + 6e-4 * 2.0), rel_tol=1e-6)       # worst: |w| = 2 > rms
    assert rms < 2.0
    bad = sw.measure(np.array([1.0, np.nan, 0.5]), w, "bfloat16", True, 1.0, (3e-2, 5e-2))
    assert bad["miss"] and bad["up_miss"] and math.isinf(bad["ratio"])            # NaN never passes
    exact = sw.measure(w, w, "float32", False, 1.0, (0.0, 0.0))
    assert exact["ratio"] == 0.0 and exact["up_ratio"] == 0.0 and not exact["up_miss"]
    off = sw.measure(w + 1e-9, w, "float32", False, 1.0, (0.0, 0.0))
    assert off["up_miss"] and not off["miss"]


def test_rounded_is_what_the_kernel_reads():
    import ml_dtypes

    a = np.random.default_rng(0).standard_normal(1000)
    r = sw.rounded(a, "bfloat16")
    assert np.array_equal(r, a.astype(ml_dtypes.bfloat16).astype(np.float64))
    assert np.array_equal(sw.rounded(r, "bfloat16"), r)                        # idempotent
    c = sw.rounded(a + 1j * a, "complex64")
    assert c.dtype == np.complex128 and np.array_equal(c, (a + 1j * a).astype(np.complex64))


def test_classify():
    assert sw.classify(2.0, None, False) == "input/output rounding"
    assert sw.classify(0.9, None, False) == "ours"
    assert sw.classify(0.9, 7.0e4, False) == "fp16 range"
    assert sw.classify(5.0, 65504.0, False) == "fp16 range"
    assert sw.classify(0.9, 4.0e4, True) == "fp16 range"         # overflowed on the way to 65504
    assert sw.classify(0.9, 10.0, True) == "ours"                # a NaN with small values: a bug


def _smoke(tmp_path, *extra):
    ops = list(sw.OPS) if _have_torch() else [o for o in sw.OPS if o != "mamba_inner_fn"]
    out = tmp_path / "out"
    rc = sw.main(["--cpu-smoke", "--out", str(out), "--ops", *ops, *extra])
    doc = json.loads((out / "results.json").read_text())
    return rc, doc, (out / "sweep.md").read_text(), ops


def test_cpu_smoke_end_to_end(tmp_path):
    """Every op through the harness on NumPy arrays: ssmkit's NumPy path is the reference cast to
    the input dtypes, so fp32 errors are fp32 rounding and nothing misses."""
    rc, doc, md, ops = _smoke(tmp_path, "--seqlens", "1", "9", "--dtypes", "float32", "bfloat16")
    assert rc == 0 and not doc["errors"] and doc["meta"]["complete"]
    assert doc["meta"]["cases_done"] == doc["meta"]["cases"] == len(doc["cases"]) > 100
    assert {r["op"] for r in doc["summary"]} == set(ops)
    assert not doc["misses"]
    # One rounding to the output's dtype (fp32 2^-24 relative, bf16 2^-8 on the RMS scale), except:
    # the mamba_inner_fn composite rounds between its ops in the input dtype; decode steps with a
    # 16-bit state (also under fp32 x) round the state at every one of their 4 steps.
    bounds = {"float32": 2e-7, "bfloat16": 4e-3}
    special = {("mamba_inner_fn", "float32"): 1e-5, ("mamba_inner_fn", "bfloat16"): 0.1,
               ("selective_state_update", "float32"): 2e-2, ("selective_state_update", "bfloat16"): 2e-2}
    for r in doc["summary"]:
        assert r["misses"] == 0 and r["max_ratio"] < 1.0
        assert r["max_rel"] < special.get((r["op"], r["dtype"]), bounds[r["dtype"]]), r
    outputs = {(r["op"], r["output"]) for r in doc["summary"]}
    for want in [("selective_scan", "out"), ("selective_scan", "last_state"), ("selective_scan", "dinitial_state"),
                 ("selective_scan", "dB"), ("causal_conv1d", "dweight"), ("causal_conv1d", "final_states"),
                 ("selective_state_update", "state"), ("causal_conv1d_update", "conv_state")]:
        assert want in outputs
    for op in ops:
        assert f"## {op}" in md


def test_cpu_smoke_diagnoses_forced_misses(tmp_path):
    """Tolerances x 1e-3 make the 16-bit outputs miss; on the NumPy path (exact arithmetic, then
    the output's rounding) every such miss must be classified "input/output rounding"."""
    rc, doc, md, _ = _smoke(tmp_path, "--seqlens", "9", "--dtypes", "bfloat16", "--tol-scale", "1e-3",
                            "--ops", "selective_scan", "selective_state_update", "causal_conv1d_update")
    assert rc == 0 and not doc["errors"]
    assert len(doc["misses"]) > 20
    assert {m["cls"] for m in doc["misses"]} == {"input/output rounding"}
    for m in doc["misses"]:
        d = m["diag"]
        assert d["stored_as"] in ("bfloat16", "float16") and d["ratio32_rounded"] > 1.0   # fp16: SSU state
        assert math.isclose(d["ratio32_rounded"], d["ratio16"], rel_tol=0.05)
    assert "## Misses (ours), worst first" in md and "input/output rounding" in md


def test_cli_process_pool_and_time_limit(tmp_path):
    """The command line with a spawn pool of 2 processes, then a time limit that stops early."""
    out = tmp_path / "pool"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep_accuracy.py"), "--cpu-smoke", "--out", str(out),
           "--ops", "causal_conv1d_update", "--dtypes", "float16", "--jobs", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["complete"] and doc["meta"]["cases_done"] == doc["meta"]["cases"] > 10
    assert "causal_conv1d_update" in res.stdout
    rc = sw.main(["--cpu-smoke", "--out", str(tmp_path / "cut"), "--ops", "causal_conv1d_update",
                  "--time-limit", "1e-9"])
    doc = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert rc == 0 and not doc["meta"]["complete"] and doc["meta"]["cases_done"] < doc["meta"]["cases"]
    assert "INCOMPLETE" in (tmp_path / "cut" / "sweep.md").read_text()

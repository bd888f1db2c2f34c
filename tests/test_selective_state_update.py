"""selective_state_update: validation, NumPy path, launch geometry (CI, no GPU); the CUDA kernel
against the float64 reference, K steps vs a scan, pools with padding, every optional argument,
non-contiguous inputs, the constant-along-P fast path and CUDA-graph replay (GPU)."""
from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ssmkit
from ssmkit.ops import selective_state_update as op
from ssmkit.reference import selective_scan as ref_scan, selective_state_update as ref_ssu

from compare import assert_close
from gpu_examples import shards
from strategies import ssu_problems

ARGS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices")


def _mamba1(batch=2, dim=5, dstate=4, pool=None, seed=0, dtype=np.float64, wdtype=np.float64, sdtype=None):
    rng = np.random.default_rng(seed)
    pool = batch if pool is None else pool
    sdtype = dtype if sdtype is None else sdtype
    return dict(
        state=rng.standard_normal((pool, dim, dstate)).astype(sdtype),
        x=rng.standard_normal((batch, dim)).astype(dtype),
        dt=rng.uniform(-2, 0.5, (batch, dim)).astype(dtype),
        A=-np.exp(rng.standard_normal((dim, dstate))).astype(wdtype),
        B=rng.standard_normal((batch, dstate)).astype(dtype),
        C=rng.standard_normal((batch, dstate)).astype(dtype),
        D=rng.standard_normal(dim).astype(wdtype),
        z=rng.standard_normal((batch, dim)).astype(dtype),
        dt_bias=rng.uniform(-0.5, 0.5, dim).astype(wdtype),
        dt_softplus=True,
    )


def _mamba2(batch=2, heads=4, headdim=3, groups=2, dstate=4, pool=None, seed=0, dtype=np.float64,
            wdtype=np.float64, sdtype=None):
    rng = np.random.default_rng(seed)
    pool = batch if pool is None else pool
    sdtype = dtype if sdtype is None else sdtype
    return dict(
        state=rng.standard_normal((pool, heads, headdim, dstate)).astype(sdtype),
        x=rng.standard_normal((batch, heads, headdim)).astype(dtype),
        dt=rng.uniform(-2, 0.5, (batch, heads, headdim)).astype(dtype),
        A=-np.exp(rng.standard_normal((heads, headdim, dstate))).astype(wdtype),
        B=rng.standard_normal((batch, groups, dstate)).astype(dtype),
        C=rng.standard_normal((batch, groups, dstate)).astype(dtype),
        D=rng.standard_normal((heads, headdim)).astype(wdtype),
        z=rng.standard_normal((batch, heads, headdim)).astype(dtype),
        dt_bias=rng.uniform(-0.5, 0.5, (heads, headdim)).astype(wdtype),
        dt_softplus=True,
    )


# ---- CPU: NumPy path ------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(ssu_problems())
def test_numpy_path_is_reference(p):
    mine = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    theirs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    got = ssmkit.selective_state_update(**mine)
    want = ref_ssu(**theirs)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mine["state"], theirs["state"])


def test_numpy_out_param_and_float32():
    args = _mamba2(dtype=np.float32, wdtype=np.float32)
    ref_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    out = np.full(args["x"].shape, np.nan, np.float32)
    got = ssmkit.selective_state_update(**args, out=out)
    assert got is out
    np.testing.assert_array_equal(out, ref_ssu(**ref_args))
    np.testing.assert_array_equal(args["state"], ref_args["state"])


def test_numpy_optional_args_absent():
    args = _mamba1()
    for k in ("D", "z", "dt_bias"):
        args[k] = None
    args["dt_softplus"] = False
    ref_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    np.testing.assert_array_equal(ssmkit.selective_state_update(**args), ref_ssu(**ref_args))


def test_numpy_index_outside_pool_rejected():
    args = _mamba1(batch=2, pool=3)
    with pytest.raises(ValueError, match="'state_batch_indices' holds 3, outside the state pool of 3"):
        ssmkit.selective_state_update(**args, state_batch_indices=np.array([0, 3], np.int32))


# ---- CPU: validation ------------------------------------------------------------------------

def _bad(kind, **over):
    args = _mamba2(dtype=np.float32, wdtype=np.float32) if kind == 2 else _mamba1(dtype=np.float32, wdtype=np.float32)
    args.update(over)
    return args


F32, F64, F16 = np.float32, np.float64, np.float16
VALIDATION = [
    # (mamba kind, overrides, error, message fragment)
    (1, dict(state=np.zeros((2, 5), F32)), ValueError, r"argument 'state' must be \(B_pool, D, N\)"),
    (1, dict(x=np.zeros((2, 5, 1), F32)), ValueError, r"argument 'x' must be \(B, D\), got shape \(2, 5, 1\)"),
    (1, dict(x=np.zeros((2, 6), F32)), ValueError, r"argument 'x' must have shape \(2, 5\) = \(B, D\), got \(2, 6\)"),
    (1, dict(dt=np.zeros((2, 4), F32)), ValueError, r"argument 'dt' must have shape \(2, 5\) = \(B, D\), got \(2, 4\)"),
    (1, dict(z=np.zeros((3, 5), F32)), ValueError, r"argument 'z' must have shape \(2, 5\)"),
    (1, dict(B=np.zeros((2, 5), F32)), ValueError, r"argument 'B' must have shape \(2, 4\) = \(B, N\), got \(2, 5\)"),
    (1, dict(C=np.zeros((2, 1, 4), F32)), ValueError, r"argument 'C' must have shape \(2, 4\)"),
    (1, dict(A=np.zeros((5, 3), F32)), ValueError, r"argument 'A' must have shape \(5, 4\) = \(D, N\), got \(5, 3\)"),
    (1, dict(A=np.zeros((5, 4), F64)), TypeError, r"argument 'A' must have dtype in \('float16', 'bfloat16', 'float32'\) \(with float32 x\), got float64"),
    (1, dict(D=np.zeros(4, F32)), ValueError, r"argument 'D' must have shape \(5,\) = \(D\), got \(4,\)"),
    (1, dict(D=np.zeros(5, F64)), TypeError, r"argument 'D' must have dtype in \('float16', 'bfloat16', 'float32'\) \(with float32 x\), got float64"),
    (1, dict(dt_bias=np.zeros((5, 1), F32)), ValueError, r"argument 'dt_bias' must have shape \(5,\)"),
    (1, dict(dt_bias=np.zeros(5, F64)), TypeError, r"argument 'dt_bias' must have dtype in \('float16', 'bfloat16', 'float32'\) \(with float32 x\), got float64"),
    (1, dict(dt=np.zeros((2, 5), F64)), TypeError, r"argument 'dt' must have dtype in \('float16', 'bfloat16', 'float32'\) \(x is float32: .* never narrowed\), got float64"),
    (1, dict(z=np.zeros((2, 5), F64)), TypeError, r"argument 'z' must have dtype in \('float16', 'bfloat16', 'float32'\) \(x is float32"),
    (1, dict(C=np.zeros((2, 4), F64)), TypeError, r"argument 'C' must have dtype in \('float16', 'bfloat16', 'float32'\) \(with float32 x\), got float64"),
    (1, dict(B=np.zeros((2, 4), np.int32)), TypeError, r"argument 'B' must have dtype in .*, got int32"),
    (1, dict(dt=np.zeros((2, 5), np.int64)), TypeError, r"argument 'dt' must have dtype in .*, got int64"),
    (1, dict(x=np.zeros((2, 5), np.int32)), TypeError, r"argument 'x' must have dtype in"),
    (1, dict(state=np.zeros((2, 5, 4), F64)), TypeError, r"argument 'state' must have dtype in \('float32', 'float16', 'bfloat16'\) \(with float32 x; the state is updated in place, never converted\), got float64"),
    (1, dict(state=np.zeros((3, 5, 4), F32)), ValueError, r"argument 'state' must have shape \(2, 5, 4\) = \(B, D, N\), got \(3, 5, 4\)"),
    (1, dict(state=np.zeros((2, 5, 0), F32), A=np.zeros((5, 0), F32), B=np.zeros((2, 0), F32), C=np.zeros((2, 0), F32)),
     ValueError, r"N \(the last axis of 'state'\) must be >= 1"),
    (1, dict(state_batch_indices=np.zeros(3, np.int32)), ValueError, r"argument 'state_batch_indices' must have shape \(2,\) = \(B\), got \(3,\)"),
    (1, dict(state_batch_indices=np.zeros(2, np.float32)), TypeError, r"argument 'state_batch_indices' must have dtype in \('int32', 'int64'\)"),
    (1, dict(out=np.zeros((2, 4), F32)), ValueError, r"argument 'out' must have shape \(2, 5\)"),
    (1, dict(out=np.zeros((2, 5), F64)), TypeError, r"argument 'out' must have dtype in \('float32',\), got float64"),
    (1, dict(dt_softplus=1), TypeError, r"argument 'dt_softplus' must be a bool, got int"),
    (1, dict(state=np.broadcast_to(np.zeros((1, 5, 4), F32), (2, 5, 4))), ValueError, r"argument 'state' is written and must not have zero strides"),
    (1, dict(out=np.broadcast_to(np.zeros((1, 5), F32), (2, 5))), ValueError, r"argument 'out' is written and must not have zero strides"),
    (1, dict(x=[[0.0] * 5] * 2), TypeError, r"argument 'x' must be a NumPy or CuPy array"),
    (2, dict(x=np.zeros((2, 4, 2), F32)), ValueError, r"argument 'x' must have shape \(2, 4, 3\) = \(B, H, P\), got \(2, 4, 2\)"),
    (2, dict(B=np.zeros((2, 4), F32)), ValueError, r"argument 'B' must be \(B, G, N\), got shape \(2, 4\)"),
    (2, dict(B=np.zeros((2, 3, 4), F32), C=np.zeros((2, 3, 4), F32)), ValueError, r"the groups G = 3 of 'B' .* must divide H = 4"),
    (2, dict(C=np.zeros((2, 1, 4), F32)), ValueError, r"argument 'C' must have shape \(2, 2, 4\) = \(B, G, N\), got \(2, 1, 4\)"),
    (2, dict(A=np.zeros((4, 4), F32)), ValueError, r"argument 'A' must have shape \(4, 3, 4\) = \(H, P, N\), got \(4, 4\)"),
    (2, dict(D=np.zeros(4, F32)), ValueError, r"argument 'D' must have shape \(4, 3\) = \(H, P\), got \(4,\)"),
    (2, dict(dt_bias=np.zeros((4, 1), F32)), ValueError, r"argument 'dt_bias' must have shape \(4, 3\) = \(H, P\)"),
    (2, dict(state=np.zeros((2, 4, 3, 4, 1), F32)), ValueError, r"argument 'state' must be \(B_pool, D, N\) \(Mamba-1\) or \(B_pool, H, P, N\)"),
    (2, dict(state=np.zeros((2, 4, 2, 4), F32)), ValueError, r"argument 'x' must have shape \(2, 4, 2\)"),
]


@pytest.mark.parametrize("kind, over, err, match", VALIDATION,
                         ids=[f"m{k}-{'-'.join(o)}-{i}" for i, (k, o, _, _) in enumerate(VALIDATION)])
def test_validation(kind, over, err, match):
    with pytest.raises(err, match=match):
        ssmkit.selective_state_update(**_bad(kind, **over))


def test_fp64_state_goes_with_fp64_x():
    """The state is written in place, so its dtype is never converted: fp64 x needs an fp64
    state and an fp64 state needs fp64 x. Narrower A, B, C, D, dt_bias with fp64 x are fine."""
    args = _mamba1(dtype=np.float64, wdtype=np.float64, sdtype=np.float32)
    with pytest.raises(TypeError, match=r"argument 'state' must have dtype in \('float64',\) \(with float64 x"):
        ssmkit.selective_state_update(**args)
    args = _mamba1(dtype=np.float32, wdtype=np.float32, sdtype=np.float64)
    with pytest.raises(TypeError, match=r"argument 'state' must have dtype in \('float32', 'float16', 'bfloat16'\)"):
        ssmkit.selective_state_update(**args)
    rules = op.dtype_rules(**{k: v for k, v in _mamba1(dtype=np.float64, wdtype=np.float32).items()
                              if k != "dt_softplus"})
    assert rules.bc == "float64" and rules.D == rules.dt_bias == "float32"
    assert rules.widen == ((ARGS.index("A"), "float64"),)


def test_mixed_array_types_rejected():
    class FakeCupy:  # looks like a CuPy array to the backend check
        __module__ = "cupy._core.core"
    with pytest.raises(TypeError, match="one kind"):
        ssmkit.selective_state_update(**_bad(1, B=FakeCupy()))


def test_plan_needs_gpu_arrays():
    with pytest.raises(TypeError, match="needs CuPy"):
        ssmkit.SelectiveStateUpdatePlan(**_bad(1))


# ---- CPU: dtype combinations (issue 13) -----------------------------------------------------
# Upstream's Triton kernel loads every argument in its own dtype and computes in fp32; ssmkit
# reads each in its own dtype where the kernel can (state, x/dt/z/out, B/C as x's or fp32, D and
# dt_bias independently), widens exactly what it cannot, and refuses anything it would narrow.

FLOATS = ("float16", "bfloat16", "float32", "float64")
_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def _exact(src, dst):
    """Every ``src`` value is a ``dst`` value (the rule, stated independently of the code)."""
    return src == dst or _RANK[src] < _RANK[dst]


def _expected_rules(d):
    """(refused argument, None) or (None, (bc, D, dt_bias, widen)) for per-argument dtypes ``d``
    (None: absent), in validate's order of checks."""
    x = d["x"]
    comp = "float64" if x == "float64" else "float32"
    if (d["state"] == "float64") != (x == "float64"):
        return "state", None
    for name in ("dt", "z"):
        if d.get(name) is not None and not _exact(d[name], x):
            return name, None
    for name in ("B", "C", "A", "D", "dt_bias"):
        if d.get(name) is not None and not _exact(d[name], comp):
            return name, None
    bc = x if d["B"] == d["C"] == x else comp
    target = {"dt": x, "z": x, "B": bc, "C": bc, "A": comp}
    widen = tuple(sorted((ARGS.index(k), t) for k, t in target.items() if d.get(k) is not None and d[k] != t))
    return None, (bc, d.get("D"), d.get("dt_bias"), widen)


def _typed(args, dtypes):
    """A float64 problem with each argument rounded to its dtype (NumPy; bf16 via ml_dtypes)."""
    from gpu_util import rounded

    out = dict(args)
    for k, t in dtypes.items():
        if t is None:
            out[k] = None
        elif out.get(k) is not None:
            out[k] = rounded(out[k], t)
    return out


@st.composite
def dtype_combos(draw):
    """Per-argument dtypes over all of FLOATS, drawn towards the accepted ones (x's dtype for
    dt, z, B, C; the compute type for A, D, dt_bias) so that accepted, widened and refused
    combinations all come up often."""
    x = draw(st.sampled_from(FLOATS))
    comp = "float64" if x == "float64" else "float32"
    pick = lambda likely, opt=False: draw(st.sampled_from(  # noqa: E731
        (likely,) * 3 + FLOATS + ((None, None) if opt else ())))
    return dict(state=pick(comp), x=x, dt=pick(x), z=pick(x, True), A=pick(comp), B=pick(x), C=pick(x),
                D=pick(x if x != "float32" else comp, True), dt_bias=pick(comp, True))


@settings(max_examples=300, deadline=None)
@given(d=dtype_combos(), mamba2=st.booleans(), seed=st.integers(0, 2**16))
def test_dtype_rules_property(d, mamba2, seed):
    """Every dtype combination: refused with the first offending argument named (its dtype and
    the accepted ones), or accepted with exact widenings only, a compiled variant, and (NumPy
    path) the float64 reference of the values as rounded to their own dtypes."""
    pytest.importorskip("ml_dtypes")
    from gpu_util import as64

    state, x = d["state"], d["x"]
    base = (_mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=5, seed=seed) if mamba2
            else _mamba1(batch=2, dim=5, dstate=4, seed=seed))
    args = _typed(base, d)
    bad, rules = _expected_rules(d)
    if bad is not None:
        msg = rf"argument '{bad}' must have dtype in \(.*\), got {d[bad]}"
        with pytest.raises(TypeError, match=msg):
            ssmkit.selective_state_update(**args)
        return
    bc, D_t, bias_t, widen = rules
    got_rules = op.dtype_rules(**{k: args[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")})
    assert (got_rules.bc, got_rules.D, got_rules.dt_bias, got_rules.widen) == (bc, D_t, bias_t, widen)
    for i, t in widen:  # only exact widenings, never D/dt_bias/state/x
        assert ARGS[i] in ("dt", "z", "A", "B", "C") and _exact(d[ARGS[i]], t) and d[ARGS[i]] != t
    assert op.kernel_ref(state, x, False, bc) in op.variants()
    assert op.kernel_ref(state, x, True, bc) in op.variants()
    # NumPy path: the float64 reference on float64 copies of the typed values, rounded once.
    want_state = {k: (as64(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    want = ref_ssu(**want_state)
    state_arr = args["state"]
    got = ssmkit.selective_state_update(**args)
    assert got.dtype == args["x"].dtype and state_arr.dtype == np.dtype(args["state"].dtype)
    np.testing.assert_array_equal(as64(got), as64(want.astype(args["x"].dtype)))
    np.testing.assert_array_equal(as64(state_arr), as64(want_state["state"].astype(state_arr.dtype)))


# The combinations real models produce (all read natively, no copy): name -> per-argument dtypes.
MODEL_COMBOS = {
    # mamba_ssm Mamba.step() on a bf16 model: A = -exp(A_log.float()), D and dt_proj.bias bf16
    "upstream_mamba1_bf16": dict(state="bfloat16", x="bfloat16", dt="bfloat16", z="bfloat16", B="bfloat16",
                                 C="bfloat16", A="float32", D="bfloat16", dt_bias="bfloat16"),
    # transformers' MambaMixer: D in the model dtype, dt_proj.bias.float()
    "transformers_mamba_bf16": dict(state="bfloat16", x="bfloat16", dt="bfloat16", z="bfloat16", B="bfloat16",
                                    C="bfloat16", A="float32", D="bfloat16", dt_bias="float32"),
    # an fp32 SSM state (ssm_dtype / autocast) under 16-bit activations and weights
    "fp32_state_bf16_inputs": dict(state="float32", x="bfloat16", dt="bfloat16", z="bfloat16", B="bfloat16",
                                   C="bfloat16", A="float32", D="bfloat16", dt_bias="bfloat16"),
    "fp32_state_fp16_inputs_fp32_weights": dict(state="float32", x="float16", dt="float16", z="float16",
                                                B="float16", C="float16", A="float32", D="float32",
                                                dt_bias="float32"),
}


@pytest.mark.parametrize("combo", sorted(MODEL_COMBOS))
@pytest.mark.parametrize("mamba2", [False, True])
def test_model_combos_read_natively(combo, mamba2):
    pytest.importorskip("ml_dtypes")
    from gpu_util import as64

    d = MODEL_COMBOS[combo]
    base = (_mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=4, seed=1) if mamba2
            else _mamba1(batch=2, dim=5, dstate=4, seed=1))
    args = _typed(base, d)
    spec = op.validate(*(args[k] for k in ARGS[:9]), dt_softplus=True)
    assert spec.widen == () and spec.bc_dtype == d["x"]
    assert (spec.D_dtype, spec.bias_dtype) == (d["D"], d["dt_bias"])
    want = ref_ssu(**{k: (as64(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()})
    got = ssmkit.selective_state_update(**args)
    assert got.dtype == args["x"].dtype
    np.testing.assert_array_equal(as64(got), as64(want.astype(got.dtype)))


# Refused: reading these would round a value (messages name the argument, its dtype, the options).
REFUSED = [
    (dict(x="bfloat16", dt="float32"), r"argument 'dt' must have dtype in \('bfloat16',\) \(x is bfloat16: x, dt, z "
                                       r"and out share one dtype; a narrower float is widened, a wider one never "
                                       r"narrowed\), got float32"),
    (dict(x="bfloat16", dt="float16"), r"argument 'dt' must have dtype in \('bfloat16',\) .*got float16"),
    (dict(x="float16", z="bfloat16"), r"argument 'z' must have dtype in \('float16',\) .*got bfloat16"),
    (dict(x="float32", z="float64"), r"argument 'z' must have dtype in \('float16', 'bfloat16', 'float32'\) .*got float64"),
    (dict(x="bfloat16", A="float64"), r"argument 'A' must have dtype in \('float16', 'bfloat16', 'float32'\) "
                                      r"\(with bfloat16 x\), got float64"),
    (dict(x="bfloat16", B="float64"), r"argument 'B' must have dtype in \('float16', 'bfloat16', 'float32'\) "
                                      r"\(with bfloat16 x\), got float64"),
    (dict(x="float16", D="float64"), r"argument 'D' must have dtype in .* \(with float16 x\), got float64"),
    (dict(x="float16", dt_bias="float64"), r"argument 'dt_bias' must have dtype in .* \(with float16 x\), got float64"),
    (dict(x="bfloat16", state="float64"), r"argument 'state' must have dtype in \('float32', 'float16', 'bfloat16'\) "
                                          r"\(with bfloat16 x; the state is updated in place, never converted\), "
                                          r"got float64"),
    (dict(x="float64", state="float32"), r"argument 'state' must have dtype in \('float64',\) .*got float32"),
]


def _refused_args(over, mamba2=False):
    d = dict(MODEL_COMBOS["upstream_mamba1_bf16"])
    d.update(over)
    if d["x"] == "float64" and "state" not in over:
        d["state"] = "float64"
    for k in ("dt", "z", "B", "C"):
        if k not in over:
            d[k] = d["x"]
    base = (_mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=4, seed=2) if mamba2
            else _mamba1(batch=2, dim=5, dstate=4, seed=2))
    return _typed(base, d)


@pytest.mark.parametrize("over, match", REFUSED, ids=["-".join(f"{k}_{v}" for k, v in o.items()) for o, _ in REFUSED])
def test_refused_combos(over, match):
    pytest.importorskip("ml_dtypes")
    for mamba2 in (False, True):
        args = _refused_args(over, mamba2)
        with pytest.raises(TypeError, match=match):
            ssmkit.selective_state_update(**args)
        with pytest.raises(TypeError, match=match):
            op.validate(*(args[k] for k in ARGS[:9]), dt_softplus=True)


# ---- CPU: torch adapter (bf16 travels to NumPy as float32; validation sees the true dtypes) -----

def _torch_args(d, mamba2, seed=3):
    torch = pytest.importorskip("torch")
    base = (_mamba2(batch=2, heads=2, headdim=3, groups=1, dstate=4, seed=seed) if mamba2
            else _mamba1(batch=2, dim=5, dstate=4, seed=seed))
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
    out = {}
    for k, v in base.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v).to(tdt[d[k]]) if d.get(k) is not None else None
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("combo", sorted(MODEL_COMBOS))
@pytest.mark.parametrize("mamba2", [False, True])
def test_torch_cpu_model_combos(combo, mamba2):
    """ssmkit.torch.selective_state_update on CPU tensors in the model dtypes: out in x's dtype,
    the state updated in place in its dtype, both matching the float64 reference of the values."""
    torch = pytest.importorskip("torch")
    import ssmkit.torch as sst

    d = MODEL_COMBOS[combo]
    t = _torch_args(d, mamba2)
    ref_state = t["state"].double().numpy().copy()
    want = ref_ssu(ref_state, *(None if t[k] is None else t[k].double().numpy()
                                for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")), dt_softplus=True)
    state = t["state"]
    ptr = state.data_ptr()
    out = sst.selective_state_update(state, t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                     dt_bias=t["dt_bias"], dt_softplus=True)
    assert out.dtype == t["x"].dtype and state.dtype == t["state"].dtype and state.data_ptr() == ptr
    assert_close("out", out.double().numpy(), want, d["x"])
    assert_close("state", state.double().numpy(), ref_state, d["state"])


@pytest.mark.parametrize("over, match", REFUSED[:3] + REFUSED[8:9],
                         ids=["dt_fp32_x_bf16", "dt_fp16_x_bf16", "z_bf16_x_fp16", "state_fp64_x_bf16"])
def test_torch_cpu_refused_combos(over, match):
    """Refusals see the true dtypes of bf16 tensors, although bf16 reaches NumPy as float32."""
    pytest.importorskip("torch")
    import ssmkit.torch as sst

    d = dict(MODEL_COMBOS["upstream_mamba1_bf16"])
    d.update(over)
    for k in ("dt", "z", "B", "C"):
        if k not in over:
            d[k] = d["x"]
    t = _torch_args(d, False)
    with pytest.raises(TypeError, match=match):
        sst.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                   dt_bias=t["dt_bias"], dt_softplus=True)


# ---- CPU: kernel choice, params layout, launch geometry -----------------------------------------

def test_kernel_choice_is_one_function():
    assert op.kernel_ref("float32", "bfloat16", True).name == \
        "ssm::selective_state_update<float, ssm::bf16, ssm::bf16, 1>"
    assert op.kernel_ref("bfloat16", "float16", False, "float32").name == \
        "ssm::selective_state_update<ssm::bf16, ssm::f16, float, 0>"
    assert op.kernel_ref("float64", "float64", False).name == "ssm::selective_state_update<double, double, double, 0>"
    refs = op.variants()
    # 3 states x (x, B/C) in (fp16, fp16) (fp16, fp32) (bf16, bf16) (bf16, fp32) (fp32, fp32) x tie, + fp64
    assert len(refs) == 3 * 5 * 2 + 2 == len(set(refs))
    assert len(op.variants(dtype="float64")) == 2
    assert len(op.variants(state_dtype="float32", tie=True)) == 5
    assert len(op.variants(bc_dtype="float32")) == 3 * 3 * 2
    assert ssmkit.selective_state_update.plan is ssmkit.SelectiveStateUpdatePlan


@pytest.mark.nvrtc
def test_params_layout():
    from ssmkit._nvrtc_offline import compile_file

    compile_file(op.KERNEL_FILE, [op.kernel_ref("float32", "bfloat16", False).name,
                                  op.kernel_ref("bfloat16", "bfloat16", False, "float32").name], 90,
                 extra_source=op.PARAMS.layout_asserts())


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles(arch):
    from ssmkit._nvrtc_offline import compile_refs

    (res,) = compile_refs(op.variants(), arch)
    assert res.cubin_bytes > 0 and len(res.lowered) == 32


def _flat(arr):
    """A 1-D writable view over the memory ``arr`` spans and the element offset of arr[0, ..., 0]."""
    item = arr.itemsize
    lo = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(arr.shape, arr.strides) if s > 0)
    addr = arr.__array_interface__["data"][0]
    raw = (ctypes.c_char * (hi - lo + item)).from_address(addr + lo)
    return np.frombuffer(raw, dtype=arr.dtype), -lo // item


def emulate_kernel(cfg, arrays, state_dtype, tie):
    """Run kernels_cu/selective_state_update.cu's index mapping on the host, element by element,
    from the packed fields only (float64 math). Returns per-element write counts of state and
    out, so a test can check that every element is written exactly once."""
    f = cfg.fields
    kvec = op.VEC_ELEMS[state_dtype]
    rows = op.rows_per_group(state_dtype, tie)
    mem = {}
    for name, a in zip(ARGS + ("out",), arrays):
        mem[name] = None if a is None else _flat(a)
    state_buf, s0 = mem["state"]
    out_buf, o0 = mem["out"]
    state_writes = np.zeros(state_buf.shape, np.int64)
    out_writes = np.zeros(out_buf.shape, np.int64)

    def rd(name, off):
        buf, base = mem[name]
        return float(buf[base + off])

    lanes = f["lanes"]
    assert lanes & (lanes - 1) == 0 and 1 <= lanes <= 32 and cfg.block % 32 == 0
    groups = cfg.grid * (cfg.block // lanes)
    for gid in range(groups):
        if gid >= f["total_groups"]:
            continue
        bh, tile = divmod(gid, f["tiles_per_head"])
        b, h = divmod(bh, f["heads"])
        grp = h // f["heads_per_group"]
        p0 = tile * rows
        nrows = min(rows, f["headdim"] - p0)
        srow = b
        if mem["state_batch_indices"] is not None:
            srow = int(rd("state_batch_indices", b * f["idx_stride"]))
        live = 0 <= srow < f["pool"]

        def dt_eff(pp):
            d = rd("dt", b * f["dt_b"] + h * f["dt_h"] + pp * f["dt_p"])
            if mem["dt_bias"] is not None:
                d += rd("dt_bias", h * f["bias_h"] + pp * f["bias_p"])
            if f["dt_softplus"]:
                d = float(np.logaddexp(0.0, d))
            return d

        dts = [dt_eff(p0 if tie else p0 + j) for j in range(nrows)]
        xs = [rd("x", b * f["x_b"] + h * f["x_h"] + (p0 + j) * f["x_p"]) for j in range(nrows)]
        acc = [0.0] * nrows
        if live:
            for lig in range(lanes):
                for c in range(f["n_chunks"]):
                    n0 = (c * lanes + lig) * kvec
                    if n0 >= f["dstate"]:
                        break
                    for i in range(kvec):
                        n = n0 + i
                        if n >= f["dstate"]:
                            assert not f["vec_state"], "vector path past N"
                            break
                        Bn = rd("B", b * f["B_b"] + grp * f["B_g"] + n * f["B_n"])
                        Cn = rd("C", b * f["C_b"] + grp * f["C_g"] + n * f["C_n"])
                        for j in range(nrows):
                            a_row = p0 if tie else p0 + j
                            a = rd("A", h * f["A_h"] + a_row * f["A_p"] + n * f["A_n"])
                            so = srow * f["state_b"] + h * f["state_h"] + (p0 + j) * f["state_p"] + n * f["state_n"]
                            sn = float(state_buf[s0 + so]) * np.exp(a * dts[j]) + Bn * (dts[j] * xs[j])
                            state_buf[s0 + so] = sn
                            state_writes[s0 + so] += 1
                            acc[j] += sn * Cn
        for j in range(nrows):
            o = 0.0
            if live:
                o = acc[j]
                if mem["D"] is not None:
                    o += rd("D", h * f["D_h"] + (p0 + j) * f["D_p"]) * xs[j]
                if mem["z"] is not None:
                    zz = rd("z", b * f["z_b"] + h * f["z_h"] + (p0 + j) * f["z_p"])
                    o *= zz / (1.0 + np.exp(-zz))
            oo = o0 + b * f["out_b"] + h * f["out_h"] + (p0 + j) * f["out_p"]
            out_buf[oo] = o
            out_writes[oo] += 1
    return state_writes, out_writes


def _host_views(args, rng, noncontig):
    """Optionally re-lay the arrays out as strided views of larger buffers (same values)."""
    if not noncontig:
        return args
    out = dict(args)
    for k, v in args.items():
        if isinstance(v, np.ndarray) and v.ndim >= 1 and k != "state_batch_indices":
            big = np.empty(v.shape[:-1] + (2 * v.shape[-1] + 1,), v.dtype)
            view = big[..., 1::2] if rng.random() < 0.5 else big[..., ::-2][..., : v.shape[-1]]
            view[...] = v
            out[k] = view
    return out


@settings(max_examples=60, deadline=None)
@given(p=ssu_problems(max_dstate=140, max_headdim=9, max_dim=11), sdt=st.sampled_from(["float64", "float32", "float16"]),
       expand=st.booleans(), noncontig=st.booleans(), idx64=st.booleans(), sms=st.sampled_from([1, 132]))
def test_launch_geometry_emulated(p, sdt, expand, noncontig, idx64, sms):
    """The host's lane groups / chunks / strides reproduce the reference, each element once."""
    rng = np.random.default_rng(p.spec.seed)
    args = dict(p)
    in_dt = "float64" if sdt == "float64" else "float32"
    for k in ("x", "dt", "z", "B", "C"):
        if args[k] is not None:
            args[k] = args[k].astype(in_dt)
    for k in ("A", "D", "dt_bias"):
        if args[k] is not None:
            args[k] = args[k].astype(in_dt)
    args["state"] = args["state"].astype(sdt)
    if idx64 and args["state_batch_indices"] is not None:
        args["state_batch_indices"] = args["state_batch_indices"].astype(np.int64)
    args = _host_views(args, rng, noncontig)
    if expand and p.spec.mamba2:  # Mamba-2's repeat/expand: A, dt, dt_bias constant along P
        H, P, N = args["A"].shape
        args["A"] = np.broadcast_to(args["A"][:, :1, :], (H, P, N))
        args["dt"] = np.broadcast_to(args["dt"][:, :, :1], args["dt"].shape)
        if args["dt_bias"] is not None:
            args["dt_bias"] = np.broadcast_to(args["dt_bias"][:, :1], (H, P))
    args["out"] = np.full(args["x"].shape, np.nan, in_dt)
    ref_args = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in args.items() if k != "out"}
    want = ref_ssu(**ref_args)

    named = [args[k] for k in ARGS] + [args["out"]]
    spec = op.validate(*named[:9], dt_softplus=args["dt_softplus"], state_batch_indices=named[9], out=named[10])
    ptrs = [0 if a is None else a.__array_interface__["data"][0] for a in named]
    cfg = op.launch_config(spec, named, ptrs, sms)
    assert cfg.tie == (expand and p.spec.mamba2 and p.spec.headdim > 1)
    for name, field in (("D", "D_type"), ("dt_bias", "bias_type")):  # per-call storage type codes
        if args[name] is not None:
            assert cfg.fields[field] == op.SCALAR_CODE[args[name].dtype.name]
    pristine = args["state"].copy()
    state_writes, out_writes = emulate_kernel(cfg, named, sdt, cfg.tie)

    # Every output element written once; every live state element once, the rest never.
    assert out_writes.max() == 1 and out_writes.sum() == args["out"].size
    idx = args["state_batch_indices"]
    live_rows = np.arange(spec.batch) if idx is None else idx[idx >= 0]
    per_row = int(np.prod(args["state"].shape[1:]))
    assert state_writes.max() <= 1 and state_writes.sum() == len(live_rows) * per_row
    dead = np.setdiff1d(np.arange(args["state"].shape[0]), live_rows)
    np.testing.assert_array_equal(args["state"][dead], pristine[dead])
    tol = dict(float64=1e-12, float32=2e-6, float16=2e-3)[sdt]
    np.testing.assert_allclose(args["out"], want, rtol=1e-5 if sdt != "float64" else 1e-12, atol=1e-5 if sdt != "float64" else 1e-12)
    np.testing.assert_allclose(args["state"].astype(np.float64), ref_args["state"].astype(np.float64), rtol=tol, atol=tol)


def test_geometry_fills_sms_at_batch_1():
    """Batch 1, D = 5120, N = 16, fp32 state: enough blocks for 132 SMs, 16-byte accesses."""
    import types

    spec = op.SsuSpec(False, 1, 1, 5120, 16, 1, 1, "float32", "bfloat16", True, True, True, False,
                      None, True, True)
    st_ = types.SimpleNamespace(shape=(1, 5120, 16), strides=(5120 * 64, 64, 4), dtype=np.dtype("float32"))
    act = types.SimpleNamespace(shape=(1, 5120), strides=(10240, 2), dtype=np.dtype("float16"))
    A = types.SimpleNamespace(shape=(5120, 16), strides=(64, 4), dtype=np.dtype("float32"))
    Bc = types.SimpleNamespace(shape=(1, 16), strides=(32, 2), dtype=np.dtype("float16"))
    chan = types.SimpleNamespace(shape=(5120,), strides=(4,), dtype=np.dtype("float32"))
    arrays = (st_, act, act, A, Bc, Bc, chan, act, chan, None, act)
    cfg = op.launch_config(spec, arrays, [256 * (i + 1) for i in range(11)], 132)
    assert cfg.fields["lanes"] == 4 and cfg.fields["n_chunks"] == 1
    assert cfg.vec == (16, 16, 8, 8)
    assert cfg.grid >= 132 and cfg.block == 32


# ---- GPU ------------------------------------------------------------------------------------
# Device arrays are built on the host (NumPy, ml_dtypes for bf16) and uploaded; strided views are
# taken on the device from uploaded buffers; comparisons run on the host. No CuPy arithmetic on
# 16-bit arrays is needed.

STATE_IN = [("float32", "bfloat16"), ("float32", "float16"), ("float32", "float32"), ("bfloat16", "bfloat16"),
            ("float16", "float32"), ("bfloat16", "float32"), ("float64", "float64")]


def _weight(in_dtype):
    return "float64" if in_dtype == "float64" else "float32"


def _rounded_args(args, state_dtype, in_dtype, idx64=False, dtypes=None):
    """Host copies of a float64 problem in the kernel's dtypes: state in ``state_dtype``, A, D,
    dt_bias in the compute type, the rest in ``in_dtype``; ``dtypes`` overrides per argument."""
    from gpu_util import rounded

    dtypes = dtypes or {}
    out = {}
    for k, v in args.items():
        if not isinstance(v, np.ndarray):
            out[k] = v
        elif k == "state_batch_indices":
            out[k] = v.astype(np.int64 if idx64 else np.int32)
        elif k in dtypes:
            out[k] = rounded(v, dtypes[k])
        elif k == "state":
            out[k] = rounded(v, state_dtype)
        elif k in ("A", "D", "dt_bias"):
            out[k] = rounded(v, _weight(in_dtype))
        else:
            out[k] = rounded(v, in_dtype)
    return out


def _to_gpu(args, state_dtype, in_dtype, idx64=False, dtypes=None):
    """Device copies of a float64 problem in the kernel's dtypes (``dtypes``: per-argument
    overrides), and float64 host copies of exactly what the device holds (for the reference)."""
    from gpu_util import as64, to_device

    r = _rounded_args(args, state_dtype, in_dtype, idx64, dtypes)
    dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in r.items()}
    host = {k: (as64(v) if isinstance(v, np.ndarray) and k != "state_batch_indices" else v) for k, v in r.items()}
    return dev, host


def _bits(a):
    """The bytes of a device or host array, for bitwise comparisons."""
    import cupy

    return np.ascontiguousarray(cupy.asnumpy(a)).view(np.uint8)


def _nan_out(shape, dtype_name, strided=False):
    """A NaN-filled output uploaded from the host; ``strided``: every other element of a buffer."""
    from gpu_util import np_dtype, to_device

    if not strided:
        return to_device(np.full(shape, np.nan, np_dtype(dtype_name)))
    return to_device(np.full(tuple(shape) + (2,), np.nan, np_dtype(dtype_name)))[..., 0]


def _check(dev, host, state_dtype, in_dtype, out=None, **kw):
    from gpu_util import sync_check

    got = ssmkit.selective_state_update(**dev, out=out, **kw)
    sync_check()
    want_state = host["state"].copy()
    want = ref_ssu(**{**host, "state": want_state}, **kw)
    assert_close("out", got, want, in_dtype)
    assert_close("state", dev["state"], want_state, state_dtype)
    return got


def _expand_along_p(dev, host):
    """Mamba-2's expand: A, dt, dt_bias constant along P (stride 0), on device and host alike."""
    import cupy

    H, P, N = dev["A"].shape
    dev["A"] = cupy.broadcast_to(dev["A"][:, :1, :], (H, P, N))
    host["A"] = np.broadcast_to(host["A"][:, :1, :], (H, P, N))
    dev["dt"] = cupy.broadcast_to(dev["dt"][:, :, :1], dev["dt"].shape)
    host["dt"] = np.broadcast_to(host["dt"][:, :, :1], host["dt"].shape)
    if dev.get("dt_bias") is not None:
        dev["dt_bias"] = cupy.broadcast_to(dev["dt_bias"][:, :1], (H, P))
        host["dt_bias"] = np.broadcast_to(host["dt_bias"][:, :1], (H, P))


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(40, 1.0))
@settings(max_examples=40, deadline=None)
@given(p=ssu_problems(max_dstate=40, max_headdim=9, max_dim=40), dts=st.sampled_from(STATE_IN),
       expand=st.booleans(), idx64=st.booleans())
def test_gpu_matches_reference(shard, p, dts, expand, idx64):
    from gpu_util import as64

    state_dtype, in_dtype = dts
    dev, host = _to_gpu(dict(p), state_dtype, in_dtype, idx64)
    if expand and p.spec.mamba2:
        _expand_along_p(dev, host)
    pristine = _bits(dev["state"]).reshape(dev["state"].shape[0], -1)
    out = _nan_out(dev["x"].shape, in_dtype)
    _check(dev, host, state_dtype, in_dtype, out=out)
    idx = host["state_batch_indices"]
    if idx is not None:  # rows no batch element points at: bitwise untouched; padding: out = 0
        after = _bits(dev["state"]).reshape(dev["state"].shape[0], -1)
        untouched = np.setdiff1d(np.arange(dev["state"].shape[0]), idx[idx >= 0])
        np.testing.assert_array_equal(after[untouched], pristine[untouched])
        pad = np.nonzero(idx < 0)[0]
        assert (as64(out)[pad] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype, in_dtype", [("float32", "float32"), ("float64", "float64"), ("float32", "bfloat16")])
@pytest.mark.parametrize("mamba2", [False, True])
def test_gpu_k_steps_equal_scan(state_dtype, in_dtype, mamba2):
    """K decode steps from a state equal a length-K selective scan from that state."""
    from gpu_util import as64, rounded, sync_check, to_device

    rng = np.random.default_rng(3)
    Bsz, N, K = 3, 16, 12
    if mamba2:
        H, P, G = 4, 8, 2
        chan = (H, P)
    else:
        H, P, G = 1, 37, 1
        chan = (P,)
    Dm = H * P
    u = rounded(rng.standard_normal((Bsz, Dm, K)), in_dtype)
    delta = rounded(rng.uniform(-3, 0.5, (Bsz, Dm, K)), in_dtype)
    zz = rounded(rng.standard_normal((Bsz, Dm, K)), in_dtype)
    Bm = rounded(rng.standard_normal((Bsz, G, N, K)), in_dtype)
    Cm = rounded(rng.standard_normal((Bsz, G, N, K)), in_dtype)
    w = _weight(in_dtype)
    A = rounded(-np.exp(rng.standard_normal((Dm, N))), w)
    Dv = rounded(rng.standard_normal(Dm), w)
    bias = rounded(rng.uniform(-0.5, 0.5, Dm), w)
    state0 = rounded(rng.standard_normal((Bsz, Dm, N)), state_dtype)

    want_out, want_state = ref_scan(as64(u), as64(delta), as64(A), as64(Bm) if mamba2 else as64(Bm)[:, 0],
                                    as64(Cm) if mamba2 else as64(Cm)[:, 0], D=as64(Dv), z=as64(zz),
                                    delta_bias=as64(bias), delta_softplus=True,
                                    initial_state=as64(state0), return_last_state=True)
    state = to_device(state0).reshape((Bsz,) + chan + (N,))
    A_d, D_d, bias_d = (to_device(v).reshape(chan + v.shape[1:]) for v in (A, Dv, bias))
    outs = []
    for t in range(K):
        step = lambda a: to_device(np.ascontiguousarray(a[..., t])).reshape((Bsz,) + chan)  # noqa: E731
        Bt = to_device(np.ascontiguousarray(Bm[..., t] if mamba2 else Bm[:, 0, :, t]))
        Ct = to_device(np.ascontiguousarray(Cm[..., t] if mamba2 else Cm[:, 0, :, t]))
        outs.append(ssmkit.selective_state_update(state, step(u), step(delta), A_d, Bt, Ct, D=D_d, z=step(zz),
                                                  dt_bias=bias_d, dt_softplus=True))
    sync_check()
    got = np.stack([as64(o).reshape(Bsz, Dm) for o in outs], axis=-1)
    scale = 1.0 if in_dtype in ("float64", "float32") else 2.0  # K roundings of bf16 outputs
    assert_close("outputs", got, want_out, in_dtype, scale=scale)
    assert_close("final state", as64(state).reshape(Bsz, Dm, N), want_state, state_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("has_D, has_z, has_bias, softplus", list(itertools.product([False, True], repeat=4)))
def test_gpu_optional_args(has_D, has_z, has_bias, softplus):
    for mamba2 in (False, True):
        args = (_mamba2(batch=3, heads=4, headdim=5, groups=2, dstate=16, seed=5) if mamba2
                else _mamba1(batch=3, dim=33, dstate=16, seed=5))
        args.update(dt_softplus=softplus)
        if not has_D:
            args["D"] = None
        if not has_z:
            args["z"] = None
        if not has_bias:
            args["dt_bias"] = None
        dev, host = _to_gpu(args, "float32", "bfloat16")
        _check(dev, host, "float32", "bfloat16", out=_nan_out(dev["x"].shape, "bfloat16"))
        dev, host = _to_gpu(args, "float64", "float64")
        got = _check(dev, host, "float64", "float64")  # out=None: allocated, every element written
        assert got.shape == dev["x"].shape and got.dtype == dev["x"].dtype


@pytest.mark.gpu
def test_gpu_pool_padding_bitwise():
    from gpu_util import as64

    for mamba2 in (False, True):
        args = (_mamba2(batch=4, heads=2, headdim=8, groups=1, dstate=16, pool=9, seed=7) if mamba2
                else _mamba1(batch=4, dim=64, dstate=16, pool=9, seed=7))
        args["state_batch_indices"] = np.array([6, -1, 0, 3])
        for idx64 in (False, True):
            dev, host = _to_gpu(args, "float32", "bfloat16", idx64)
            pristine = _bits(dev["state"]).reshape(9, -1)
            out = _nan_out(dev["x"].shape, "bfloat16")
            _check(dev, host, "float32", "bfloat16", out=out)
            keep = [1, 2, 4, 5, 7, 8]
            np.testing.assert_array_equal(_bits(dev["state"]).reshape(9, -1)[keep], pristine[keep])
            o = as64(out)
            assert (o[1] == 0).all() and np.isfinite(o).all()


def _relayout(host_arr, how):
    """(contiguous host buffer, device view maker): the same values in another memory layout."""
    a = np.asarray(host_arr)
    if how == "n_major":  # N axis outermost in memory
        return np.ascontiguousarray(np.moveaxis(a, -1, 0)), lambda d: d.transpose(tuple(range(1, a.ndim)) + (0,))
    if how == "every_other":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big, lambda d: d[..., ::2]
    if how == "reversed":
        return np.ascontiguousarray(a[..., ::-1]), lambda d: d[..., ::-1]
    if how == "offset1":  # valid but misaligned for 8/16-byte accesses
        flat = np.zeros(a.size + 1, a.dtype)
        flat[1:] = a.ravel()
        return flat, lambda d: d[1:].reshape(a.shape)
    raise AssertionError(how)


@pytest.mark.gpu
def test_gpu_noncontiguous_inputs():
    """Strided, transposed, negative-stride and misaligned views against the reference."""
    from gpu_util import as64, to_device

    rng = np.random.default_rng(11)
    for mamba2, state_dtype, in_dtype in [(False, "float32", "bfloat16"), (True, "float32", "float32"),
                                          (True, "bfloat16", "float16"), (False, "float64", "float64")]:
        args = (_mamba2(batch=3, heads=4, headdim=6, groups=2, dstate=32, seed=2, pool=5) if mamba2
                else _mamba1(batch=3, dim=40, dstate=32, seed=2, pool=5))
        args["state_batch_indices"] = np.array([4, 0, 2])
        r = _rounded_args(args, state_dtype, in_dtype)
        for how_state, how_in in [("n_major", "every_other"), ("every_other", "reversed"),
                                  ("reversed", "offset1"), ("offset1", "n_major")]:
            dev, host = {}, {}
            for k, v in r.items():
                if not isinstance(v, np.ndarray) or k == "state_batch_indices":
                    dev[k] = to_device(v) if isinstance(v, np.ndarray) else v
                    host[k] = v
                    continue
                how = how_state if k == "state" else (how_in if rng.random() < 0.8 else "every_other")
                buf, view = _relayout(v, how)
                dev[k] = view(to_device(buf))
                host[k] = as64(v)
            assert dev["state"].shape == r["state"].shape
            out = _nan_out(dev["x"].shape, in_dtype, strided=True)
            _check(dev, host, state_dtype, in_dtype, out=out)


@pytest.mark.gpu
def test_gpu_tied_fast_path_equals_general():
    """Mamba-2 with A, dt, dt_bias expanded along P (stride 0) takes the tied path and matches
    the general path on the same values materialized."""
    from gpu_util import as64, rounded, sync_check, to_device

    rng = np.random.default_rng(4)
    Bsz, H, P, N, G = 3, 8, 64, 128, 2
    A_h = rounded(-np.exp(rng.standard_normal(H)), "float32")
    dt_bh = rounded(rng.uniform(-3, 0.5, (Bsz, H)), "bfloat16")
    bias_h = rounded(rng.uniform(-0.5, 0.5, H), "float32")
    common = _rounded_args(dict(
        x=rng.standard_normal((Bsz, H, P)), B=rng.standard_normal((Bsz, G, N)), C=rng.standard_normal((Bsz, G, N)),
        z=rng.standard_normal((Bsz, H, P))), "float32", "bfloat16")
    state0 = rounded(rng.standard_normal((Bsz, H, P, N)), "float32")
    Dv = rounded(rng.standard_normal((H, P)), "float32")
    dev = {k: to_device(v) for k, v in common.items()}
    dev["D"] = to_device(Dv)
    tied = dict(A=to_device(A_h)[:, None, None], dt=to_device(dt_bh)[:, :, None], dt_bias=to_device(bias_h)[:, None])
    tied = dict(A=_broadcast(tied["A"], (H, P, N)), dt=_broadcast(tied["dt"], (Bsz, H, P)),
                dt_bias=_broadcast(tied["dt_bias"], (H, P)))
    general = dict(A=to_device(np.broadcast_to(A_h[:, None, None], (H, P, N)).copy()),
                   dt=to_device(np.broadcast_to(dt_bh[:, :, None], (Bsz, H, P)).copy()),
                   dt_bias=to_device(np.broadcast_to(bias_h[:, None], (H, P)).copy()))
    s_tied, s_gen = to_device(state0), to_device(state0)
    plan_t = ssmkit.SelectiveStateUpdatePlan(s_tied, **dev, **tied, dt_softplus=True)
    plan_g = ssmkit.SelectiveStateUpdatePlan(s_gen, **dev, **general, dt_softplus=True)
    assert plan_t.tied and not plan_g.tied
    out_t, out_g = plan_t(), plan_g()
    sync_check()
    np.testing.assert_allclose(as64(s_tied), as64(s_gen), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(as64(out_t), as64(out_g), rtol=1e-2, atol=1e-2)
    host = {k: as64(v) for k, v in common.items()}
    host.update(state=as64(state0), D=as64(Dv), A=np.broadcast_to(as64(A_h)[:, None, None], (H, P, N)),
                dt=np.broadcast_to(as64(dt_bh)[:, :, None], (Bsz, H, P)),
                dt_bias=np.broadcast_to(as64(bias_h)[:, None], (H, P)), dt_softplus=True)
    want = ref_ssu(**host)
    assert_close("out (tied)", out_t, want, "bfloat16")
    assert_close("state (tied)", s_tied, host["state"], "float32")


def _broadcast(a, shape):
    import cupy

    return cupy.broadcast_to(a, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2, 3, 6, 16, 17, 64, 128, 256, 300])
def test_gpu_dstate_sizes(N):
    """N = 1, odd N (scalar path), N spanning several chunks per lane (N > 32 * kVec)."""
    for state_dtype, in_dtype in [("float32", "bfloat16"), ("bfloat16", "float32")]:
        args = _mamba2(batch=2, heads=2, headdim=5, groups=1, dstate=N, seed=N)
        dev, host = _to_gpu(args, state_dtype, in_dtype)
        _check(dev, host, state_dtype, in_dtype, out=_nan_out(dev["x"].shape, in_dtype))


@pytest.mark.gpu
def test_gpu_wide_and_batch1_shapes():
    """Batch 1 at D = 5120 (the launch-bound decode shape), D > 65535, a partial last tile."""
    for batch, dim, N in [(1, 5120, 16), (2, 70001, 2), (5, 7, 16)]:
        args = _mamba1(batch=batch, dim=dim, dstate=N, seed=dim)
        dev, host = _to_gpu(args, "float32", "bfloat16")
        _check(dev, host, "float32", "bfloat16", out=_nan_out(dev["x"].shape, "bfloat16"))


@pytest.mark.gpu
def test_gpu_layout_cache_distinguishes_layouts():
    """Calls with the same shapes but other strides/alignment reuse no stale prepared launch."""
    import cupy
    from gpu_util import sync_check

    args = _mamba1(batch=2, dim=24, dstate=16, seed=9)
    dev, host = _to_gpu(args, "float32", "float32")
    for variant in range(3):
        d = dict(dev)
        if variant == 1:
            flat = cupy.empty(dev["B"].size + 1, dev["B"].dtype)
            d["B"] = flat[1:].reshape(dev["B"].shape)
            d["B"][...] = dev["B"]
        if variant == 2:
            d["x"] = cupy.asfortranarray(dev["x"])
        for _ in range(2):  # first call prepares, second hits the cache
            s = dev["state"].copy()
            got = ssmkit.selective_state_update(**{**d, "state": s})
            sync_check()
            want_state = host["state"].copy()
            want = ref_ssu(**{**host, "state": want_state})
            assert_close("out", got, want, "float32")
            assert_close("state", s, want_state, "float32")


@pytest.mark.gpu
def test_gpu_plan_rebind_and_checks():
    import cupy
    from gpu_util import sync_check

    args = _mamba1(batch=2, dim=24, dstate=16, seed=10)
    dev, host = _to_gpu(args, "float32", "float32")
    s = dev["state"].copy()
    plan = ssmkit.SelectiveStateUpdatePlan(**{**dev, "state": s})
    out1 = plan().copy()
    x2 = dev["x"] * 2
    out2 = plan(x=x2, state=dev["state"].copy())
    sync_check()
    want_state = host["state"].copy()
    want = ref_ssu(**{**host, "x": cupy.asnumpy(x2).astype(np.float64), "state": want_state})
    assert_close("out (rebound x)", out2, want, "float32")
    assert not cupy.array_equal(out1, out2)
    with pytest.raises(ValueError, match="argument 'x' must match the plan's layout"):
        plan(x=cupy.asfortranarray(dev["x"]))
    with pytest.raises(ValueError, match="plan was built without 'state_batch_indices'"):
        plan(state_batch_indices=cupy.zeros(2, cupy.int32))


def _graph_layer_host(mamba2, seed, combo=None):
    """One layer's host arrays: fp32 state with bf16 inputs, or a MODEL_COMBOS entry's dtypes."""
    a = (_mamba2(batch=4, heads=4, headdim=16, groups=2, dstate=32, seed=seed) if mamba2
         else _mamba1(batch=4, dim=96, dstate=16, seed=seed))
    if combo is None:
        r = _rounded_args(a, "float32", "bfloat16")
    else:
        d = MODEL_COMBOS[combo]
        r = _rounded_args(a, d["state"], d["x"], dtypes=d)
    r["out"] = np.zeros(r["x"].shape, r["x"].dtype)
    return r


@pytest.mark.gpu
@pytest.mark.parametrize("combo", [None, "upstream_mamba1_bf16", "transformers_mamba_bf16"])
@pytest.mark.parametrize("mamba2", [False, True])
def test_gpu_cuda_graph_replay_equals_eager(mamba2, combo):
    """Many layers' decode steps captured once in a CUDA graph (the documented recipe), replayed
    for two tokens with new inputs copied into the static buffers: bitwise equal to eager calls.
    Also in the dtypes real models pass (bf16 state and D with fp32 A; fp32 dt_bias)."""
    import cupy
    from gpu_util import to_device

    L = 6
    hosts = [_graph_layer_host(mamba2, 20 + l, combo) for l in range(L)]
    upload = lambda h: {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in h.items()}  # noqa: E731
    static = [upload(h) for h in hosts]
    eager = [upload(h) for h in hosts]
    plans = [ssmkit.SelectiveStateUpdatePlan(**d) for d in static]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for plan in plans:
            plan()
        graph = stream.end_capture()
    for token in range(2):
        for d, e, l in zip(static, eager, range(L)):
            fresh = _graph_layer_host(mamba2, 100 + 10 * token + l, combo)
            for k in ("x", "dt", "z", "B", "C"):
                d[k].set(fresh[k])
                e[k].set(fresh[k])
        cupy.cuda.runtime.deviceSynchronize()  # the uploads ran on the default stream
        graph.launch(stream)
        stream.synchronize()
        for e in eager:
            ssmkit.selective_state_update(**e)
        cupy.cuda.runtime.deviceSynchronize()
        for d, e in zip(static, eager):
            np.testing.assert_array_equal(_bits(d["state"]), _bits(e["state"]))
            np.testing.assert_array_equal(_bits(d["out"]), _bits(e["out"]))
        assert not np.isnan(np.asarray(cupy.asnumpy(static[0]["out"]), np.float32)).any()


# ---- GPU: dtype combinations (issue 13) -----------------------------------------------------

# Every (state, x, B/C) template combination the kernel reads natively (15).
DTYPE_MATRIX = [(s_, x_, bc) for x_ in ("float16", "bfloat16", "float32")
                for s_ in ("float32", "float16", "bfloat16") for bc in op.BC_DTYPES[x_]]


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype, in_dtype, bc_dtype", DTYPE_MATRIX,
                         ids=[f"state_{a}-x_{b}-bc_{c}" for a, b, c in DTYPE_MATRIX])
def test_gpu_dtype_matrix(state_dtype, in_dtype, bc_dtype):
    """state x input x B/C dtype x D dtype x dt_bias dtype (each fp32, fp16, bf16) x Mamba-1 /
    Mamba-2 / Mamba-2 tied (vector and scalar state paths), all read without a copy, against
    the float64 reference of the values as rounded to their own dtypes."""
    chan = ("float32", "float16", "bfloat16")
    for i, (D_t, bias_t) in enumerate(itertools.product(chan, chan)):
        for kind in ("m1", "m2", "m2tie"):
            seed = 40 + 3 * i + ("m1", "m2", "m2tie").index(kind)
            args = (_mamba1(batch=3, dim=37, dstate=16, seed=seed) if kind == "m1"
                    else _mamba2(batch=3, heads=4, headdim=6, groups=2, dstate=32 if kind == "m2" else 20, seed=seed))
            dts = dict(B=bc_dtype, C=bc_dtype, D=D_t, dt_bias=bias_t)
            dev, host = _to_gpu(args, state_dtype, in_dtype, dtypes=dts)
            if kind == "m2tie":
                _expand_along_p(dev, host)
            spec = op.validate(*(dev[k] for k in ARGS[:9]), dt_softplus=True)
            assert spec.widen == () and spec.bc_dtype == bc_dtype and (spec.D_dtype, spec.bias_dtype) == (D_t, bias_t)
            _check(dev, host, state_dtype, in_dtype, out=_nan_out(dev["x"].shape, in_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("combo", sorted(MODEL_COMBOS))
@pytest.mark.parametrize("mamba2", [False, True])
def test_gpu_model_combos_steps(combo, mamba2):
    """The dtypes real models pass, e.g. upstream's Mamba-1 step (state, x, dt, z, B, C, D,
    dt_bias bf16; A fp32; dt_softplus), over three consecutive steps at a model's width
    (Mamba-1 D = 1536; Mamba-2 as upstream passes it: A, dt, D, dt_bias expanded along P)."""
    import cupy
    from gpu_util import as64, rounded, sync_check, to_device

    d = MODEL_COMBOS[combo]
    rng = np.random.default_rng(7)
    base = (_mamba2(batch=4, heads=24, headdim=64, groups=1, dstate=128, seed=8) if mamba2
            else _mamba1(batch=4, dim=1536, dstate=16, seed=8))
    if mamba2:  # per-head A, dt_bias, D, as Mamba-2 keeps them
        for k in ("A", "dt_bias", "D"):
            base[k] = np.ascontiguousarray(np.broadcast_to(base[k][:, :1], base[k].shape))
        base["dt"] = np.ascontiguousarray(np.broadcast_to(base["dt"][:, :, :1], base["dt"].shape))
    r = _rounded_args(base, d["state"], d["x"], dtypes=d)
    state = to_device(r["state"])
    host_state = r["state"].copy()            # the reference updates it in its own dtype, as the kernel
    weights = {k: to_device(r[k]) for k in ("A", "D", "dt_bias")}
    hweights = {k: as64(r[k]) for k in ("A", "D", "dt_bias")}
    if mamba2:
        H, P, N = r["A"].shape
        weights["A"] = cupy.broadcast_to(weights["A"][:, :1, :], (H, P, N))
        weights["D"] = cupy.broadcast_to(weights["D"][:, :1], (H, P))
        weights["dt_bias"] = cupy.broadcast_to(weights["dt_bias"][:, :1], (H, P))
    for step in range(3):
        act = {k: rounded(rng.standard_normal(base[k].shape) if k != "dt" else
                          rng.uniform(-2, 0.5, base[k].shape), d[k]) for k in ("x", "dt", "z", "B", "C")}
        if mamba2:
            act["dt"] = np.ascontiguousarray(np.broadcast_to(act["dt"][:, :, :1], act["dt"].shape))
        dev = {k: to_device(v) for k, v in act.items()}
        if mamba2:
            dev["dt"] = cupy.broadcast_to(dev["dt"][:, :, :1], dev["dt"].shape)
        got = ssmkit.selective_state_update(state, dev["x"], dev["dt"], weights["A"], dev["B"], dev["C"],
                                            D=weights["D"], z=dev["z"], dt_bias=weights["dt_bias"], dt_softplus=True)
        sync_check()
        want = ref_ssu(host_state, as64(act["x"]), as64(act["dt"]), hweights["A"], as64(act["B"]), as64(act["C"]),
                       D=hweights["D"], z=as64(act["z"]), dt_bias=hweights["dt_bias"], dt_softplus=True)
        assert got.dtype == dev["x"].dtype
        assert_close(f"out step {step}", got, want, d["x"])
        assert_close(f"state step {step}", state, as64(host_state), d["state"])
    if mamba2:
        assert any(p.tie for p in op._CACHE.values())


# Combinations served by exact host-side widening (one copy per widened argument per call).
WIDENED = [
    ("A_bf16_m1", False, False, "float32", "bfloat16", dict(A="bfloat16")),
    ("A_fp16_m2_tied", True, True, "bfloat16", "float16", dict(A="float16")),
    ("dt_fp16_z_bf16_x_fp32", False, False, "float32", "float32", dict(dt="float16", z="bfloat16")),
    ("dt_bf16_x_fp32_m2_tied", True, True, "float16", "float32", dict(dt="bfloat16", D="bfloat16")),
    ("B_bf16_C_fp16_x_bf16", True, False, "bfloat16", "bfloat16", dict(B="bfloat16", C="float16")),
    ("BC_bf16_x_fp32", True, False, "float32", "float32", dict(B="bfloat16", C="bfloat16")),
    ("BC_fp16_x_bf16", False, False, "bfloat16", "bfloat16", dict(B="float16", C="float16", D="float16")),
    ("x_fp64_narrower_rest", False, False, "float64", "float64",
     dict(dt="float32", z="float16", A="float32", B="float32", C="bfloat16", D="float32", dt_bias="float16")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, mamba2, tie, state_dtype, in_dtype, over", WIDENED, ids=[w[0] for w in WIDENED])
def test_gpu_widened_arguments(name, mamba2, tie, state_dtype, in_dtype, over):
    """Arguments the kernel does not read in their own dtype are widened exactly on the host:
    first call (prepares) and second call (cached layout, fresh copies) both match the reference;
    a widened expanded A keeps the tied fast path."""
    op._CACHE.clear()
    for call in range(2):
        args = (_mamba2(batch=3, heads=4, headdim=6, groups=2, dstate=32, seed=60 + call) if mamba2
                else _mamba1(batch=3, dim=37, dstate=16, seed=60 + call))
        dev, host = _to_gpu(args, state_dtype, in_dtype, dtypes=over)
        if tie:
            _expand_along_p(dev, host)
        spec = op.validate(*(dev[k] for k in ARGS[:9]), dt_softplus=True)
        assert spec.widen and {ARGS[i] for i, _ in spec.widen} <= set(over)
        _check(dev, host, state_dtype, in_dtype, out=_nan_out(dev["x"].shape, in_dtype))
    assert len(op._CACHE) == 1
    (prep,) = op._CACHE.values()
    assert prep.widen == spec.widen and prep.tie == tie


@pytest.mark.gpu
def test_gpu_fp32_bc_layouts():
    """fp32 B/C with 16-bit x and state (32-byte B/C chunks per 16-byte state chunk): strided,
    reversed and misaligned B/C views against the reference."""
    from gpu_util import as64, to_device

    for how in ("every_other", "reversed", "offset1", "n_major"):
        args = _mamba2(batch=3, heads=4, headdim=5, groups=2, dstate=64, seed=70)
        r = _rounded_args(args, "bfloat16", "bfloat16", dtypes=dict(B="float32", C="float32", D="bfloat16"))
        dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in r.items()}
        host = {k: (as64(v) if isinstance(v, np.ndarray) else v) for k, v in r.items()}
        for k in ("B", "C"):
            buf, view = _relayout(r[k], how)
            dev[k] = view(to_device(buf))
        _check(dev, host, "bfloat16", "bfloat16", out=_nan_out(dev["x"].shape, "bfloat16"))


@pytest.mark.gpu
@pytest.mark.parametrize("combo", ["upstream_mamba1_bf16", "transformers_mamba_bf16", "fp32_state_bf16_inputs"])
def test_gpu_torch_model_combos(combo):
    """Through ssmkit.torch on CUDA tensors, as the model layer calls it."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import ssmkit.torch as sst

    d = MODEL_COMBOS[combo]
    t = {k: (None if v is None or not hasattr(v, "cuda") else v.cuda()) if k != "dt_softplus" else v
         for k, v in _torch_args(d, False, seed=9).items()}
    ref_state = t["state"].double().cpu().numpy()
    want = ref_ssu(ref_state, *(t[k].double().cpu().numpy() for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
                   dt_softplus=True)
    state = t["state"]
    out = sst.selective_state_update(state, t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                     dt_bias=t["dt_bias"], dt_softplus=True)
    torch.cuda.synchronize()
    assert out.dtype == t["x"].dtype and state.dtype == t["state"].dtype
    assert_close("out", out.double().cpu().numpy(), want, d["x"])
    assert_close("state", state.double().cpu().numpy(), ref_state, d["state"])


# ---- CPU: the CuPy host path on fake device arrays (no GPU: pointers only, kernel recorded) ----

@pytest.fixture
def fake_device(monkeypatch):
    """CuPy arrays over made-up device addresses and a kernel stub that records its launches."""
    cupy = pytest.importorskip("cupy")
    launches = []

    class Stub:
        def __call__(self, grid, block, args, **kw):
            (prm,) = args
            launches.append((grid, block, bytes(np.asarray(prm).tobytes())))

    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(op, "_num_sms", lambda device: 132)
    monkeypatch.setattr(op, "get_kernel", lambda ref: Stub())
    monkeypatch.setattr(op, "_CACHE", {})
    next_addr = [1 << 32]

    def make(shape, dtype, offset_bytes=0):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize + 64
        mem = cupy.cuda.memory.UnownedMemory(next_addr[0], n, None, device_id=0)
        next_addr[0] += (n + 4095) // 4096 * 4096
        return cupy.ndarray(shape, dtype, memptr=cupy.cuda.memory.MemoryPointer(mem, offset_bytes))

    return make, launches


def _fake_args(make, mamba2=False, dtype=np.float16):
    B_, D_, N_ = 3, 40, 16
    if mamba2:
        chan, bc = (4, 10), (B_, 2, N_)
    else:
        chan, bc = (D_,), (B_, N_)
    return dict(state=make((B_,) + chan + (N_,), np.float32), x=make((B_,) + chan, dtype),
                dt=make((B_,) + chan, dtype), A=make(chan + (N_,), np.float32), B=make(bc, dtype),
                C=make(bc, dtype), D=make(chan, np.float32), z=make((B_,) + chan, dtype),
                dt_bias=make(chan, np.float32), dt_softplus=True, out=make((B_,) + chan, dtype))


def _decode(blob):
    return np.frombuffer(blob, dtype=op.PARAMS.dtype)[0]


def test_host_path_packs_pointers_and_caches(fake_device):
    make, launches = fake_device
    args = _fake_args(make)
    out = ssmkit.selective_state_update(**args)
    assert out is args["out"] and len(launches) == 1 and len(op._CACHE) == 1
    grid, block, blob = launches[0]
    prm = _decode(blob)
    for field, name in zip(op._PTR_FIELDS, op.ARG_NAMES):
        want = 0 if args.get(name) is None else args[name].data.ptr
        assert int(prm[field]) == want, field
    assert prm["vec_state"] == 1 and prm["lanes"] == 4 and prm["dt_softplus"] == 1
    assert block[0] * grid[0] >= prm["total_groups"] * prm["lanes"]
    # Same layout, new buffers: cache hit, new pointers.
    args2 = _fake_args(make)
    ssmkit.selective_state_update(**args2)
    assert len(op._CACHE) == 1
    assert int(_decode(launches[-1][2])["state"]) == args2["state"].data.ptr
    # Other strides (a transposed state) or alignment (B one element in): a new entry, other flags.
    st = make((16, 40, 3), np.float32).transpose(2, 1, 0)
    ssmkit.selective_state_update(**{**args2, "state": st})
    assert len(op._CACHE) == 2 and _decode(launches[-1][2])["vec_state"] == 0
    assert int(_decode(launches[-1][2])["state_n"]) == 3 * 40
    Bmis = make((3, 16), np.float16, offset_bytes=2)
    ssmkit.selective_state_update(**{**args2, "B": Bmis})
    assert len(op._CACHE) == 3 and _decode(launches[-1][2])["vec_B"] == 0
    # A validation error still raises after the layout was cached.
    with pytest.raises(TypeError, match="'dt_softplus' must be a bool"):
        ssmkit.selective_state_update(**{**args2, "dt_softplus": 1})
    with pytest.raises(ValueError, match="argument 'dt' must have shape"):
        ssmkit.selective_state_update(**{**args2, "dt": make((3, 41), np.float16)})


def test_host_path_plan_rebind(fake_device):
    make, launches = fake_device
    args = _fake_args(make, mamba2=True)
    plan = ssmkit.SelectiveStateUpdatePlan(**args)
    assert plan() is args["out"]
    first = _decode(launches[-1][2])
    x2, s2 = make(args["x"].shape, np.float16), make(args["state"].shape, np.float32)
    plan(x=x2, state=s2)
    second = _decode(launches[-1][2])
    assert int(second["x"]) == x2.data.ptr and int(second["state"]) == s2.data.ptr
    assert int(second["B"]) == int(first["B"]) == args["B"].data.ptr
    plan()  # the binding persists
    assert int(_decode(launches[-1][2])["x"]) == x2.data.ptr
    # everything but the pointers is unchanged
    a, b = first.copy(), second.copy()
    for f in ("x", "state"):
        a[f] = b[f] = 0
    assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="argument 'state' must match the plan's layout"):
        plan(state=make((3, 4, 10, 17), np.float32)[..., :16])
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        plan(state=make(args["state"].shape, np.float32, offset_bytes=4))
    with pytest.raises(TypeError, match="must be a cupy.ndarray"):
        plan(x=np.zeros(args["x"].shape, np.float16))
    assert plan.kernel == op.kernel_ref("float32", "float16", False)


def _recording_kernels(monkeypatch):
    """Record the KernelRefs the host path asks for (on top of fake_device's stub kernels)."""
    refs = []
    stub = op.get_kernel
    monkeypatch.setattr(op, "get_kernel", lambda ref: (refs.append(ref), stub(ref))[1])
    return refs


def test_host_path_mixed_dtypes_read_natively(fake_device, monkeypatch):
    """Upstream's Mamba-1 step (bf16 state/x/dt/z/B/C/D/dt_bias, fp32 A) and transformers' (fp32
    dt_bias): no copies, D/dt_bias types travel as codes; fp32 B/C with bf16 x picks TBC = fp32."""
    from gpu_util import np_dtype

    make, launches = fake_device
    refs = _recording_kernels(monkeypatch)
    bf16 = np_dtype("bfloat16")
    for mamba2 in (False, True):
        args = _fake_args(make, mamba2=mamba2, dtype=bf16)
        args["state"] = make(args["state"].shape, bf16)
        args["D"] = make(args["D"].shape, bf16)
        args["dt_bias"] = make(args["dt_bias"].shape, bf16)
        ssmkit.selective_state_update(**args)
        prm = _decode(launches[-1][2])
        assert (prm["D_type"], prm["bias_type"]) == (op.SCALAR_CODE["bfloat16"],) * 2
        assert refs[-1] == op.kernel_ref("bfloat16", "bfloat16", False, "bfloat16")
        assert int(prm["D"]) == args["D"].data.ptr and int(prm["A"]) == args["A"].data.ptr
        hf = dict(args, dt_bias=make(args["dt_bias"].shape, np.float32))
        plan = ssmkit.SelectiveStateUpdatePlan(**hf)
        plan()
        prm = _decode(launches[-1][2])
        assert (prm["D_type"], prm["bias_type"]) == (op.SCALAR_CODE["bfloat16"], op.SCALAR_CODE["float32"])
        assert plan.kernel == op.kernel_ref("bfloat16", "bfloat16", False)
        fp32_bc = dict(args, B=make(args["B"].shape, np.float32), C=make(args["C"].shape, np.float32),
                       state=make(args["state"].shape, np.float32))
        ssmkit.selective_state_update(**fp32_bc)
        prm = _decode(launches[-1][2])
        assert refs[-1] == op.kernel_ref("float32", "bfloat16", False, "float32")
        assert prm["vec_B"] == prm["vec_C"] == 1 and int(prm["B"]) == fp32_bc["B"].data.ptr


def test_host_path_widening_and_cache(fake_device, monkeypatch):
    """A call that needs a widening copy (16-bit A) launches on a fresh copy every call, keeps one
    cache entry, and falls back to its own launch when a copy's address breaks the vector flags."""
    make, launches = fake_device
    refs = _recording_kernels(monkeypatch)
    made, offset = [], [0]

    def fake_widen(arr, dtype):
        a = make(arr.shape, dtype, offset_bytes=offset[0])
        made.append(a)
        return a

    monkeypatch.setattr(op, "_widen", fake_widen)
    args = _fake_args(make)                       # fp16 x, fp32 state
    args["A"] = make(args["A"].shape, np.float16)
    ssmkit.selective_state_update(**args)
    assert len(made) == 1 and made[0].dtype == np.float32 and len(op._CACHE) == 1
    (prep,) = op._CACHE.values()
    assert prep.widen == ((op.ARG_NAMES.index("A"), "float32"),)
    prm = _decode(launches[-1][2])
    assert int(prm["A"]) == made[0].data.ptr != args["A"].data.ptr and prm["vec_A"] == 1
    assert int(prm["B"]) == args["B"].data.ptr
    assert refs[-1] == op.kernel_ref("float32", "float16", False)
    ssmkit.selective_state_update(**args)         # cache hit: a new copy, same prepared launch
    assert len(made) == 2 and len(op._CACHE) == 1 and len(refs) == 1
    prm2 = _decode(launches[-1][2])
    assert int(prm2["A"]) == made[1].data.ptr != made[0].data.ptr
    offset[0] = 4                                 # a copy 4 bytes off 16-byte alignment
    ssmkit.selective_state_update(**args)
    prm3 = _decode(launches[-1][2])
    assert int(prm3["A"]) == made[2].data.ptr and prm3["vec_A"] == 0 and prm3["vec_state"] == 1
    assert len(op._CACHE) == 1 and next(iter(op._CACHE.values())) is prep
    with pytest.raises(TypeError, match=r"SelectiveStateUpdatePlan does not convert arguments: 'A' is float16 but "
                                        r"the kernel reads it as float32"):
        ssmkit.SelectiveStateUpdatePlan(**args)
    dt32 = dict(_fake_args(make, dtype=np.float32), dt=make((3, 40), np.float16))
    with pytest.raises(TypeError, match=r"'dt' is float16 but the kernel reads it as float32"):
        ssmkit.SelectiveStateUpdatePlan(**dt32)

"""selective_scan: validation and the CPU path (CI); GPU kernels against the float64 reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import ssmkit
from ssmkit.ops import selective_scan as op
from ssmkit.reference import selective_scan as ref_fwd, selective_scan_bwd as ref_bwd

from compare import assert_close
from gpu_examples import shards
from gpu_util import as64, poison, rounded, sync_check, to_device
from strategies import scan_specs, ScanSpec

GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


# ---------------------------------------------------------------- problems in kernel dtypes

def kernel_spec(spec: ScanSpec) -> ScanSpec:
    """Adapt a reference problem to what the kernels take: complex A comes with complex B/C,
    and variable B and C share one group count."""
    rep = {}
    if spec.complex_A:
        rep.update(complex_B=True, complex_C=True)
    if spec.B_kind == "group" and spec.C_kind == "group":
        rep["C_groups"] = spec.B_groups
    if spec.B_kind == "group" and spec.C_kind == "var":
        rep["C_kind"] = "group"
        rep["C_groups"] = spec.B_groups
    if spec.C_kind == "group" and spec.B_kind == "var":
        rep["B_kind"] = "group"
        rep["B_groups"] = spec.C_groups
    return dataclasses.replace(spec, **rep)


def cast_inputs(inputs: dict, in_dtype: str) -> dict:
    """Host arrays in the dtypes the kernel takes (what the device will see)."""
    real_w, complex_w = op.weight_dtypes(in_dtype)
    cplx = np.iscomplexobj(inputs["A"])
    w = complex_w if cplx else real_w
    out = {}
    for k, v in inputs.items():
        if not isinstance(v, np.ndarray):
            out[k] = v
        elif k in ("u", "delta", "z"):
            out[k] = rounded(v, in_dtype)
        elif k in ("A", "initial_state"):
            out[k] = rounded(v.astype(np.complex128) if cplx else v, w)
        elif k in ("B", "C"):
            if v.ndim == 2:
                out[k] = rounded(v.astype(np.complex128) if cplx else v, w)
            else:
                out[k] = rounded(v.astype(np.complex128), w) if cplx else rounded(v, in_dtype)
        else:  # D, delta_bias
            out[k] = rounded(v, real_w)
    return out


def run_both(inputs, in_dtype, want_grad, rng, deterministic=None):
    host = cast_inputs(inputs, in_dtype)
    dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    ref_in = {k: (as64(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    Bsz, Dsz, L = host["u"].shape
    N = host["A"].shape[1]
    out_buf = poison((Bsz, Dsz, L), in_dtype)
    kw = {k: dev[k] for k in ("D", "z", "delta_bias", "initial_state")}
    if not want_grad:
        out, last = ssmkit.selective_scan(dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"],
                                          delta_softplus=dev["delta_softplus"], return_last_state=True,
                                          out=out_buf, **kw)
        sync_check()
        w_out, w_last = ref_fwd(ref_in["u"], ref_in["delta"], ref_in["A"], ref_in["B"], ref_in["C"],
                                delta_softplus=ref_in["delta_softplus"], return_last_state=True,
                                **{k: ref_in[k] for k in kw})
        return (out, last), (w_out, w_last), host
    out, last, saved = ssmkit.selective_scan_fwd(dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"],
                                                 delta_softplus=dev["delta_softplus"], out=out_buf, **kw)
    dout = rounded(rng.standard_normal((Bsz, Dsz, L)), in_dtype)
    cplx = np.iscomplexobj(host["A"])
    dlast = rng.standard_normal((Bsz, Dsz, N)) + (1j * rng.standard_normal((Bsz, Dsz, N)) if cplx else 0)
    dlast = rounded(dlast, host["A"].dtype.name)
    grads = ssmkit.selective_scan_bwd(to_device(dout), dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"],
                                      delta_softplus=dev["delta_softplus"], saved=saved,
                                      dlast_state=to_device(dlast), deterministic=deterministic, **kw)
    sync_check()
    w = ref_bwd(as64(dout), ref_in["u"], ref_in["delta"], ref_in["A"], ref_in["B"], ref_in["C"],
                delta_softplus=ref_in["delta_softplus"], dlast_state=as64(dlast),
                **{k: ref_in[k] for k in kw})
    return (out, last) + tuple(grads), None, w


def check_forward(got, want, in_dtype, cplx):
    assert_close("out", got[0], want[0], in_dtype)
    state_dt = op.weight_dtypes(in_dtype)[1 if cplx else 0]
    assert_close("last_state", got[1], want[1], state_dt)


def check_backward(got, want, in_dtype, cplx):
    state_dt = op.weight_dtypes(in_dtype)[1 if cplx else 0]
    for name, g, w in zip(GRAD_NAMES, got[2:], want):
        if w is None:
            assert g is None, name
            continue
        # Weights' gradients sum over B and L: judge them at the state precision.
        dt = in_dtype if name in ("du", "ddelta", "dz") or in_dtype == "float64" else state_dt
        if in_dtype in ("bfloat16", "float16") and name not in ("du", "ddelta", "dz"):
            dt = in_dtype  # computed from 16-bit inputs: the inputs' rounding dominates
        assert_close(name, g, w, dt, grad=True)


# ---------------------------------------------------------------- CPU (CI)

def test_numpy_path_is_reference():
    spec = scan_specs().example() if False else None  # noqa: F841 (hypothesis example() is slow)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 4, 9))
    delta = rng.uniform(0.1, 1, (2, 4, 9))
    A = -rng.uniform(0.5, 2, (4, 3))
    B = rng.standard_normal((2, 3, 9))
    C = rng.standard_normal((4, 3))
    out, last = ssmkit.selective_scan(u, delta, A, B, C, D=np.ones(4), return_last_state=True)
    w_out, w_last = ref_fwd(u, delta, A, B, C, D=np.ones(4), return_last_state=True)
    np.testing.assert_array_equal(out, w_out)
    np.testing.assert_array_equal(last, w_last)
    o2, l2, saved = ssmkit.selective_scan_fwd(u, delta, A, B, C, D=np.ones(4))
    np.testing.assert_array_equal(o2, w_out)
    g = ssmkit.selective_scan_bwd(np.ones_like(u), u, delta, A, B, C, D=np.ones(4), saved=saved)
    w = ref_bwd(np.ones_like(u), u, delta, A, B, C, D=np.ones(4))
    for a, b in zip(g, w):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b)


def _args(**over):
    rng = np.random.default_rng(1)
    args = dict(u=rng.standard_normal((2, 4, 9)).astype(np.float32),
                delta=rng.uniform(0.1, 1, (2, 4, 9)).astype(np.float32),
                A=-np.ones((4, 3), np.float32), B=np.ones((2, 3, 9), np.float32),
                C=np.ones((4, 3), np.float32))
    args.update(over)
    return args


@pytest.mark.parametrize("over, err, match", [
    (dict(u=np.ones((2, 4), np.float32)), ValueError, "'u' must be \\(B, D, L\\)"),
    (dict(delta=np.ones((2, 4, 8), np.float32)), ValueError, "'delta' must have shape \\(2, 4, 9\\)"),
    (dict(delta=np.ones((2, 4, 9), np.float64)), TypeError, "'delta' must have dtype"),
    (dict(u=np.ones((2, 4, 9), np.int32)), TypeError, "'u' must have dtype"),
    (dict(A=np.ones((5, 3), np.float32)), ValueError, "'A' must have shape \\(4, \\*\\)"),
    (dict(A=np.ones((4, 3), np.float64)), TypeError, "'A' must have dtype"),
    (dict(A=np.ones((4, 0), np.float32)), ValueError, "N \\(A.shape\\[1\\]\\) = 0 is out of range"),
    (dict(A=np.ones((4, 4096), np.float32)), ValueError, "out of range"),
    (dict(B=np.ones((2, 3, 8), np.float32)), ValueError, "'B' must have shape \\(2, 3, 9\\)"),
    (dict(B=np.ones((2, 3, 3, 9), np.float32)), ValueError, "groups G = 3 of argument 'B' must divide D = 4"),
    (dict(B=np.ones((3, 3), np.float32)), ValueError, "'B' must have shape \\(4, 3\\)"),
    (dict(B=np.ones((2, 3, 9), np.float64)), TypeError, "'B' must have dtype"),
    (dict(C=np.ones((9,), np.float32)), ValueError, "'C' must be constant"),
    (dict(B=np.ones((2, 2, 3, 9), np.float32), C=np.ones((2, 4, 3, 9), np.float32)), ValueError,
     "same number of groups"),
    (dict(D=np.ones((5,), np.float32)), ValueError, "'D' must have shape \\(4,\\)"),
    (dict(D=np.ones((4,), np.float16)), TypeError, "'D' must have dtype"),
    (dict(z=np.ones((2, 4, 8), np.float32)), ValueError, "'z' must have shape"),
    (dict(delta_bias=np.ones((3,), np.float32)), ValueError, "'delta_bias' must have shape"),
    (dict(initial_state=np.ones((2, 4, 4), np.float32)), ValueError, "'initial_state' must have shape \\(2, 4, 3\\)"),
    (dict(initial_state=np.ones((2, 4, 3), np.complex64)), TypeError, "'initial_state' must have dtype"),
    (dict(delta_softplus="yes"), TypeError, "'delta_softplus' must be a bool"),
    (dict(u=[[1.0]]), TypeError, "'u' must be a NumPy or CuPy array"),
])
def test_validation(over, err, match):
    with pytest.raises(err, match=match):
        ssmkit.selective_scan(**_args(**over))


def test_mixed_array_types_rejected():
    class FakeCupy:  # looks like a CuPy array to the backend check
        __module__ = "cupy._core.core"
    with pytest.raises(TypeError, match="one kind"):
        ssmkit.selective_scan(**_args(B=FakeCupy()))


def test_kernel_choice_is_one_function():
    cfg = op.kernel_config("bfloat16", "float32", True, True)
    assert op.fwd_ref(cfg).name == "ssm::selective_scan_fwd<ssm::bf16, float, true, true, 16>"
    assert len(op.variants()) == 64
    # the layout the host sizes must match the kernel's constants
    assert op.SAVE_EVERY == 32 * op.BWD_ITEMS


@pytest.mark.nvrtc
def test_params_layout():
    from ssmkit._nvrtc_offline import compile_file

    cfg = op.kernel_config("float32", "float32", True, True)
    compile_file("selective_scan_fwd.cu", [op.fwd_ref(cfg).name], 90, extra_source=op.PARAMS.layout_asserts())


# ---------------------------------------------------------------- GPU

IN_DTYPES = ["float32", "float64", "bfloat16", "float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(50, 0.5))
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=scan_specs(max_seqlen=600, max_dim=12, max_dstate=20), in_dtype=st.sampled_from(IN_DTYPES))
def test_gpu_forward(shard, spec, in_dtype):
    spec = kernel_spec(spec)
    got, want, _ = run_both(spec.build(), in_dtype, False, np.random.default_rng(spec.seed))
    check_forward(got, want, in_dtype, spec.complex_A)


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(50, 0.5))
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=scan_specs(max_seqlen=600, max_dim=12, max_dstate=20), in_dtype=st.sampled_from(IN_DTYPES))
def test_gpu_backward(shard, spec, in_dtype):
    spec = kernel_spec(spec)
    got, _, want = run_both(spec.build(), in_dtype, True, np.random.default_rng(spec.seed))
    check_backward(got, want, in_dtype, spec.complex_A)


def _pinned(batch=1, dim=4, dstate=4, seqlen=33, kinds=("var", "var"), groups=1, complex_A=False,
            flags=True, seed=0):
    return ScanSpec(batch=batch, dim=dim, dstate=dstate, seqlen=seqlen, B_kind=kinds[0], C_kind=kinds[1],
                    B_groups=groups, C_groups=groups, complex_A=complex_A, complex_B=complex_A,
                    complex_C=complex_A, has_D=flags, has_z=flags, has_delta_bias=flags,
                    delta_softplus=flags, has_initial_state=flags, seed=seed)


PINNED = {
    "L1": _pinned(seqlen=1),
    "L2049": _pinned(batch=2, seqlen=2049, kinds=("group", "group"), groups=2),
    "L4097": _pinned(seqlen=4097, dstate=3),
    "N1": _pinned(dstate=1, seqlen=300),
    "N256": _pinned(dstate=256, seqlen=300, dim=3),
    "N256_const": _pinned(dstate=256, seqlen=70, kinds=("const", "const")),
    "complex_L600": _pinned(seqlen=600, complex_A=True, kinds=("var", "const")),
    "odd_D": _pinned(dim=9, batch=3, seqlen=77, kinds=("const", "var"), flags=False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(PINNED))
@pytest.mark.parametrize("in_dtype", ["float32", "float64", "bfloat16"])
def test_gpu_pinned(name, in_dtype):
    spec = PINNED[name]
    rng = np.random.default_rng(7)
    got, want, _ = run_both(spec.build(), in_dtype, False, rng)
    check_forward(got, want, in_dtype, spec.complex_A)
    got, _, want = run_both(spec.build(), in_dtype, True, rng)
    check_backward(got, want, in_dtype, spec.complex_A)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["L2049", "L4097", "N256", "complex_L600", "odd_D"])
@pytest.mark.parametrize("in_dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("max_segments", [1, 16])
def test_gpu_backward_dbc_modes(name, in_dtype, deterministic, max_segments, monkeypatch):
    """Both ways of summing variable dB/dC (fixed-order partials, fp32 atomics), with and without
    the time split (small problems split into as many segments as chunks), match the reference."""
    monkeypatch.setattr(op, "MAX_SEGMENTS", max_segments)
    op._BWD_PLANS.clear()
    spec = PINNED[name]
    got, _, want = run_both(spec.build(), in_dtype, True, np.random.default_rng(9), deterministic=deterministic)
    check_backward(got, want, in_dtype, spec.complex_A)


@pytest.mark.gpu
def test_gpu_fast_decay_and_large_delta():
    spec = _pinned(batch=2, dim=5, seqlen=700, dstate=8)
    inputs = spec.build()
    inputs["A"] = inputs["A"] * 1e3                     # exp(delta A) underflows to 0
    got, want, _ = run_both(inputs, "float32", False, np.random.default_rng(3))
    check_forward(got, want, "float32", False)
    inputs = spec.build()
    inputs["delta"] = inputs["delta"] + 40.0             # softplus passes large deltas through
    got, want, _ = run_both(inputs, "float32", False, np.random.default_rng(3))
    check_forward(got, want, "float32", False)
    got, _, want = run_both(inputs, "float64", True, np.random.default_rng(3))
    check_backward(got, want, "float64", False)


@pytest.mark.gpu
def test_gpu_wide_D_single_batch():
    spec = _pinned(batch=1, dim=65537, dstate=4, seqlen=40, kinds=("var", "var"))
    got, want, _ = run_both(spec.build(), "float32", False, np.random.default_rng(5))
    check_forward(got, want, "float32", False)


@pytest.mark.gpu
def test_gpu_noncontiguous_inputs():
    import cupy

    rng = np.random.default_rng(11)
    Bsz, Dsz, L, N = 4, 6, 300, 5
    u_full = rng.standard_normal((2 * Bsz, L, Dsz)).astype(np.float32)       # (B, L, D) storage
    delta_full = rng.uniform(0.05, 1, (2 * Bsz, L, Dsz)).astype(np.float32)
    u = cupy.asarray(u_full).transpose(0, 2, 1)[::2]                          # sliced batch, stride(-1) != 1
    delta = cupy.asarray(delta_full).transpose(0, 2, 1)[::2]
    A = -cupy.asarray(rng.uniform(0.5, 2, (N, Dsz)).astype(np.float32)).T    # (D, N) transposed view
    Bv = cupy.asarray(rng.standard_normal((Bsz, L, N)).astype(np.float32)).transpose(0, 2, 1)
    C = cupy.asarray(rng.standard_normal((Bsz, N, 2 * L)).astype(np.float32))[:, :, ::2]
    z = cupy.asarray(rng.standard_normal((Bsz, Dsz, L)).astype(np.float32))
    out, last = ssmkit.selective_scan(u, delta, A, Bv, C, z=z, return_last_state=True)
    sync_check()
    w_out, w_last = ref_fwd(as64(u), as64(delta), as64(A), as64(Bv), as64(C), z=as64(z), return_last_state=True)
    assert_close("out", out, w_out, "float32")
    assert_close("last", last, w_last, "float32")
    o, l, saved = ssmkit.selective_scan_fwd(u, delta, A, Bv, C, z=z)
    dout = cupy.asarray(rng.standard_normal((Bsz, Dsz, L)).astype(np.float32))
    g = ssmkit.selective_scan_bwd(dout, u, delta, A, Bv, C, z=z, saved=saved)
    sync_check()
    w = ref_bwd(as64(dout), as64(u), as64(delta), as64(A), as64(Bv), as64(C), z=as64(z))
    for name, a, b in zip(GRAD_NAMES, g, w):
        if b is not None:
            assert_close(name, a, b, "float32", grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", ["bfloat16", "float32"])
def test_gpu_unaligned_bc_are_staged(in_dtype):
    """Variable B/C with rows off 16 bytes (odd L) are copied into aligned rows on every call: a
    second call with the same layout and new values must use the new values, forward and
    backward, and the plans must have chosen to stage."""
    import cupy

    op._FWD_PLANS.clear()
    op._BWD_PLANS.clear()
    spec = _pinned(batch=2, dim=8, dstate=6, seqlen=301, kinds=("var", "var"))
    rng = np.random.default_rng(3)
    for call in range(2):
        inputs = dataclasses.replace(spec, seed=call).build()
        got, want, _ = run_both(inputs, in_dtype, False, rng)
        check_forward(got, want, in_dtype, False)
        got, _, want = run_both(inputs, in_dtype, True, rng)
        check_backward(got, want, in_dtype, False)
    assert {tuple(n for _, n in p.stage) for p in op._FWD_PLANS.values()} == {("B", "C")}
    assert {tuple(n for _, n in p.stage) for p in op._BWD_PLANS.values()} == {("B", "C")}


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    import cupy

    spec = _pinned(batch=2, dim=16, seqlen=1000, dstate=16, kinds=("var", "var"))
    host = cast_inputs(spec.build(), "float32")
    dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    args = [dev[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=dev["D"], z=dev["z"], delta_bias=dev["delta_bias"], delta_softplus=True,
              initial_state=dev["initial_state"])
    _, _, saved = ssmkit.selective_scan_fwd(*args, **kw)
    dout = cupy.asarray(np.random.default_rng(0).standard_normal(host["u"].shape).astype(np.float32))
    g1 = ssmkit.selective_scan_bwd(dout, *args, saved=saved, deterministic=True, **kw)
    g2 = ssmkit.selective_scan_bwd(dout, *args, saved=saved, deterministic=True, **kw)
    sync_check()
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        if a is not None:
            assert bool((a == b).all()), f"{name} differs between two identical backward calls"


def test_bwd_segments_choice():
    """The split fills whole waves: 640 blocks on 264 slots (2.42 waves) -> 2 segments; a grid of
    ~6 full waves stays whole; one block over 32 chunks splits to MAX_SEGMENTS."""
    assert op.bwd_segments(640, 32, 264) == (2, 16)
    assert op.bwd_segments(1536, 8, 264) == (1, 8)
    assert op.bwd_segments(1, 32, 264) == (16, 2)
    assert op.bwd_segments(5, 1, 264) == (1, 1)
    for blocks, chunks in ((7, 5), (100, 3), (1, 9)):
        n, per = op.bwd_segments(blocks, chunks, 264)
        assert (n - 1) * per < chunks <= n * per     # no empty segment


@pytest.mark.gpu
def test_gpu_saved_state_bytes():
    spec = _pinned(batch=2, dim=3, seqlen=600, dstate=7)
    host = cast_inputs(spec.build(), "float32")
    dev = {k: (to_device(v) if isinstance(v, np.ndarray) else v) for k, v in host.items()}
    _, _, saved = ssmkit.selective_scan_fwd(dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"])
    assert saved.nbytes == 2 * 3 * 3 * 7 * 4    # ceil(600 / 256) = 3 states of N fp32 per (b, d)

"""causal_conv1d: validation, NumPy path, params layout, variant registry (CI, no GPU); the CUDA
kernels (forward, backward, decode update) against the float64 reference on every dtype and
layout, seq_idx with padding and one-token sequences, initial/final states, poisoned outputs,
bitwise-deterministic backward, shift-register / ring-buffer updates and state pools (GPU)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ssmkit
from ssmkit.ops import causal_conv1d as op
from ssmkit.reference import causal_conv1d as ref_fwd, causal_conv1d_bwd as ref_bwd
from ssmkit.reference import causal_conv1d_update as ref_update

from compare import assert_close
from gpu_examples import shards
from strategies import conv_problems, conv_update_problems

F64 = np.float64
OPN = "causal_conv1d"


def _problem(B=2, D=5, L=9, W=4, bias=True, seed=0, seq=False, init=False, dtype=F64):
    rng = np.random.default_rng(seed)
    p = dict(x=rng.standard_normal((B, D, L)).astype(dtype),
             weight=(rng.standard_normal((D, W)) / np.sqrt(W)).astype(dtype),
             bias=rng.standard_normal(D).astype(dtype) if bias else None)
    if seq:
        p["seq_idx"] = np.sort(rng.integers(-1, 3, (B, L)), axis=1).astype(np.int32)
    if init:
        p["initial_states"] = rng.standard_normal((B, D, W - 1)).astype(dtype)
    return p


# ============================================================================ CPU: validation

FWD_ERRORS = [
    (dict(x=np.zeros((2, 5), F64)), ValueError, r"argument 'x' must be \(B, D, L\), got shape \(2, 5\)"),
    (dict(x=np.zeros((2, 5, 9), np.int32)), TypeError, r"argument 'x' must have dtype in"),
    (dict(weight=np.zeros((4, 4), F64)), ValueError, r"argument 'weight' must have shape \(5, \*\) = \(D, W\), got \(4, 4\)"),
    (dict(weight=np.zeros((5,), F64)), ValueError, r"argument 'weight' must be \(D, W\), got shape \(5,\)"),
    (dict(weight=np.zeros((5, 1), F64)), ValueError, r"W \(weight.shape\[1\]\) = 1 is out of range; supported 2 <= "),
    (dict(weight=np.zeros((5, 9), F64)), ValueError, r"W \(weight.shape\[1\]\) = 9 is out of range"),
    (dict(weight=np.zeros((5, 4), np.float32)), TypeError, r"argument 'weight' must have dtype in \('float64',\), got float32"),
    (dict(bias=np.zeros((4,), F64)), ValueError, r"argument 'bias' must have shape \(5,\) = \(D\), got \(4,\)"),
    (dict(bias=np.zeros((5,), np.float32)), TypeError, r"argument 'bias' must have dtype in \('float64',\), got float32"),
    (dict(activation="relu"), ValueError, r"argument 'activation' must be None, 'silu' or 'swish', got 'relu'"),
    (dict(seq_idx=np.zeros((2, 8), np.int32)), ValueError, r"argument 'seq_idx' must have shape \(2, 9\) = \(B, L\), got \(2, 8\)"),
    (dict(seq_idx=np.zeros((2, 9), np.int64)), TypeError, r"argument 'seq_idx' must have dtype in \('int32',\), got int64"),
    (dict(initial_states=np.zeros((2, 5, 4), F64)), ValueError, r"argument 'initial_states' must have shape \(2, 5, 3\), got \(2, 5, 4\)"),
    (dict(initial_states=np.zeros((2, 5, 3), np.float32)), TypeError, r"argument 'initial_states' must have dtype in \('float64',\)"),
    (dict(return_final_states=1), TypeError, r"argument 'return_final_states' must be a bool, got int"),
    (dict(out=np.zeros((2, 5, 8), F64)), ValueError, r"argument 'out' must have shape \(2, 5, 9\) = \(B, D, L\), got \(2, 5, 8\)"),
    (dict(out=np.zeros((2, 5, 9), np.float32)), TypeError, r"argument 'out' must have dtype in \('float64',\), got float32"),
    (dict(x=[[[1.0]]]), TypeError, r"argument 'x' must be a NumPy or CuPy array"),
]


@pytest.mark.parametrize("override, exc, match", FWD_ERRORS)
def test_fwd_validation(override, exc, match):
    p = _problem()
    p.update(override)
    with pytest.raises(exc, match=match):
        ssmkit.causal_conv1d(**p)


def test_weight_dtype_rules():
    p = _problem(dtype=np.float32)
    with pytest.raises(TypeError, match=r"argument 'weight' must have dtype in \('float32',\), got float16"):
        ssmkit.causal_conv1d(p["x"], p["weight"].astype(np.float16))
    x16 = p["x"].astype(np.float16)
    ssmkit.causal_conv1d(x16, p["weight"])                         # fp32 weight with fp16 x: fine
    ssmkit.causal_conv1d(x16, p["weight"].astype(np.float16))      # same dtype: fine
    with pytest.raises(TypeError, match=r"argument 'weight' must have dtype in \('float64',\)"):
        ssmkit.causal_conv1d(p["x"].astype(F64), p["weight"])


BWD_ERRORS = [
    (dict(dout=np.zeros((2, 5, 8), F64)), ValueError, r"causal_conv1d_bwd: argument 'dout' must have shape \(2, 5, 9\) = \(B, D, L\)"),
    (dict(dout=np.zeros((2, 5, 9), np.float32)), TypeError, r"argument 'dout' must have dtype in \('float64',\)"),
    (dict(dfinal_states=np.zeros((2, 5, 2), F64)), ValueError, r"argument 'dfinal_states' must have shape \(2, 5, 3\)"),
    (dict(dfinal_states=np.zeros((2, 5, 3), np.float32)), TypeError, r"argument 'dfinal_states' must have dtype"),
    (dict(deterministic=None), TypeError, r"argument 'deterministic' must be a bool"),
    (dict(weight=np.zeros((5, 10), F64)), ValueError, r"causal_conv1d_bwd: W \(weight.shape\[1\]\) = 10 is out of range"),
    (dict(activation="gelu"), ValueError, r"argument 'activation' must be None, 'silu' or 'swish'"),
    (dict(seq_idx=np.zeros((2, 9), np.float32)), TypeError, r"argument 'seq_idx' must have dtype in \('int32',\)"),
]


@pytest.mark.parametrize("override, exc, match", BWD_ERRORS)
def test_bwd_validation(override, exc, match):
    p = _problem()
    p["dout"] = np.ones((2, 5, 9))
    p.update(override)
    with pytest.raises(exc, match=match):
        ssmkit.causal_conv1d_bwd(**p)


def _update_problem(B=2, D=5, W=4, S=None, L_new=None, pool=None, seed=0):
    rng = np.random.default_rng(seed)
    S = W - 1 if S is None else S
    pool = B if pool is None else pool
    xs = (B, D) if L_new is None else (B, D, L_new)
    return dict(x=rng.standard_normal(xs), conv_state=rng.standard_normal((pool, D, S)),
                weight=rng.standard_normal((D, W)), bias=rng.standard_normal(D))


UPDATE_ERRORS = [
    (dict(x=np.zeros((2,), F64)), ValueError, r"argument 'x' must be \(B, D\) or \(B, D, L_new\), got shape \(2,\)"),
    (dict(x=np.zeros((2, 5), np.int32)), TypeError, r"argument 'x' must have dtype in"),
    (dict(conv_state=np.zeros((2, 4, 3), F64)), ValueError, r"argument 'conv_state' must have shape \(\*, 5, \*\), got \(2, 4, 3\)"),
    (dict(conv_state=np.zeros((2, 5), F64)), ValueError, r"argument 'conv_state' must be \(B_pool, D, S\)"),
    (dict(conv_state=np.zeros((2, 5, 2), F64)), ValueError, r"argument 'conv_state' must have S >= W - 1 = 3"),
    (dict(conv_state=np.zeros((2, 5, 3), np.float16)), TypeError, r"argument 'conv_state' must have dtype in \('float64',\)"),
    (dict(conv_state=np.zeros((1, 5, 3), F64)), ValueError, r"without conv_state_indices, conv_state must have at least B = 2 rows"),
    (dict(weight=np.zeros((5, 9), F64)), ValueError, r"causal_conv1d_update: W \(weight.shape\[1\]\) = 9 is out of range"),
    (dict(weight=np.zeros((6, 4), F64)), ValueError, r"argument 'weight' must have shape \(5, \*\) = \(D, W\)"),
    (dict(bias=np.zeros((5,), np.float32)), TypeError, r"argument 'bias' must have dtype in \('float64',\)"),
    (dict(activation="tanh"), ValueError, r"argument 'activation' must be None, 'silu' or 'swish'"),
    (dict(cache_seqlens=np.zeros((3,), np.int32)), ValueError, r"argument 'cache_seqlens' must have shape \(2,\) = \(B\), got \(3,\)"),
    (dict(cache_seqlens=np.zeros((2,), np.int64)), TypeError, r"argument 'cache_seqlens' must have dtype in \('int32',\)"),
    (dict(conv_state_indices=np.zeros((1,), np.int32)), ValueError, r"argument 'conv_state_indices' must have shape \(2,\) = \(B\)"),
    (dict(conv_state_indices=np.zeros((2,), np.int64)), TypeError, r"argument 'conv_state_indices' must have dtype in \('int32',\)"),
    (dict(out=np.zeros((2, 4), F64)), ValueError, r"argument 'out' must have shape \(2, 5\), got \(2, 4\)"),
    (dict(out=np.zeros((2, 5), np.float32)), TypeError, r"argument 'out' must have dtype in \('float64',\)"),
]


@pytest.mark.parametrize("override, exc, match", UPDATE_ERRORS)
def test_update_validation(override, exc, match):
    p = _update_problem()
    p.update(override)
    with pytest.raises(exc, match=match):
        ssmkit.causal_conv1d_update(**p)


def test_update_state_dtype_rules():
    p = _update_problem()
    x16 = p["x"].astype(np.float16)
    w16 = p["weight"].astype(np.float16)
    ssmkit.causal_conv1d_update(x16, p["conv_state"].astype(np.float32), w16)   # fp32 state with fp16 x
    with pytest.raises(TypeError, match=r"argument 'conv_state' must have dtype in \('float16', 'float32'\)"):
        ssmkit.causal_conv1d_update(x16, p["conv_state"], w16)


def test_update_weight_dtypes_as_upstream():
    """Upstream's decode update takes any fp16 / bf16 / fp32 weight (bias in its dtype) with any
    of those x (all nine pairs compiled there); the NumPy path is the reference of those values."""
    from gpu_util import as64, rounded

    pytest.importorskip("ml_dtypes")
    p = _update_problem()
    for xd, wd in [("float32", "bfloat16"), ("float32", "float16"), ("float16", "bfloat16"), ("bfloat16", "float16")]:
        x, w, b = rounded(p["x"], xd), rounded(p["weight"], wd), rounded(p["bias"], wd)
        state = rounded(p["conv_state"], xd)
        want_state = as64(state)
        want = ref_update(as64(x), want_state, as64(w), as64(b), activation="silu")
        got = ssmkit.causal_conv1d_update(x, state, w, b, activation="silu")
        assert got.dtype == x.dtype and state.dtype == x.dtype
        np.testing.assert_array_equal(as64(got), as64(want.astype(x.dtype)))
        np.testing.assert_array_equal(as64(state), want_state)
        assert op.kernel_ref("update", xd, wd, sdtype=xd) in op.variants(kind="update")
    with pytest.raises(TypeError, match=r"argument 'bias' must have dtype in \('bfloat16',\), got float32"):
        ssmkit.causal_conv1d_update(rounded(p["x"], "float32"), rounded(p["conv_state"], "float32"),
                                    rounded(p["weight"], "bfloat16"), rounded(p["bias"], "float32"))
    with pytest.raises(TypeError, match=r"argument 'weight' must have dtype in \('float32', 'float16', 'bfloat16'\), "
                                        r"got float64"):
        ssmkit.causal_conv1d_update(rounded(p["x"], "float32"), rounded(p["conv_state"], "float32"), p["weight"])


# ============================================================================ CPU: NumPy path

@settings(max_examples=40, deadline=None)
@given(p=conv_problems(), rfs=st.booleans(), use_out=st.booleans())
def test_numpy_fwd_is_reference(p, rfs, use_out):
    args = dict(p)
    if args.get("seq_idx") is not None:
        args["seq_idx"] = args["seq_idx"].astype(np.int32)
    want = ref_fwd(**args, return_final_states=rfs)
    out = np.full(args["x"].shape, np.nan) if use_out else None
    got = ssmkit.causal_conv1d(**args, return_final_states=rfs, out=out)
    if rfs:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        if use_out:
            assert got[0] is out
    else:
        np.testing.assert_array_equal(got, want)
        if use_out:
            assert got is out


@settings(max_examples=30, deadline=None)
@given(p=conv_problems(), use_dfinal=st.booleans(), seed=st.integers(0, 2**31))
def test_numpy_bwd_is_reference(p, use_dfinal, seed):
    args = dict(p)
    if args.get("seq_idx") is not None:
        args["seq_idx"] = args["seq_idx"].astype(np.int32)
    rng = np.random.default_rng(seed)
    B, D, L = args["x"].shape
    W = args["weight"].shape[1]
    dout = rng.standard_normal((B, D, L))
    dfin = rng.standard_normal((B, D, W - 1)) if use_dfinal else None
    want = ref_bwd(args["x"], args["weight"], args["bias"], dout, activation=args["activation"],
                   seq_idx=args["seq_idx"], initial_states=args["initial_states"], dfinal_states=dfin)
    got = ssmkit.causal_conv1d_bwd(args["x"], args["weight"], args["bias"], dout, activation=args["activation"],
                                   seq_idx=args["seq_idx"], initial_states=args["initial_states"],
                                   dfinal_states=dfin, deterministic=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, w)


@settings(max_examples=40, deadline=None)
@given(p=conv_update_problems(), use_out=st.booleans())
def test_numpy_update_is_reference(p, use_out):
    args = dict(p)
    state_want = args["conv_state"].copy()
    want = ref_update(**{**args, "conv_state": state_want})
    out = np.full(args["x"].shape, np.nan) if use_out else None
    got = ssmkit.causal_conv1d_update(**args, out=out)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(args["conv_state"], state_want)
    if use_out:
        assert got is out


# ============================================================================ CPU: plumbing

def test_kernel_refs_and_variants():
    assert op.kernel_ref("fwd_cf", "bfloat16", "float32", 4, False).name == \
        "ssm::causal_conv1d_fwd_cf<ssm::bf16, float, 4, false>"
    # the channel-first forward: pipelined kernel for 16-bit types, single-round for fp32 / fp64
    assert op.kernel_ref("fwd_cf", "float32", "float32", 4, True).name == \
        "ssm::causal_conv1d_fwd_cf_single<float, float, 4, true>"
    assert op.kernel_ref("bwd_cl", "float64", "float64", 8, True).name == \
        "ssm::causal_conv1d_bwd_cl<double, double, 8, true>"
    assert op.kernel_ref("update", "float16", "float16", sdtype="float32").name == \
        "ssm::causal_conv1d_update<ssm::f16, float, ssm::f16>"
    assert op.kernel_ref("bwd_reduce", "bfloat16").name == "ssm::causal_conv1d_bwd_reduce<ssm::bf16>"
    refs = op.variants()
    # 6 (x, weight) dtype pairs x 4 kernels x 7 widths x seq on/off, 16 update, 4 reduce
    assert len(refs) == 6 * 4 * 7 * 2 + 16 + 4 == len(set(refs))
    assert all(r.file == "causal_conv1d.cu" for r in refs)
    assert len(op.variants(dtype="bfloat16", width=4, kind="fwd_cf")) == 4
    cf = [r.name for r in op.variants(kind="fwd_cf")]
    assert len(cf) == 6 * 7 * 2
    pipelined = [n for n in cf if n.startswith("ssm::causal_conv1d_fwd_cf<")]
    single = [n for n in cf if n.startswith("ssm::causal_conv1d_fwd_cf_single<")]
    assert len(pipelined) == 4 * 7 * 2 and all(n.split("<")[1].startswith(("ssm::bf16", "ssm::f16")) for n in pipelined)
    assert len(single) == 2 * 7 * 2 and all(n.split("<")[1].startswith(("float", "double")) for n in single)
    from ssmkit._registry import variants

    assert len(variants(OPN)) == len(refs)


def test_packer_matches_structured_array():
    for params, packer in zip(op.ALL_PARAMS, (op._PACK_FWD, op._PACK_BWD, op._PACK_REDUCE, op._PACK_UPDATE)):
        vals = [(-1) ** i * (i * 7919 + 3) for i in range(len(params.names))]
        vals = [abs(v) if params.fields[i][1] == "ptr" else v for i, v in enumerate(vals)]
        want = np.array(tuple(vals), dtype=params.dtype)[()]
        got = packer.pack(list(vals))
        assert got.dtype == params.dtype
        assert got.tobytes() == want.tobytes()


def test_layout_choice():
    x = np.zeros((2, 8, 16))
    assert not op._channel_last(x)
    assert op._channel_last(np.zeros((2, 16, 8)).transpose(0, 2, 1))
    assert not op._channel_last(x[:, :, ::2])
    assert op._channel_last(np.zeros((2, 1, 8)).transpose(0, 2, 1))         # L == 1, D contiguous
    assert not op._channel_last(np.zeros((2, 1, 16)))                       # D == 1


@pytest.mark.nvrtc
def test_params_layout():
    from ssmkit._nvrtc_offline import compile_file

    compile_file(op.FILE, [op.kernel_ref("bwd_reduce", "float32").name], 90,
                 extra_source="\n".join(p.layout_asserts() for p in op.ALL_PARAMS))


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_representative_variants_compile(arch):
    """Every kernel family in every dtype pair (widths and seq flags sampled), every update and
    reduce instantiation. The full list (350) is test_every_variant_compiles."""
    from ssmkit._nvrtc_offline import compile_refs

    refs = []
    for xd, wd in DTYPES:
        refs += [op.kernel_ref("fwd_cf", xd, wd, 8, True), op.kernel_ref("bwd_cf", xd, wd, 8, True),
                 op.kernel_ref("fwd_cl", xd, wd, 2, False), op.kernel_ref("bwd_cl", xd, wd, 3, True)]
    refs += op.variants(kind="update") + op.variants(kind="bwd_reduce")
    (res,) = compile_refs(refs, arch)
    assert res.cubin_bytes > 0 and len(res.lowered) == len(refs)


# ---- host path on a fake device: CuPy arrays over made-up addresses, a kernel stub -----------

@pytest.fixture
def fake_device(monkeypatch):
    cupy = pytest.importorskip("cupy")
    launches = []

    class Stub:
        def __init__(self, ref):
            self.name = ref.name

        def __call__(self, grid, block, args, **kw):
            (prm,) = args
            launches.append((self.name, grid, block, np.asarray(prm).tobytes()))

    next_addr = [1 << 32]

    def make(shape, dtype, offset_bytes=0, strides=None):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize * 2 + 64
        mem = cupy.cuda.memory.UnownedMemory(next_addr[0], n, None, device_id=0)
        next_addr[0] += (n + 4095) // 4096 * 4096
        return cupy.ndarray(shape, dtype, memptr=cupy.cuda.memory.MemoryPointer(mem, offset_bytes),
                            strides=strides)

    class FakeCupy:
        @staticmethod
        def empty(shape, dtype):
            return make(tuple(shape), dtype)

    monkeypatch.setattr(op, "get_kernel", Stub)
    monkeypatch.setattr(op, "_CP_NDARRAY", cupy.ndarray)
    monkeypatch.setattr(op, "_cupy", FakeCupy)
    monkeypatch.setattr(op, "_get_device", lambda: 0)
    for cache in ("_FWD_PLANS", "_BWD_PLANS", "_UPDATE_PLANS"):
        monkeypatch.setattr(op, cache, {})
    return make, launches


def _params(params, blob):
    return np.frombuffer(blob, dtype=params.dtype)[0]


def test_host_fwd_channel_first(fake_device):
    make, launches = fake_device
    B, D, L, W = 3, 10, 1000, 4
    x, w, b = make((B, D, L), np.float16), make((D, W), np.float32), make((D,), np.float32)
    seq = make((B, L), np.int32)
    out, fin = ssmkit.causal_conv1d(x, w, b, "silu", seq_idx=seq, return_final_states=True)
    (name, grid, block, blob), = launches
    assert name == "ssm::causal_conv1d_fwd_cf<ssm::f16, float, 4, true>"
    prm = _params(op.PARAMS_FWD, blob)
    for f, a in (("x", x), ("weight", w), ("bias", b), ("seq_idx", seq), ("out", out), ("final_states", fin)):
        assert int(prm[f]) == a.data.ptr, f
    assert int(prm["initial_states"]) == 0
    assert (prm["x_b"], prm["x_d"], prm["x_l"]) == (D * L, L, 1)
    assert (prm["out_b"], prm["out_d"], prm["out_l"]) == (D * L, L, 1)
    assert (prm["fin_b"], prm["fin_d"], prm["fin_k"]) == (D * (W - 1), W - 1, 1)
    assert prm["x_vec"] == 1 and prm["out_vec"] == 1 and prm["seq_vec"] == 1 and prm["silu"] == 1
    # 16-bit: 512-step segments, 2 per row = one group of the default 2 segments per warp
    assert prm["seg_iters"] == 2 and prm["n_seg"] == 1 and prm["n_dgroups"] == -(-D // 4)
    assert grid == (B * prm["n_seg"] * prm["n_dgroups"], 1, 1) and block == (128, 1, 1)
    assert out.shape == (B, D, L) and out.flags.c_contiguous and fin.shape == (B, D, W - 1)
    # same signature, new buffers: cache hit, new pointers
    x2 = make((B, D, L), np.float16)
    ssmkit.causal_conv1d(x2, w, b, "silu", seq_idx=seq, return_final_states=True)
    assert len(op._FWD_PLANS) == 1 and int(_params(op.PARAMS_FWD, launches[-1][3])["x"]) == x2.data.ptr


def test_host_fwd_segment_groups(fake_device, monkeypatch):
    """Channel-first forward: 16-bit types run the pipelined kernel with n_seg groups of seg_iters
    segments (default 2, clamped to the row); fp32 / fp64 the single-round kernel, one segment per
    warp whatever _CF_FWD_SEGS says."""
    make, launches = fake_device
    B, D, L, W = 1, 8, 5000, 4
    assert op._CF_FWD_SEGS == 2
    for dt, name, items in ((np.float16, "fwd_cf", 16), (np.float32, "fwd_cf_single", 8),
                            (np.float64, "fwd_cf_single", 8)):
        x, w = make((B, D, L), dt), make((D, W), dt)
        segs_row = -(-L // (32 * items))
        for setting in (2, 1, 3, 64):
            monkeypatch.setattr(op, "_CF_FWD_SEGS", setting)
            op._FWD_PLANS.clear()
            ssmkit.causal_conv1d(x, w)
            prm = _params(op.PARAMS_FWD, launches[-1][3])
            want = min(setting, segs_row) if name == "fwd_cf" else 1
            assert launches[-1][0].startswith(f"ssm::causal_conv1d_{name}<"), launches[-1][0]
            assert prm["seg_iters"] == want and prm["n_seg"] == -(-segs_row // want), (dt, setting)
            assert launches[-1][1][0] == B * prm["n_dgroups"] * prm["n_seg"]


def test_host_fwd_channel_last_and_strided(fake_device):
    make, launches = fake_device
    B, D, L, W = 2, 300, 70, 3
    x = make((B, L, D), np.float32).transpose(0, 2, 1)
    w = make((D, W), np.float32)
    out = ssmkit.causal_conv1d(x, w)
    name, grid, block, blob = launches[-1]
    assert name == "ssm::causal_conv1d_fwd_cl<float, float, 3, false>"
    prm = _params(op.PARAMS_FWD, blob)
    assert (prm["x_b"], prm["x_d"], prm["x_l"]) == (L * D, 1, D) and prm["x_vec"] == 1
    assert out.strides == x.strides and prm["out_vec"] == 1 and prm["silu"] == 0
    assert prm["n_dgroups"] == -(-D // 64) and prm["n_seg"] == -(-L // 64)
    assert grid[0] == B * prm["n_dgroups"] * prm["n_seg"]
    # a view with no unit stride runs the channel-first kernel without vector loads
    xs = make((B, D, 2 * L), np.float32)[:, :, ::2]
    ssmkit.causal_conv1d(xs, w, out=make((B, D, L), np.float32))
    name, grid, block, blob = launches[-1]
    prm = _params(op.PARAMS_FWD, blob)
    assert name.startswith("ssm::causal_conv1d_fwd_cf_single<float") and prm["x_vec"] == 0 and prm["x_l"] == 2
    assert prm["out_vec"] == 1


def test_host_bwd(fake_device):
    make, launches = fake_device
    B, D, L, W = 2, 6, 2500, 5
    x, w, b = make((B, D, L), np.float32), make((D, W), np.float32), make((D,), np.float32)
    dout, init, dfin = make((B, D, L), np.float32), make((B, D, W - 1), np.float32), make((B, D, W - 1), np.float32)
    dx, dw, db, dinit = ssmkit.causal_conv1d_bwd(x, w, b, dout, "swish", initial_states=init, dfinal_states=dfin)
    (n1, g1, b1, blob1), (n2, g2, b2, blob2) = launches
    assert n1 == "ssm::causal_conv1d_bwd_cf<float, float, 5, false>"
    assert n2 == "ssm::causal_conv1d_bwd_reduce<float>"
    p1, p2 = _params(op.PARAMS_BWD, blob1), _params(op.PARAMS_REDUCE, blob2)
    for f, a in (("x", x), ("weight", w), ("bias", b), ("dout", dout), ("initial_states", init),
                 ("dfinal_states", dfin), ("dx", dx), ("dinitial_states", dinit)):
        assert int(p1[f]) == a.data.ptr, f
    n_seg = -(-L // 1024)
    assert p1["n_seg"] == n_seg and p2["n_partials"] == B * n_seg and p1["partials"] == p2["partials"] != 0
    assert int(p2["dweight"]) == dw.data.ptr and int(p2["dbias"]) == db.data.ptr and p2["width"] == W
    assert g2[0] * b2[0] >= D * (W + 1)
    assert dw.shape == (D, W) and db.shape == (D,) and dinit.shape == (B, D, W - 1)


def test_host_update(fake_device):
    make, launches = fake_device
    B, D, W, S = 4, 300, 4, 6
    x = make((B, D), np.float16)
    state = make((B + 2, D, S), np.float32)
    w = make((D, W), np.float16)
    csl, idx = make((B,), np.int32), make((B,), np.int32)
    out = ssmkit.causal_conv1d_update(x, state, w, None, "silu", cache_seqlens=csl, conv_state_indices=idx)
    name, grid, block, blob = launches[-1]
    assert name == "ssm::causal_conv1d_update<ssm::f16, float, ssm::f16>"
    prm = _params(op.PARAMS_UPDATE, blob)
    for f, a in (("x", x), ("conv_state", state), ("weight", w), ("cache_seqlens", csl),
                 ("state_indices", idx), ("out", out)):
        assert int(prm[f]) == a.data.ptr, f
    assert prm["new_len"] == 1 and prm["x_l"] == 0 and prm["state_len"] == S and prm["width"] == W
    assert grid == (B * 3, 1, 1) and block == (128, 1, 1) and prm["n_dblocks"] == 3
    out2 = make((B, D), np.float16)
    assert ssmkit.causal_conv1d_update(x, state, w, None, "silu", cache_seqlens=csl, conv_state_indices=idx,
                                       out=out2) is out2
    x3 = make((B, D, 5), np.float16)
    ssmkit.causal_conv1d_update(x3, state, w)
    prm = _params(op.PARAMS_UPDATE, launches[-1][3])
    assert prm["new_len"] == 5 and prm["x_l"] == 1 and prm["out_l"] == 1 and prm["state_indices"] == 0


def _compile_chunk(args):
    from ssmkit._nvrtc_offline import compile_file

    names, arch = args
    res = compile_file(op.FILE, names, arch)
    return res.cubin_bytes, len(res.lowered)


@pytest.mark.nvrtc
@pytest.mark.skipif(not os.environ.get("SSMKIT_NVRTC_ALL"), reason="set SSMKIT_NVRTC_ALL=1: ~2.5 min of "
                    "CPU per architecture (8 parallel NVRTC programs)")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_compiles(arch):
    """All 350 instantiations, in 8 NVRTC programs compiled in parallel processes (~20 s wall on
    16 cores; ~2.5 min of CPU time per architecture)."""
    import concurrent.futures
    import multiprocessing

    names = [r.name for r in op.variants()]
    chunks = [names[i::8] for i in range(8)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=8, mp_context=ctx) as pool:
        results = list(pool.map(_compile_chunk, [(c, arch) for c in chunks]))
    assert sum(n for _, n in results) == len(names)
    assert all(b > 0 for b, _ in results)


# ============================================================================ GPU
# Device arrays are built on the host (NumPy, ml_dtypes for bf16) and uploaded; strided and
# misaligned views are taken on the device from uploaded buffers (metadata only); results are
# read back from C-contiguous buffers. No CuPy arithmetic on 16-bit arrays is needed.

DTYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
          ("float16", "float16"), ("float16", "float32"), ("float64", "float64")]
# hypothesis draws widths and layouts freely; its dtypes stay few to bound first-use compiles
HYP_DTYPES = [("float32", "float32"), ("bfloat16", "float32"), ("float16", "float16")]
LAYOUTS = ["cf", "cl", "cf_misaligned", "cl_misaligned", "strided", "cl_strided"]


def _place(a: np.ndarray, layout: str):
    """Upload host array ``a`` (B, D, L) as a device view with the given memory layout."""
    import cupy

    if layout == "cf":
        return cupy.asarray(np.ascontiguousarray(a))
    if layout == "cl":
        return cupy.asarray(np.ascontiguousarray(a.transpose(0, 2, 1))).transpose(0, 2, 1)
    if layout == "cf_misaligned":   # base one element past a 256-byte aligned allocation
        flat = np.zeros(a.size + 1, a.dtype)
        flat[1:] = a.ravel()
        return cupy.asarray(flat)[1:].reshape(a.shape)
    if layout == "cl_misaligned":
        t = np.ascontiguousarray(a.transpose(0, 2, 1))
        flat = np.zeros(t.size + 1, a.dtype)
        flat[1:] = t.ravel()
        return cupy.asarray(flat)[1:].reshape(t.shape).transpose(0, 2, 1)
    if layout == "strided":          # every other element of a (B, D, L, 2) buffer: no unit stride
        buf = np.zeros(a.shape + (2,), a.dtype)
        buf[..., 0] = a
        return cupy.asarray(buf)[..., 0]
    if layout == "cl_strided":       # channels contiguous, every other step of a (B, 2L, D) buffer
        buf = np.zeros((a.shape[0], 2 * a.shape[2], a.shape[1]), a.dtype)
        buf[:, ::2, :] = a.transpose(0, 2, 1)
        return cupy.asarray(buf)[:, ::2, :].transpose(0, 2, 1)
    raise ValueError(layout)


def _get(a):
    """Host copy of a device array without device-side copies of 16-bit data."""
    import cupy

    if a.flags.c_contiguous:
        return cupy.asnumpy(a)
    if a.ndim == 3 and a.transpose(0, 2, 1).flags.c_contiguous:
        return cupy.asnumpy(a.transpose(0, 2, 1)).transpose(0, 2, 1)
    return cupy.asnumpy(a)


def _poison(shape, dtype, layout="cf"):
    from gpu_util import np_dtype

    return _place(np.full(shape, np.nan, np_dtype(dtype)), layout)


def _r(a, dtype):
    from gpu_util import rounded

    return rounded(a, dtype)


def _h(a):
    """float64 host copy of a host-rounded or device array."""
    from gpu_util import as64

    if a is None:
        return None
    if hasattr(a, "get"):
        a = _get(a)
    return as64(a)


def _dev(a):
    import cupy

    return None if a is None else cupy.asarray(np.ascontiguousarray(a))


def _fwd_inputs(p, xd, wd, layout, seed=0):
    """Rounded host copies (float64 for the reference) and device arrays of a conv problem."""
    xr = _r(p["x"], xd)
    wr, br = _r(p["weight"], wd), _r(p.get("bias"), wd)
    ir = _r(p.get("initial_states"), xd)
    seq = p.get("seq_idx")
    seq = None if seq is None else np.ascontiguousarray(seq, dtype=np.int32)
    dev = dict(x=_place(xr, layout), weight=_dev(wr), bias=_dev(br), seq_idx=_dev(seq), initial_states=_dev(ir))
    host = dict(x=_h(xr), weight=_h(wr), bias=_h(br), seq_idx=seq, initial_states=_h(ir))
    return dev, host


def _check_fwd(p, xd, wd, layout, rfs, poison_out):
    from gpu_util import sync_check

    dev, host = _fwd_inputs(p, xd, wd, layout)
    act = p.get("activation")
    out = _poison(p["x"].shape, xd, "cl" if layout.startswith("cl") else "cf") if poison_out else None
    got = ssmkit.causal_conv1d(**dev, activation=act, return_final_states=rfs, out=out)
    sync_check()
    want = ref_fwd(**host, activation=act, return_final_states=rfs)
    if rfs:
        got_out, got_fin = got
        want_out, want_fin = want
        # final states are raw copies of x / initial_states: exact
        np.testing.assert_array_equal(_h(got_fin), want_fin)
    else:
        got_out, want_out = got, want
    if poison_out:
        assert got_out is out
    assert_close("out", _h(got_out), want_out, xd)
    if layout.startswith("cl") and out is None and p["x"].shape[1] > 1:
        assert got_out.strides[1] == got_out.itemsize     # channel-last in, channel-last out


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(40, 0.5))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=conv_problems(max_batch=2, max_dim=40, max_seqlen=300), dt=st.sampled_from(HYP_DTYPES),
       layout=st.sampled_from(LAYOUTS), rfs=st.booleans(), poison_out=st.booleans(),
       swish=st.booleans())
def test_gpu_fwd_hypothesis(shard, p, dt, layout, rfs, poison_out, swish):
    p = dict(p)
    if swish and p["activation"] == "silu":
        p["activation"] = "swish"
    _check_fwd(p, dt[0], dt[1], layout, rfs, poison_out)


def _pinned(B, D, L, W, seed=0, bias=True, act="silu", seq=None, init=False):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((B, D, L)), weight=rng.standard_normal((D, W)) / np.sqrt(W),
                bias=rng.standard_normal(D) if bias else None, activation=act, seq_idx=seq,
                initial_states=rng.standard_normal((B, D, W - 1)) if init else None)


def _seq_packed(B, L, seed=0):
    """Packed sequences with one-token sequences and padding (-1) in between."""
    rng = np.random.default_rng(seed)
    out = np.empty((B, L), np.int32)
    for b in range(B):
        ids, cur, t = [], 0, 0
        while t < L:
            n = int(rng.choice([1, 1, 2, 3, 7, 40, 300]))
            val = -1 if rng.random() < 0.2 else cur
            ids += [val] * n
            cur += 1
            t += n
        out[b] = ids[:L]
    return out


SHAPES = [  # (B, D, L, W): L < W, L = 1, odd D, D not a multiple of 8, multi-segment / multi-block
    (1, 1, 1, 2), (2, 3, 1, 4), (2, 5, 2, 4), (1, 7, 3, 8), (2, 12, 5, 3), (3, 20, 33, 5),
    (2, 9, 257, 6), (1, 130, 520, 7), (2, 36, 1100, 4), (1, 270, 70, 8), (2, 1, 600, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, D, L, W", SHAPES)
@pytest.mark.parametrize("layout", ["cf", "cl", "cf_misaligned", "strided"])
@pytest.mark.parametrize("dt", [("bfloat16", "float32"), ("float32", "float32")])
def test_gpu_fwd_pinned(B, D, L, W, layout, dt):
    _check_fwd(_pinned(B, D, L, W, seed=B * 1000 + D + L), dt[0], dt[1], layout, True, True)


# Every width with one dtype pair, every dtype with one width (each instantiation compiles on first
# use: the full cross product would spend minutes in NVRTC).
@pytest.mark.gpu
@pytest.mark.parametrize("W", list(range(2, 9)))
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_fwd_every_width(W, layout):
    for seq in (None, _seq_packed(2, 200, seed=W)):
        _check_fwd(_pinned(2, 19, 200, W, seed=W, seq=seq, init=True), "bfloat16", "float32", layout, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_fwd_every_dtype(dt, layout):
    _check_fwd(_pinned(2, 19, 600, 4, seed=7, init=True), dt[0], dt[1], layout, True, True)
    _check_fwd(_pinned(2, 19, 600, 4, seed=8, act=None, bias=False), dt[0], dt[1], layout, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["cf", "cl", "cl_misaligned", "strided", "cl_strided"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("L", [1, 2, 5, 700])
def test_gpu_fwd_seq_idx_states(layout, init, L):
    for W in (2, 4, 8):
        seq = _seq_packed(2, L, seed=L + W)
        p = _pinned(2, 21, L, W, seed=W, seq=seq, init=init)
        _check_fwd(p, "bfloat16", "float32", layout, True, True)
        _check_fwd(p, "float32", "float32", layout, True, False)
    # initial_states without seq_idx
    _check_fwd(_pinned(2, 21, L, 4, init=True), "float32", "float32", layout, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("segs", [2, 4, 8])
@pytest.mark.parametrize("layout", ["cf", "cf_misaligned", "strided"])
def test_gpu_fwd_segment_groups(segs, layout, monkeypatch):
    """Pipelined channel-first forward (16-bit types) with several segments per warp: the
    prefetch, the halo carried from lane 31 of one segment to lane 0 of the next, a partial last
    group and a partial last segment; seq_idx, initial and final states. Also bitwise equal to one
    segment per warp."""
    from gpu_util import sync_check

    L = 5 * 1024 + 37        # 11 segments of 512 steps: partial last segment and last group
    for W in (2, 4, 8):
        for seq in (None, _seq_packed(2, L, seed=W)):
            p = _pinned(2, 6, L, W, seed=W, seq=seq, init=True)
            xd, wd = "bfloat16", "float32"
            monkeypatch.setattr(op, "_CF_FWD_SEGS", segs)
            monkeypatch.setattr(op, "_FWD_PLANS", {})
            _check_fwd(p, xd, wd, layout, True, True)
            dev, _ = _fwd_inputs(p, xd, wd, layout)
            act = p["activation"]
            got, fin = ssmkit.causal_conv1d(**dev, activation=act, return_final_states=True)
            monkeypatch.setattr(op, "_CF_FWD_SEGS", 1)
            monkeypatch.setattr(op, "_FWD_PLANS", {})
            one, fin1 = ssmkit.causal_conv1d(**dev, activation=act, return_final_states=True)
            sync_check()
            assert _get(got).tobytes() == _get(one).tobytes(), (W, seq is not None)
            assert _get(fin).tobytes() == _get(fin1).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["cf", "cf_misaligned", "strided"])
@pytest.mark.parametrize("dt", [("float32", "float32"), ("float64", "float64"), ("float16", "float32")])
def test_gpu_fwd_channel_first_kernels(dt, layout):
    """Both channel-first forward kernels (single-round: fp32, fp64; pipelined: fp16, at the
    default segments per warp) on rows of many segments with a partial last one, every width
    class, with and without seq_idx; initial and final states."""
    L = 5 * 1024 + 37
    for W in (2, 4, 8):
        for seq in (None, _seq_packed(2, L, seed=W)):
            _check_fwd(_pinned(2, 6, L, W, seed=W, seq=seq, init=True), dt[0], dt[1], layout, True, True)
    _check_fwd(_pinned(2, 6, 3, 4, seed=1, init=True), dt[0], dt[1], layout, True, False)     # L < W


def _check_bwd(p, xd, wd, layout, use_dfinal, seed=0, dout_layout=None):
    from gpu_util import sync_check

    dev, host = _fwd_inputs(p, xd, wd, layout)
    rng = np.random.default_rng(seed)
    B, D, L = p["x"].shape
    W = p["weight"].shape[1]
    gr = _r(rng.standard_normal((B, D, L)), xd)
    fr = _r(rng.standard_normal((B, D, W - 1)), xd) if use_dfinal else None
    dout = _place(gr, dout_layout or layout)
    act = p.get("activation")
    got = ssmkit.causal_conv1d_bwd(dev["x"], dev["weight"], dev["bias"], dout, activation=act,
                                   seq_idx=dev["seq_idx"], initial_states=dev["initial_states"],
                                   dfinal_states=_dev(fr))
    sync_check()
    want = ref_bwd(host["x"], host["weight"], host["bias"], _h(gr), activation=act, seq_idx=host["seq_idx"],
                   initial_states=host["initial_states"], dfinal_states=_h(fr))
    # dweight/dbias sum over B*L terms: scale the gradient tolerance with sqrt(B*L / 64)
    scale = max(1.0, np.sqrt(B * L / 64.0))
    for name, g, w, dtn in zip(("dx", "dweight", "dbias", "dinitial_states"), got, want, (xd, wd, wd, xd)):
        if w is None:
            assert g is None, name
            continue
        assert_close(name, _h(g), w, dtn, grad=True, scale=1.0 if name in ("dx", "dinitial_states") else scale)
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(40, 0.5))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=conv_problems(max_batch=2, max_dim=40, max_seqlen=300), dt=st.sampled_from(HYP_DTYPES),
       layout=st.sampled_from(LAYOUTS), use_dfinal=st.booleans(), seed=st.integers(0, 2**31))
def test_gpu_bwd_hypothesis(shard, p, dt, layout, use_dfinal, seed):
    _check_bwd(dict(p), dt[0], dt[1], layout, use_dfinal, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("B, D, L, W", SHAPES + [(2, 40, 3000, 4), (1, 300, 1030, 3)])
@pytest.mark.parametrize("layout", ["cf", "cl", "cl_misaligned", "strided"])
def test_gpu_bwd_pinned(B, D, L, W, layout):
    p = _pinned(B, D, L, W, seed=L, init=True)
    _check_bwd(p, "bfloat16", "float32", layout, True)
    _check_bwd(p, "float32", "float32", layout, False, dout_layout="cf")


@pytest.mark.gpu
@pytest.mark.parametrize("W", list(range(2, 9)))
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_bwd_every_width(W, layout):
    for seq in (None, _seq_packed(2, 300, seed=W)):
        _check_bwd(_pinned(2, 19, 300, W, seed=W, seq=seq, init=True), "bfloat16", "float32", layout, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_bwd_every_dtype(dt, layout):
    _check_bwd(_pinned(2, 19, 1100, 4, seed=7, init=True), dt[0], dt[1], layout, True)
    _check_bwd(_pinned(2, 19, 300, 4, seed=8, act=None, bias=False), dt[0], dt[1], layout, False)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("L", [1, 3, 700, 1500])
def test_gpu_bwd_seq_idx(layout, L):
    for W in (2, 4, 8):
        for init in (False, True):
            p = _pinned(2, 21, L, W, seed=W, seq=_seq_packed(2, L, seed=W), init=init)
            _check_bwd(p, "float32", "float32", layout, True)
            _check_bwd(p, "bfloat16", "bfloat16", layout, False)
    _check_bwd(_pinned(2, 21, L, 4, act=None, seq=_seq_packed(2, L), init=True), "float32", "float32", layout, True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_gpu_bwd_deterministic(layout):
    import cupy

    p = _pinned(4, 96, 4100, 4, seed=3, init=True, seq=_seq_packed(4, 4100))
    dev, _ = _fwd_inputs(p, "bfloat16", "float32", layout)
    dout = _place(_r(np.random.default_rng(1).standard_normal(p["x"].shape), "bfloat16"), layout)
    runs = [ssmkit.causal_conv1d_bwd(dev["x"], dev["weight"], dev["bias"], dout, activation="silu",
                                     seq_idx=dev["seq_idx"], initial_states=dev["initial_states"],
                                     deterministic=True) for _ in range(2)]
    cupy.cuda.runtime.deviceSynchronize()
    for a, b in zip(*runs):
        assert np.ascontiguousarray(_get(a)).tobytes() == np.ascontiguousarray(_get(b)).tobytes()


@pytest.mark.gpu
def test_gpu_plan_reuse_refreshes_pointers():
    """Same signature, new data: the cached plan must use the new pointers."""
    from gpu_util import sync_check

    for seed in range(3):
        p = _pinned(2, 16, 64, 4, seed=seed)
        _check_fwd(p, "float32", "float32", "cf", False, False)
        _check_bwd(p, "float32", "float32", "cf", False, seed)
    sync_check()


# ---- decode update ---------------------------------------------------------------------------

UPDATE_DTYPES = [("float32", "float32", "float32"), ("bfloat16", "float32", "float32"),
                 ("bfloat16", "bfloat16", "bfloat16"), ("float16", "float32", "float16"),
                 ("bfloat16", "bfloat16", "float32"), ("float64", "float64", "float64"),
                 # (x, state, weight) pairings upstream also accepts
                 ("float32", "float32", "bfloat16"), ("float32", "float32", "float16"),
                 ("float16", "float16", "bfloat16"), ("bfloat16", "float32", "float16")]


def _check_update(p, xd, sd, wd, poison_out=True, state_view=False):
    """Run the update on device copies; compare out and the whole pool with the reference."""
    import cupy
    from gpu_util import sync_check

    xr, sr = _r(p["x"], xd), _r(p["conv_state"], sd)
    wr, br = _r(p["weight"], wd), _r(p.get("bias"), wd)
    csl, idx = p.get("cache_seqlens"), p.get("conv_state_indices")
    csl = None if csl is None else np.ascontiguousarray(csl, np.int32)
    idx = None if idx is None else np.ascontiguousarray(idx, np.int32)
    if state_view:   # pool rows spread out in a larger buffer: (pool, D, S) view with a row gap
        P, D, S = sr.shape
        buf = np.zeros((P, D + 3, S + 2), sr.dtype)
        buf[:, :D, 1:S + 1] = sr
        state_buf = cupy.asarray(buf)
        state = state_buf[:, :D, 1:S + 1]
    else:
        state = cupy.asarray(np.ascontiguousarray(sr))
    out = None
    if poison_out:
        from gpu_util import np_dtype

        out = cupy.asarray(np.full(p["x"].shape, np.nan, np_dtype(xd)))
    got = ssmkit.causal_conv1d_update(cupy.asarray(xr), state, _dev(wr), _dev(br), activation=p.get("activation"),
                                      cache_seqlens=_dev(csl), conv_state_indices=_dev(idx), out=out)
    sync_check()
    state_want = _h(sr)
    want = ref_update(_h(xr), state_want, _h(wr), _h(br), activation=p.get("activation"), cache_seqlens=csl,
                      conv_state_indices=idx)
    if poison_out:
        assert got is out
    assert_close("out", _h(got), want, xd)
    got_state = _h(state_buf)[:, :state.shape[1], 1:state.shape[2] + 1] if state_view else _h(state)
    assert_close("conv_state", got_state, np.asarray(state_want, np.float64), sd)
    if idx is not None:   # pool rows no batch row points at, and padding rows' outputs
        used = set(int(i) for i in idx if i >= 0)
        for r in range(sr.shape[0]):
            if r not in used:
                np.testing.assert_array_equal(got_state[r], _h(sr)[r])
        for b, i in enumerate(idx):
            if i < 0:
                assert not np.any(_h(got)[b]), "padding row output must be 0"


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(50, 1.0))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=conv_update_problems(max_batch=4, max_dim=300, max_width=8, max_new_len=6),
       dt=st.sampled_from(UPDATE_DTYPES), poison_out=st.booleans(), state_view=st.booleans())
def test_gpu_update_hypothesis(shard, p, dt, poison_out, state_view):
    _check_update(dict(p), *dt, poison_out=poison_out, state_view=state_view)


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("L_new", [None, 1, 3, 9])
@pytest.mark.parametrize("W, S", [(2, 1), (4, 3), (4, 6), (8, 7), (8, 12)])
def test_gpu_update_modes(ring, L_new, W, S):
    rng = np.random.default_rng(W * 100 + S)
    B, D = 3, 133
    xs = (B, D) if L_new is None else (B, D, L_new)
    p = dict(x=rng.standard_normal(xs), conv_state=rng.standard_normal((B + 2, D, S)),
             weight=rng.standard_normal((D, W)), bias=rng.standard_normal(D), activation="silu",
             cache_seqlens=rng.integers(0, 3 * S + 5, B).astype(np.int32) if ring else None,
             conv_state_indices=np.array([4, -1, 1], np.int32))
    for dt in (("bfloat16", "float32", "float32"), ("float32", "float32", "float32")):
        _check_update(p, *dt)
    p["conv_state_indices"] = None
    _check_update(p, "float32", "float32", "float32", state_view=True)


@pytest.mark.gpu
def test_gpu_update_matches_full_conv():
    """Decoding token by token (shift register) equals the full forward conv."""
    import cupy

    rng = np.random.default_rng(0)
    B, D, L, W = 2, 70, 12, 4
    x = rng.standard_normal((B, D, L)).astype(np.float32)
    w = rng.standard_normal((D, W)).astype(np.float32)
    full = _get(ssmkit.causal_conv1d(cupy.asarray(x), cupy.asarray(w), activation="silu"))
    state = cupy.zeros((B, D, W - 1), np.float32)
    xs = cupy.asarray(x)
    steps = [_get(ssmkit.causal_conv1d_update(xs[:, :, t], state, cupy.asarray(w), activation="silu"))
             for t in range(L)]
    np.testing.assert_allclose(np.stack(steps, -1), full, rtol=1e-5, atol=1e-5)

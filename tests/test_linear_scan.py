"""linear_scan: CPU path and validation (CI), GPU kernel against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ssmkit
from ssmkit.ops import linear_scan as op
from ssmkit.reference import linear_scan as ref_scan, linear_scan_bwd as ref_bwd

from compare import assert_close
from gpu_examples import shards
from gpu_util import as64, poison, rounded, sync_check, to_device


def _problem(rng, shape, cplx):
    a = rng.uniform(0.5, 1.0, shape)
    b = rng.standard_normal(shape)
    init = rng.standard_normal(shape[:-1])
    if cplx:
        a = a * np.exp(1j * rng.uniform(-1, 1, shape))
        b = b + 1j * rng.standard_normal(shape)
        init = init + 1j * rng.standard_normal(shape[:-1])
    return a, b, init


def test_numpy_path_is_reference():
    rng = np.random.default_rng(0)
    a, b, init = _problem(rng, (2, 3, 17), False)
    for reverse in (False, True):
        np.testing.assert_array_equal(ssmkit.linear_scan(a, b, init, reverse=reverse),
                                      ref_scan(a, b, init, reverse=reverse))


@pytest.mark.parametrize("bad, err, match", [
    (dict(b=np.zeros((2, 4))), ValueError, "argument 'b' must have shape"),
    (dict(initial=np.zeros((3,))), ValueError, "argument 'initial' must have shape"),
    (dict(a=np.zeros((2, 5), np.int32)), TypeError, "argument 'a' must have dtype"),
    (dict(b=np.zeros((2, 5), np.float32)), TypeError, "share one dtype"),
    (dict(reverse=1), TypeError, "'reverse' must be a bool"),
    (dict(a=[1.0, 2.0]), TypeError, "must be a NumPy or CuPy array"),
])
def test_validation(bad, err, match):
    args = dict(a=np.ones((2, 5)), b=np.ones((2, 5)), initial=None, reverse=False)
    args.update(bad)
    with pytest.raises(err, match=match):
        ssmkit.linear_scan(**args)


DTYPES = ["float32", "float64", "complex64", "complex128", "bfloat16", "float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("shard", shards(40))
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       L=st.sampled_from([1, 2, 7, 255, 256, 257, 1000]), reverse=st.booleans(),
       with_init=st.booleans(), seed=st.integers(0, 2**31))
def test_gpu_forward_backward(shard, dtype, lead, L, reverse, with_init, seed):
    rng = np.random.default_rng(seed)
    cplx = dtype.startswith("complex")
    a, b, init = _problem(rng, tuple(lead) + (L,), cplx)
    a, b = rounded(a, dtype), rounded(b, dtype)
    init = rounded(init, dtype) if with_init else None
    h = ssmkit.linear_scan(to_device(a), to_device(b), to_device(init), reverse=reverse)
    sync_check()
    want = ref_scan(as64(a), as64(b), as64(init), reverse=reverse)
    assert_close("h", h, want, dtype)
    dh = rounded(rng.standard_normal(a.shape) * (1 + 1j if cplx else 1), dtype)
    da, db, dinit = ssmkit.linear_scan_bwd(to_device(a), to_device(b), to_device(dh), to_device(init),
                                           reverse=reverse)
    sync_check()
    wa, wb, wi = ref_bwd(as64(a), as64(b), as64(dh), as64(init), reverse=reverse)
    assert_close("db", db, wb, dtype, grad=True)
    assert_close("da", da, wa, dtype, grad=True)
    if with_init:
        assert_close("dinitial", dinit, wi, dtype, grad=True)


@pytest.mark.gpu
def test_gpu_noncontiguous_and_poisoned():
    import cupy

    rng = np.random.default_rng(1)
    a, b, init = _problem(rng, (4, 6, 300), False)
    A = to_device(a.astype(np.float32))[::2, :, ::-1]      # batch slice and negative L stride
    Bd = to_device(b.astype(np.float32)).transpose(1, 0, 2)[:, ::2]
    Bd = cupy.ascontiguousarray(Bd).transpose(1, 0, 2)
    out = poison((2, 6, 300), "float32")
    h = op._scan_gpu(A, Bd, None, False, out=out)
    sync_check()
    want = ref_scan(as64(A), as64(Bd))
    assert_close("h", h, want, "float32")


@pytest.mark.nvrtc
def test_params_layout():
    from ssmkit._nvrtc_offline import compile_file

    compile_file("linear_scan.cu", [op.kernel_ref("float32").name], 90,
                 extra_source=op.PARAMS.layout_asserts())

"""The install check at first GPU use (ssmkit/_cuda_env.py): which driver runs which CuPy build,
and the one message naming the extra. Runs without a GPU (versions are monkeypatched)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

import ssmkit
from ssmkit import _cuda_env
from ssmkit._cuda_env import CudaSetupError, diagnose


@pytest.mark.parametrize("driver,build", [(13000, 13000), (13000, 13020), (13020, 13000), (12080, 12000),
                                          (12020, 12090), (13000, 12080), (14000, 13000)])
def test_driver_runs_builds_of_its_major_or_older(driver, build):
    assert diagnose(driver, build, "cupy-cuda13x") is None


def test_cuda12_driver_under_a_cuda13_build_names_the_cuda12_extra():
    msg = diagnose(12080, 13000, "cupy-cuda13x")
    assert msg is not None and "\n" not in msg
    assert "CUDA 12.8" in msg and "built for CUDA 13" in msg
    assert 'pip install "ssmkit[cuda12]"' in msg and "pip uninstall cupy-cuda13x" in msg
    assert "cuda13]" not in msg


def test_unknown_wheel_still_names_the_extra():
    msg = diagnose(12000, 13020, None)
    assert 'pip install "ssmkit[cuda12]"' in msg and "uninstall" not in msg


def test_driver_older_than_every_extra_says_upgrade():
    msg = diagnose(11080, 12000, "cupy-cuda12x")
    assert "CUDA 11.8" in msg and "upgrade the driver" in msg


def test_no_driver():
    msg = diagnose(0, 13000, "cupy-cuda13x")
    assert msg.startswith("ssmkit: no NVIDIA driver found")


def test_install_hint():
    assert _cuda_env.install_hint(12) == 'pip install "ssmkit[cuda12]"'
    assert _cuda_env.install_hint(13) == 'pip install "ssmkit[cuda13]"'
    assert _cuda_env.install_hint(15) == 'pip install "ssmkit[cuda13]"'   # newer drivers run the newest build
    both = _cuda_env.install_hint(None)
    assert "ssmkit[cuda13]" in both and "ssmkit[cuda12]" in both


def _fake_cupy(driver: int, build: int):
    rt = SimpleNamespace(driverGetVersion=lambda: driver, runtimeGetVersion=lambda: build, is_hip=False)
    return SimpleNamespace(cuda=SimpleNamespace(runtime=rt))


def test_check_driver_raises_once_then_caches_success(monkeypatch):
    monkeypatch.setattr(_cuda_env, "_checked", False)
    monkeypatch.setattr(_cuda_env, "cupy_wheel", lambda: "cupy-cuda13x")
    with pytest.raises(CudaSetupError, match=r"ssmkit\[cuda12\]"):
        _cuda_env.check_driver(_fake_cupy(12040, 13000))
    assert _cuda_env._checked is False                # a failed check is not remembered
    _cuda_env.check_driver(_fake_cupy(13000, 13000))
    assert _cuda_env._checked is True
    _cuda_env.check_driver(_fake_cupy(12040, 13000))  # checked once per process: no second query


def test_get_kernel_explains_a_driver_too_old(monkeypatch):
    """The first kernel fetch fails inside CuPy (insufficient driver); ssmkit re-raises it as the
    one message naming the extra, with CuPy's error as the cause."""
    cupy = pytest.importorskip("cupy")
    from ssmkit._compile import get_kernel
    from ssmkit._registry import variants

    class InsufficientDriver(Exception):
        pass

    def get_device():
        raise InsufficientDriver("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    monkeypatch.setattr(cupy.cuda.runtime, "CUDARuntimeError", InsufficientDriver)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", get_device)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 12080)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 13000)
    monkeypatch.setattr(_cuda_env, "_checked", False)
    monkeypatch.setattr(_cuda_env, "cupy_wheel", lambda: "cupy-cuda13x")
    with pytest.raises(CudaSetupError) as info:
        get_kernel(variants("linear_scan")[0])
    assert 'pip install "ssmkit[cuda12]"' in str(info.value)
    assert isinstance(info.value.__cause__, InsufficientDriver)


def test_get_kernel_reraises_errors_the_driver_does_not_explain(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from ssmkit._compile import get_kernel
    from ssmkit._registry import variants

    class OtherError(Exception):
        pass

    def get_device():
        raise OtherError("cudaErrorDevicesUnavailable")

    monkeypatch.setattr(cupy.cuda.runtime, "CUDARuntimeError", OtherError)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", get_device)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 13000)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 13000)
    monkeypatch.setattr(_cuda_env, "_checked", False)
    with pytest.raises(OtherError):
        get_kernel(variants("linear_scan")[0])


def test_no_driver_here_gives_the_clear_message():
    """On this machine (no GPU, CuPy installed) the first kernel fetch says there is no driver."""
    pytest.importorskip("cupy")
    from conftest import gpu_available
    if gpu_available():
        pytest.skip("a GPU is usable here")
    from ssmkit._compile import get_kernel
    from ssmkit._registry import variants

    with pytest.raises(CudaSetupError, match="no NVIDIA driver found"):
        get_kernel(variants("linear_scan")[0])


def test_missing_cupy_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError) as info:
        _cuda_env.import_cupy()
    msg = str(info.value)
    assert "CuPy is not installed" in msg and "ssmkit[cuda13]" in msg and "ssmkit[cuda12]" in msg


def test_missing_cupy_at_first_gpu_use(monkeypatch):
    """warmup (get_kernel) and a CUDA DLPack array both say which extra to install."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    from ssmkit._registry import variants

    with pytest.raises(ImportError, match=r"ssmkit\[cuda13\]"):
        ssmkit.warmup(kernels=variants("linear_scan")[:1], progress_bar=False)

    class CudaArray:  # a foreign array on a CUDA device (kDLCUDA = 2)
        dtype = np.dtype("float32")

        def __dlpack__(self, stream=None):
            raise AssertionError("never converted: CuPy is missing")

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(ImportError, match=r"ssmkit\[cuda12\]"):
        ssmkit.linear_scan(CudaArray(), CudaArray())


def test_numpy_path_needs_no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    a = np.full((2, 5), 0.5)
    b = np.ones((2, 5))
    h = ssmkit.linear_scan(a, b)
    assert np.allclose(h[:, -1], sum(0.5 ** k for k in range(5)))

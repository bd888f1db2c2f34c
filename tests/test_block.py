"""ssmkit.models.Block: residual add + norm + mixer (+ gated MLP), fused (ssmkit's add+norm kernel)
and unfused, against the pure-torch oracle in float64 on the CPU, forward and backward; on the GPU
the fused and unfused blocks agree."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from ssmkit.models import create_block  # noqa: E402

import model_oracle  # noqa: E402
from compare import assert_close  # noqa: E402


def make(seed=0, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(seed)
    kw = {"rms_norm": True, "fused_add_norm": True, "residual_in_fp32": True, **kw}
    b = create_block(32, ssm_cfg={"d_state": 8}, layer_idx=0, device=device, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if "norm" in name or name.endswith(("A_log", ".D")):
                p.add_(0.2 * torch.randn_like(p))
    return b


CASES = {
    "rms fused": {},
    "rms unfused": {"fused_add_norm": False},
    "layernorm fused": {"rms_norm": False},
    "layernorm unfused": {"rms_norm": False, "fused_add_norm": False},
    "mlp fused": {"d_intermediate": 40},
    "mlp unfused": {"d_intermediate": 40, "fused_add_norm": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("first", [True, False])
def test_block_equals_torch_oracle(case, first):
    b = make(**CASES[case])
    ref = copy.deepcopy(b)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 7, 32, generator=g, dtype=torch.float64, requires_grad=True)
    res = None if first else torch.randn(2, 7, 32, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = h.detach().clone().requires_grad_()
    res2 = None if first else res.detach().clone().requires_grad_()
    out, r = b(h, res)
    want, want_r = model_oracle.block(ref, h2, res2)
    assert_close("out", out.detach(), want.detach(), "float64")
    assert_close("residual", r.detach(), want_r.detach(), "float64")
    assert r.dtype == torch.float64                  # residual_in_fp32 never narrows fp64
    go, gr = torch.randn_like(out), torch.randn_like(r)
    torch.autograd.backward((out, r), (go, gr))
    torch.autograd.backward((want, want_r), (go, gr))
    assert_close("dh", h.grad, h2.grad, "float64")
    if not first:
        assert_close("dresidual", res.grad, res2.grad, "float64")
    for (n, p), (_, q) in zip(b.named_parameters(), ref.named_parameters()):
        assert_close(f"d{n}", p.grad, q.grad, "float64" if p.dtype == torch.float64 else "float32")


def test_residual_in_fp32_dtypes():
    b = make(dtype=torch.float32)
    h = torch.randn(1, 5, 32)
    _, r = b(h.to(torch.float32))
    assert r.dtype == torch.float32
    for fused in (True, False):
        b16 = make(dtype=torch.bfloat16, fused_add_norm=fused)
        b16.mixer.A_log.data = b16.mixer.A_log.data.float()
        _, r = b16(h.to(torch.bfloat16))
        assert r.dtype == torch.float32, fused
        b16.residual_in_fp32 = False
        _, r = b16(h.to(torch.bfloat16))
        assert r.dtype == torch.bfloat16, fused


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [True, False])
def test_gpu_fused_and_unfused_blocks_agree(dtype, rms):
    b = make(device="cuda", dtype=dtype, rms_norm=rms, d_intermediate=64)
    u = copy.deepcopy(b)
    u.fused_add_norm = False
    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(2, 300, 32, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    res = torch.randn(2, 300, 32, device="cuda", dtype=torch.float32, generator=g, requires_grad=True)
    h2, res2 = h.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()
    out, r = b(h, res)
    want, want_r = u(h2, res2)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    assert_close("out", out.detach().float(), want.detach().float(), name)
    assert_close("residual", r.detach(), want_r.detach(), name)
    go = torch.randn_like(out)
    torch.autograd.backward((out, r), (go, torch.ones_like(r)))
    torch.autograd.backward((want, want_r), (go, torch.ones_like(want_r)))
    assert_close("dh", h.grad.float(), h2.grad.float(), name, grad=True)
    assert_close("dresidual", res.grad, res2.grad, name, grad=True)
    for (n, p), (_, q) in zip(b.named_parameters(), u.named_parameters()):
        assert_close(f"d{n}", p.grad.float(), q.grad.float(), name, grad=True, scale=2.0)

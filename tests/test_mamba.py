"""ssmkit.models.Mamba, the Mamba-1 mixer: parameters and initialisation as upstream's, forward and
backward against a pure-torch oracle (float64, CPU), the fused (mamba_inner_fn) and composed paths,
checkpoint_lvl, the decode step against the parallel forward; on the GPU in fp32 and bf16."""
from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from ssmkit.models import InferenceParams, Mamba  # noqa: E402

import model_oracle  # noqa: E402
from compare import assert_close  # noqa: E402

UPSTREAM_PARAMS = {  # name -> shape, for d_model 32, d_state 8, d_conv 4, expand 2 (dt_rank 2)
    "A_log": (64, 8), "D": (64,), "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
    "x_proj.weight": (18, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,), "out_proj.weight": (32, 64),
}


def make(seed=0, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "d_state": 8, "layer_idx": 0, **kw}
    m = Mamba(**kw, device=device, dtype=dtype)
    with torch.no_grad():   # move A and D off their initial values so their gradients mean something
        m.A_log.add_(0.1 * torch.randn_like(m.A_log))
        m.D.add_(0.1 * torch.randn_like(m.D))
    return m


def test_parameters_match_upstream():
    m = make()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == UPSTREAM_PARAMS
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.dt_proj.bias._no_reinit
    assert m.dt_rank == math.ceil(32 / 16)


def test_initialisation():
    torch.manual_seed(1)
    m = Mamba(64, d_state=16, dt_min=0.002, dt_max=0.05, dt_init_floor=1e-4)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(128, 1))
    assert m.A_log.dtype == torch.float32 and torch.equal(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach().double())
    assert float(dt.min()) >= 0.002 * (1 - 1e-5) and float(dt.max()) <= 0.05 * (1 + 1e-5)
    assert float(dt.log().std()) > 0.3          # log-uniform spread, not a constant
    std = m.dt_rank ** -0.5
    w = m.dt_proj.weight.detach()
    assert float(w.abs().max()) <= std and float(w.std()) > 0.3 * std
    c = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(c.dt_proj.weight, torch.full_like(c.dt_proj.weight, 2.0 * c.dt_rank ** -0.5))
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(64, dt_init="bogus")


def _inputs(m, B=2, L=9, seed=3, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, m.d_model, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_equal_torch_oracle(fast, bias):
    m = make(bias=bias, use_fast_path=fast)
    ref = copy.deepcopy(m)
    h = _inputs(m).requires_grad_()
    h_ref = h.detach().clone().requires_grad_()
    out = m(h)
    want = model_oracle.mixer(ref, h_ref)
    assert_close("out", out.detach(), want.detach(), "float64")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    assert_close("dh", h.grad, h_ref.grad, "float64")
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        # A_log and D are fp32 parameters in any model (upstream's): their gradients are rounded to fp32
        assert_close(f"d{name}", p.grad, q.grad, "float64" if p.dtype == torch.float64 else "float32")


@pytest.mark.parametrize("lvl", [0, 1])
def test_checkpoint_level_gives_the_same_gradients(lvl):
    from ssmkit.torch import mamba_inner_fn

    m = make()
    h = _inputs(m)
    xz = (h @ m.in_proj.weight.t()).transpose(1, 2).detach().requires_grad_()
    A = -torch.exp(m.A_log.detach().double())
    D = m.D.detach().double()

    def run(level):
        xz.grad = None
        out = mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight,
                             None, A, None, None, D, delta_bias=m.dt_proj.bias, checkpoint_lvl=level)
        out.sum().backward()
        return out.detach(), xz.grad.clone()

    o1, g1 = run(lvl)
    o0, g0 = run(1 - lvl)
    assert torch.equal(o0, o1)
    assert_close("dxz", g1, g0, "float64")
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight,
                       None, A, checkpoint_lvl=2)


def test_mamba_inner_is_one_autograd_node():
    m = make()
    out = m(_inputs(m))
    assert type(out.grad_fn).__name__ == "MambaInnerFunctionBackward"


def _step_all(m, h, device="cpu"):
    """Decode h (B, L, d) one token at a time from zero states; returns (B, L, d)."""
    conv_state, ssm_state = m.allocate_inference_cache(h.shape[0], h.shape[1])
    outs = []
    with torch.no_grad():
        for t in range(h.shape[1]):
            o, _, _ = m.step(h[:, t:t + 1], conv_state, ssm_state)
            outs.append(o)
    return torch.cat(outs, dim=1)


def test_step_reproduces_parallel_forward():
    m = make()
    h = _inputs(m, L=7)
    with torch.no_grad():
        want = m(h)
    assert_close("step", _step_all(m, h), want, "float64")


def test_prefill_then_step_equals_parallel_forward():
    m = make()
    h = _inputs(m, L=10)
    with torch.no_grad():
        want = m(h)
        params = InferenceParams(max_seqlen=10, max_batch_size=2)
        got = [m(h[:, :6], inference_params=params)]
        params.seqlen_offset = 6
        for t in range(6, 10):
            got.append(m(h[:, t:t + 1], inference_params=params))
            params.seqlen_offset += 1
    assert_close("prefill+step", torch.cat(got, dim=1), want, "float64")


def test_step_validates():
    m = make()
    cs, ss = m.allocate_inference_cache(2, 4)
    assert cs.shape == (2, 64, 4) and ss.shape == (2, 64, 8) and cs.dtype == ss.dtype == torch.float64
    with pytest.raises(ValueError, match="one token"):
        m.step(_inputs(m, L=2), cs, ss)
    with pytest.raises(ValueError, match="layer_idx"):
        Mamba(32, dtype=torch.float64)(_inputs(m, L=2), inference_params=InferenceParams(4, 2))


def test_decode_weights_follow_a_log_updates():
    m = make()
    A1 = m._decode_weights()[0]
    with torch.no_grad():
        m.A_log.add_(1.0)
    A2 = m._decode_weights()[0]
    assert A2.data_ptr() == A1.data_ptr()          # refreshed in place (a captured graph sees it)
    assert torch.allclose(A2, -torch.exp(m.A_log.double()))


# ---- GPU ----------------------------------------------------------------------------------------

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_forward_backward_against_oracle(dtype):
    m64 = make(d_model=64, d_state=16)
    m = copy.deepcopy(m64).to(device="cuda", dtype=DT[dtype])
    m.A_log.data = m.A_log.data.float()          # as upstream: A_log and D stay fp32
    m.D.data = m.D.data.float()
    ref = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    h = _inputs(m64, B=2, L=300, dtype=torch.float64)
    hd = h.to(device="cuda", dtype=DT[dtype]).requires_grad_()
    hr = hd.detach().cpu().double().requires_grad_()
    out_fast = m(hd)
    m.use_fast_path = False
    out_slow = m(hd.detach())
    want = model_oracle.mixer(ref, hr)
    assert_close("out fused", out_fast.detach(), want.detach(), dtype)
    assert_close("out composed", out_slow.detach(), want.detach(), dtype)
    assert_close("fused vs composed", out_fast.detach(), out_slow.detach(), dtype)
    g = torch.randn_like(want)
    out_fast.backward(g.to(device="cuda", dtype=out_fast.dtype))
    want.backward(g)
    assert_close("dh", hd.grad, hr.grad, dtype, grad=True)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert_close(f"d{name}", p.grad, q.grad, dtype, grad=True, scale=2.0 if dtype == "bfloat16" else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_step_reproduces_parallel_forward(dtype):
    m = make(d_model=64, d_state=16).to(device="cuda", dtype=DT[dtype])
    h = _inputs(m, B=3, L=12, device="cuda", dtype=DT[dtype])
    with torch.no_grad():
        want = m(h)
    assert_close("step", _step_all(m, h), want, dtype)

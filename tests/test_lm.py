"""MixerModel / MambaLMHeadModel: upstream's structure and names, logits and gradients against a
pure-torch oracle (float64, CPU), the gated MLP, training steps, DDP and FSDP2 (gloo, CPU); on the
GPU fp32/bf16 logits, fused vs composed paths, and bf16 autocast training."""
from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

from ssmkit.models import Block, MambaConfig, MambaLMHeadModel, MixerModel  # noqa: E402

import model_oracle  # noqa: E402
from compare import assert_close  # noqa: E402


def tiny(seed=0, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(seed)
    cfg = MambaConfig(**{"d_model": 32, "n_layer": 2, "vocab_size": 61, "ssm_cfg": {"d_state": 8}, **kw})
    m = MambaLMHeadModel(cfg, device=device, dtype=dtype)
    with torch.no_grad():   # norms and A/D away from their init values: their gradients then matter
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "norm2.weight", "A_log", ".D")):
                p.add_(0.2 * torch.randn_like(p))
    return m


def ids(B=2, L=9, seed=1, V=61):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_structure_matches_upstream():
    m = tiny()
    names = set(m.state_dict())
    for want in ("backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.layers.1.mixer.A_log",
                 "backbone.layers.1.mixer.dt_proj.bias", "backbone.norm_f.weight", "lm_head.weight"):
        assert want in names
    assert m.backbone.embedding.weight.shape == (64, 32)          # 61 padded to a multiple of 8
    assert m.lm_head.weight is m.backbone.embedding.weight         # tied
    assert isinstance(m.backbone, MixerModel) and all(isinstance(b, Block) for b in m.backbone.layers)
    assert [b.mixer.layer_idx for b in m.backbone.layers] == [0, 1]
    assert m(ids()).logits.shape == (2, 9, 64)
    assert m(ids(), num_last_tokens=2).logits.shape == (2, 2, 64)
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    # prenorm residual rescaling of out_proj at init (1 / sqrt(n_layer))
    torch.manual_seed(0)
    big = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=16, vocab_size=64), dtype=torch.float64)
    bound = (1.0 / 128) ** 0.5 / 4                                   # kaiming_uniform(a=sqrt(5)) / sqrt(16)
    w = big.backbone.layers[3].mixer.out_proj.weight
    assert float(w.abs().max()) <= bound * (1 + 1e-6) and float(w.abs().max()) > 0.9 * bound


def test_unsupported_configs_raise():
    with pytest.raises(NotImplementedError, match="attention"):
        tiny(attn_layer_idx=[1])
    with pytest.raises(NotImplementedError, match="Mamba-1"):
        tiny(ssm_cfg={"layer": "Mamba2"})


CONFIGS = {
    "rms-fused-fp32res": {},
    "rms-unfused": {"fused_add_norm": False},
    "layernorm-fused": {"rms_norm": False, "residual_in_fp32": False},
    "layernorm-unfused": {"rms_norm": False, "fused_add_norm": False},
    "mlp": {"d_intermediate": 48},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_equal_torch_oracle(name):
    m = tiny(**CONFIGS[name])
    ref = copy.deepcopy(m)
    x = ids()
    out = m(x).logits
    want = model_oracle.lm_logits(ref, x)
    assert_close("logits", out.detach(), want.detach(), "float64")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert_close(f"d{n}", p.grad, q.grad, "float64" if p.dtype == torch.float64 else "float32")


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    m = tiny(dtype=torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = ids(B=4, L=16)
    losses = []
    for _ in range(8):
        logits = m(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    # the decode weights (A = -exp(A_log), cached for generation) follow the training updates
    out = m.generate(x[:, :4], max_length=8, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        full = m(out.sequences).logits
    assert_close("after training", out.scores[-1], full[:, -2], "float32")


# ---- distributed (gloo on the CPU) ---------------------------------------------------------------

def _dist_worker(rank, world, port, mode, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = tiny(dtype=torch.float32)
        x = ids(B=4, L=12)[rank * 2:(rank + 1) * 2]
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(m)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in m.backbone.layers:
                fully_shard(layer)
            model = fully_shard(m)
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        grads = {}
        for n, p in m.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            grads[n] = g.detach().clone()
        if rank == 0:
            torch.save(grads, os.path.join(outdir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_training_equals_one_process(tmp_path, mode):
    import socket

    import torch.multiprocessing as mp

    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dist_worker, args=(2, port, mode, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(tmp_path / f"{mode}.pt")
    m = tiny(dtype=torch.float32)
    x = ids(B=4, L=12)
    logits = m(x[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    for n, p in m.named_parameters():
        assert_close(f"{mode} d{n}", got[n], p.grad, "float32")


# ---- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_add_norm", [True, False])
def test_gpu_logits_and_gradients(dtype, fused_add_norm):
    ref = tiny(d_model=64, fused_add_norm=fused_add_norm)
    m = copy.deepcopy(ref).to("cuda", dtype=dtype)
    x = ids(B=2, L=200, V=61)
    out = m(x.cuda()).logits
    want = model_oracle.lm_logits(ref, x)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    assert_close("logits", out.detach().float(), want.detach(), name, scale=2.0)
    g = torch.randn_like(want)
    out.backward(g.to("cuda", dtype=out.dtype))
    want.backward(g)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert_close(f"d{n}", p.grad.float(), q.grad, name, grad=True, scale=2.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.gpu
def test_gpu_fused_and_composed_paths_agree():
    m = tiny(d_model=64, dtype=torch.float32, device="cuda")
    x = ids(B=3, L=333).cuda()
    a = m(x).logits
    for layer in m.backbone.layers:
        layer.mixer.use_fast_path = False
    b = m(x).logits
    assert_close("fused vs composed", a.detach(), b.detach(), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False])
def test_gpu_autocast_bf16_training_step(fast):
    """Under torch.autocast(bf16) with fp32 parameters (upstream's training setup) the gradients
    follow the fp32 model's within bf16 tolerance, and they land in fp32."""
    m = tiny(d_model=64, dtype=torch.float32, device="cuda")
    for layer in m.backbone.layers:
        layer.mixer.use_fast_path = fast
    ref = copy.deepcopy(m)
    x = ids(B=2, L=256).cuda()

    def loss_of(model):
        logits = model(x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    with torch.autocast("cuda", dtype=torch.bfloat16):
        la = loss_of(m)
    la.backward()
    lr = loss_of(ref)
    lr.backward()
    assert abs(float(la) - float(lr)) < 2e-2 * abs(float(lr))
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32, n
        assert_close(f"d{n}", p.grad, q.grad, "bfloat16", grad=True, scale=2.0)

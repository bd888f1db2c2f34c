"""ssmkit.distributed (context parallelism): the sequence split over 2 and 4 gloo processes on the
CPU (the float64 reference path), with odd, unequal splits (a zero-length and slices shorter than
the conv's halo included); outputs, local end states and the gradient of every input equal the
single-process call on the whole sequence (per-token gradients slice by slice, shared weights'
gradients summed over the ranks). GPU: 2 GPUs over NCCL (fp32/bf16) against one GPU.

One spawn per world size runs every case (process start-up dominates on 2 cores); each case's
outcome on every rank is then reported by its own test.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import traceback
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import ssmkit.distributed as sd  # noqa: E402
import ssmkit.torch as sst  # noqa: E402
from compare import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

L_TOTAL = 37
SPLITS = {2: {"scan": [20, 17], "conv": [2, 35]},
          4: {"scan": [9, 10, 8, 10], "conv": [2, 0, 1, 34], "zero": [12, 0, 15, 10]}}
F64 = torch.float64


# ---- helpers (run inside the ranks) -----------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _bounds(sizes, rank):
    return sum(sizes[:rank]), sizes[rank]


def _close(name, got, want, grad=False):
    """assert_close in the dtype's tolerance (float64 / complex128; fp32 parameters such as
    A_log and D of a float64 model in fp32's)."""
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel():
        kind = {torch.float32: "float32", torch.complex128: "complex128"}.get(got.dtype, "float64")
        assert_close(name, got, want, kind, grad=grad)


def _check_grad(name, leaf, ref_grad, axis, sizes, rank, shared_scale=1.0):
    """Per-token (axis given): this rank's slice of the single call's gradient; shared (axis
    None): the sum over ranks equals it."""
    g = leaf.grad
    assert g is not None, f"{name}: no gradient"
    if axis is None:
        g = g.clone()
        dist.all_reduce(g)
        want = ref_grad
    else:
        start, n = _bounds(sizes, rank)
        want = ref_grad.narrow(axis, start, n)
    _close(f"grad {name}", g, want, grad=True)


def _scan_case(rank, world, group, sizes, *, variable=True, complex_=False, full=True):
    """selective_scan_fn: out, local end state, gradients of every input."""
    g = _gen(3)
    Bsz, Dd, N, L = 2, 3, 4, sum(sizes)
    cdt = torch.complex128 if complex_ else F64
    u = _randn(g, Bsz, Dd, L)
    delta = _randn(g, Bsz, Dd, L, scale=0.5) if full else _randn(g, Bsz, Dd, L).abs() * 0.3
    A = -torch.exp(_randn(g, Dd, N, scale=0.5))
    if complex_:
        A = torch.complex(A, _randn(g, Dd, N))
    if variable:
        Bm, Cm = _randn(g, Bsz, 1, N, L, dtype=cdt), _randn(g, Bsz, 1, N, L, dtype=cdt)
        bc_axis = 3
    else:
        Bm, Cm = _randn(g, Dd, N, dtype=cdt), _randn(g, Dd, N, dtype=cdt)
        bc_axis = None
    Dv = _randn(g, Dd) if full else None
    z = _randn(g, Bsz, Dd, L) if full else None
    bias = _randn(g, Dd, scale=0.3) if full else None
    h0 = _randn(g, Bsz, Dd, N, dtype=cdt) if full else None
    gy = _randn(g, Bsz, Dd, L)
    glast = _randn(g, world, Bsz, Dd, N, dtype=cdt)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]
    axes = [2, 2, None, bc_axis, bc_axis, None, 2, None, None]
    full_in = [u, delta, A, Bm, Cm, Dv, z, bias, h0]

    # single process: the whole sequence, plus each rank's end state from a prefix call
    ref = [_leaf(t) for t in full_in]
    kw = dict(delta_softplus=full)
    y, last = sst.selective_scan_fn(*ref[:5], ref[5], ref[6], ref[7], return_last_state=True,
                                    initial_state=ref[8], **kw)
    loss = (y * gy).sum()
    ends = []
    for r in range(world):
        e = sum(sizes[:r + 1])
        if e == L:
            end_state = last
        else:
            pre = [t[..., :e] if t is not None and ax is not None else t for t, ax in zip(ref, axes)]
            _, end_state = sst.selective_scan_fn(*pre[:5], pre[5], pre[6], pre[7], return_last_state=True,
                                                 initial_state=pre[8], **kw)
        ends.append(end_state)
        loss = loss + (end_state * glast[r]).real.sum()
    loss.backward()

    start, n = _bounds(sizes, rank)
    loc = [None if t is None else _leaf(t.narrow(ax, start, n) if ax is not None else t)
           for t, ax in zip(full_in, axes)]
    if rank != 0:
        loc[8] = None
    yl, lastl = sd.selective_scan_fn(*loc[:5], loc[5], loc[6], loc[7], return_last_state=True,
                                     initial_state=loc[8], group=group, **kw)
    ((yl * gy.narrow(2, start, n)).sum() + (lastl * glast[rank]).real.sum()).backward()

    _close("out", yl.detach(), y.detach().narrow(2, start, n))
    _close("last_state", lastl.detach(), ends[rank].detach())
    for name, lt, rt, ax in zip(names, loc, ref, axes):
        if rt is None:
            continue
        if name == "h0":
            if rank == 0:
                _close("grad h0", lt.grad, rt.grad, grad=True)
            continue
        _check_grad(name, lt, rt.grad, ax, sizes, rank)


def _conv_case(rank, world, group, sizes):
    """causal_conv1d_fn: out, final states, gradients of x, weight, bias, initial_states."""
    g = _gen(5)
    Bsz, Dd, W, L = 2, 3, 4, sum(sizes)
    x, w, b = _randn(g, Bsz, Dd, L), _randn(g, Dd, W), _randn(g, Dd)
    init = _randn(g, Bsz, Dd, W - 1)
    gy, gfin = _randn(g, Bsz, Dd, L), _randn(g, world, Bsz, Dd, W - 1)

    rx, rw, rb, ri = (_leaf(t) for t in (x, w, b, init))
    y, fin = sst.causal_conv1d_fn(rx, rw, rb, initial_states=ri, return_final_states=True, activation="silu")
    loss = (y * gy).sum()
    finals = []
    for r in range(world):
        e = sum(sizes[:r + 1])
        f = fin if e == L else sst.causal_conv1d_fn(rx[..., :e], rw, rb, initial_states=ri,
                                                    return_final_states=True, activation="silu")[1]
        finals.append(f)
        loss = loss + (f * gfin[r]).sum()
    loss.backward()

    start, n = _bounds(sizes, rank)
    lx, lw, lb = _leaf(x[..., start:start + n]), _leaf(w), _leaf(b)
    li = _leaf(init) if rank == 0 else None
    yl, fl = sd.causal_conv1d_fn(lx, lw, lb, initial_states=li, return_final_states=True, activation="silu",
                                 group=group)
    ((yl * gy[..., start:start + n]).sum() + (fl * gfin[rank]).sum()).backward()
    _close("out", yl.detach(), y.detach()[..., start:start + n])
    _close("final_states", fl.detach(), finals[rank].detach())
    _check_grad("x", lx, rx.grad, 2, sizes, rank)
    _check_grad("weight", lw, rw.grad, None, sizes, rank)
    _check_grad("bias", lb, rb.grad, None, sizes, rank)
    if rank == 0:
        _close("grad initial_states", li.grad, ri.grad, grad=True)


def _inner_case(rank, world, group, sizes):
    """mamba_inner_fn: output and the gradients of xz and every weight."""
    g = _gen(7)
    Bsz, Dd, N, W, R, out_dim, L = 2, 4, 3, 4, 2, 5, sum(sizes)
    full = {
        "xz": _randn(g, Bsz, 2 * Dd, L),
        "conv1d_weight": _randn(g, Dd, 1, W, scale=0.5),
        "conv1d_bias": _randn(g, Dd, scale=0.5),
        "x_proj_weight": _randn(g, R + 2 * N, Dd, scale=0.5),
        "delta_proj_weight": _randn(g, Dd, R, scale=0.5),
        "out_proj_weight": _randn(g, out_dim, Dd, scale=0.5),
        "out_proj_bias": _randn(g, out_dim),
        "A": -torch.exp(_randn(g, Dd, N, scale=0.5)),
        "D": _randn(g, Dd),
        "delta_bias": _randn(g, Dd, scale=0.3),
    }
    gy = _randn(g, Bsz, L, out_dim)
    ref = {k: _leaf(v) for k, v in full.items()}
    order = ["xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
             "out_proj_bias", "A"]
    y = sst.mamba_inner_fn(*(ref[k] for k in order), D=ref["D"], delta_bias=ref["delta_bias"])
    (y * gy).sum().backward()

    start, n = _bounds(sizes, rank)
    loc = {k: _leaf(v[..., start:start + n] if k == "xz" else v) for k, v in full.items()}
    yl = sd.mamba_inner_fn(*(loc[k] for k in order), D=loc["D"], delta_bias=loc["delta_bias"], group=group)
    (yl * gy[:, start:start + n]).sum().backward()
    _close("out", yl.detach(), y.detach()[:, start:start + n])
    for k in full:
        _check_grad(k, loc[k], ref[k].grad, 2 if k == "xz" else None, sizes, rank)


def _model_case(rank, world, group, sizes):
    """MambaLMHeadModel with context_parallel_group: logits and parameter gradients."""
    from ssmkit.models import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=29, ssm_cfg={"d_state": 4})
    model = MambaLMHeadModel(cfg, dtype=F64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "A_log", ".D")):
                p.add_(0.2 * torch.randn(p.shape, generator=_gen(11), dtype=F64))
    cp = copy.deepcopy(model)
    cp.set_context_parallel_group(group)
    ids = torch.randint(0, 29, (2, sum(sizes)), generator=_gen(13))
    gl = _randn(_gen(17), 2, sum(sizes), cfg.padded_vocab_size)
    logits = model(ids).logits
    (logits * gl).sum().backward()
    local_ids = sd.shard(ids, group, dim=1, sizes=sizes)
    start, n = _bounds(sizes, rank)
    ll = cp(local_ids).logits
    (ll * gl[:, start:start + n]).sum().backward()
    _close("logits", ll.detach(), logits.detach()[:, start:start + n])
    _close("gathered logits", sd.gather(ll.detach(), group, dim=1), logits.detach())
    for (name, p), (_, q) in zip(model.named_parameters(), cp.named_parameters()):
        _check_grad(name, q, p.grad, None, sizes, rank)


def _mismatch_case(rank, world, group, sizes):
    """Ranks that disagree on D raise ValueError on every rank, before any data moves."""
    Dd = 3 + (rank == 1)
    u = torch.zeros(1, Dd, 5, dtype=F64)
    A = -torch.ones(Dd, 2, dtype=F64)
    Bm = torch.zeros(1, 2, 5, dtype=F64)
    with pytest.raises(ValueError, match="disagree"):
        sd.selective_scan_fn(u, u, A, Bm, Bm, group=group)
    if rank != 0:                            # raised locally, before any collective
        with pytest.raises(ValueError, match="belongs"):
            sd.selective_scan_fn(u, u, A, Bm, Bm, initial_state=torch.zeros(1, Dd, 2, dtype=F64), group=group)
    assert sd.split_sizes(37, 4) == [10, 9, 9, 9]


CASES = {
    "scan": lambda r, w, g: _scan_case(r, w, g, SPLITS[w]["scan"]),
    "scan_constant_bc": lambda r, w, g: _scan_case(r, w, g, SPLITS[w].get("zero", SPLITS[w]["scan"]),
                                                   variable=False, full=False),
    "scan_complex": lambda r, w, g: _scan_case(r, w, g, SPLITS[w]["scan"], complex_=True),
    "conv": lambda r, w, g: _conv_case(r, w, g, SPLITS[w]["conv"]),
    "conv_even": lambda r, w, g: _conv_case(r, w, g, sd.split_sizes(L_TOTAL, w)),
    "inner": lambda r, w, g: _inner_case(r, w, g, SPLITS[w]["scan"]),
    "inner_short": lambda r, w, g: _inner_case(r, w, g, SPLITS[w]["conv"]),
    "model": lambda r, w, g: _model_case(r, w, g, SPLITS[w]["scan"]),
    "mismatch": lambda r, w, g: _mismatch_case(r, w, g, None),
}


def _worker(rank, world, init_file, out_dir, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for name in cases:
        try:
            CASES[name](rank, world, dist.group.WORLD)
            results[name] = "ok"
        except AssertionError:          # a wrong number: the ranks are still in step, go on
            results[name] = traceback.format_exc()
        except Exception:               # anything else may leave a collective unmatched: stop all
            results[name] = traceback.format_exc()
            with open(path, "w") as f:
                json.dump(results, f)
            raise
        with open(path, "w") as f:
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


_RUNS: dict = {}


def _run(world, tmp_path_factory):
    """Spawn ``world`` gloo ranks once and run every case; {case: {rank: "ok" or traceback}}."""
    if world not in _RUNS:
        import torch.multiprocessing as mp

        d = tmp_path_factory.mktemp(f"cp{world}")
        stopped = ""
        try:
            mp.spawn(_worker, args=(world, str(d / "store"), str(d), list(CASES)), nprocs=world, join=True)
        except Exception as exc:        # a rank raised: its cases say what; the rest did not run
            stopped = f" (the ranks were stopped: {type(exc).__name__}: {str(exc)[:2000]})"
        per_rank = [json.loads(p.read_text()) if p.exists() else {} for p in
                    (d / f"rank{r}.json" for r in range(world))]
        _RUNS[world] = {c: {r: per_rank[r].get(c, "not run" + stopped) for r in range(world)} for c in CASES}
    return _RUNS[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_cpu(case, world, tmp_path_factory):
    res = _run(world, tmp_path_factory)[case]
    bad = {r: msg for r, msg in res.items() if msg != "ok"}
    assert not bad, "\n".join(f"rank {r}:\n{m}" for r, m in bad.items())


def test_group_none_is_the_plain_call():
    g = _gen(1)
    u, delta = _randn(g, 1, 2, 6), _randn(g, 1, 2, 6)
    A, Bm, Cm = -torch.ones(2, 3, dtype=F64), _randn(g, 1, 3, 6), _randn(g, 1, 3, 6)
    assert torch.equal(sd.selective_scan_fn(u, delta, A, Bm, Cm, group=None),
                       sst.selective_scan_fn(u, delta, A, Bm, Cm))
    x, w = _randn(g, 1, 2, 6), _randn(g, 2, 4)
    assert torch.equal(sd.causal_conv1d_fn(x, w, group=None), sst.causal_conv1d_fn(x, w))
    assert sd.split_sizes(5, 3) == [2, 2, 1] and sd.split_sizes(2, 4) == [1, 1, 0, 0]
    assert torch.equal(sd.shard(u, None), u)
    with pytest.raises(ValueError, match="sizes"):
        sd.split_sizes(-1, 2)


def test_benchmark_cpu_smoke(tmp_path):
    """benchmarks/bench_context_parallel.py parses its arguments and its gloo mode runs, equal to
    the single call."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_context_parallel.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--cpu-smoke" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "context_parallel_cpu.json").read_text())
    assert {(s["op"], s["world"]) for s in data["summary"]} == {("scan", 1), ("inner", 1), ("scan", 2), ("inner", 2)}
    assert all(s["max_abs_err_vs_single"] <= 1e-10 for s in data["summary"])


# ---- GPU: 2 GPUs over NCCL against one GPU ----------------------------------------------------

def _gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_worker(rank, world, port, out_dir, dtype_name):
    import ssmkit.distributed as sd
    import ssmkit.torch as sst

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    dev = torch.device("cuda", rank)
    dtype = getattr(torch, dtype_name)
    results = {}
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        Bsz, Dd, N, W, R, L = 2, 64, 16, 4, 4, 4099
        sizes = sd.split_sizes(L, world)
        start, n = sum(sizes[:rank]), sizes[rank]
        full = {"xz": torch.randn(Bsz, 2 * Dd, L, generator=g), "conv1d_weight": torch.randn(Dd, 1, W, generator=g) * .5,
                "conv1d_bias": torch.randn(Dd, generator=g) * .5,
                "x_proj_weight": torch.randn(R + 2 * N, Dd, generator=g) * Dd ** -.5,
                "delta_proj_weight": torch.randn(Dd, R, generator=g) * R ** -.5,
                "out_proj_weight": torch.randn(Dd, Dd, generator=g) * Dd ** -.5,
                "out_proj_bias": None, "A": -torch.exp(torch.randn(Dd, N, generator=g) * .5),
                "D": torch.randn(Dd, generator=g), "delta_bias": torch.randn(Dd, generator=g) * .3}
        wdt = {"A", "D", "delta_bias"}
        gy = torch.randn(Bsz, L, Dd, generator=g).to(dev, dtype)

        def make(k, v, sl):
            if v is None:
                return None
            t = v[..., start:start + n] if (k == "xz" and sl) else v
            return t.to(dev, torch.float32 if k in wdt else dtype).detach().requires_grad_(True)

        order = ["xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
                 "out_proj_bias", "A"]
        ref = {k: make(k, v, False) for k, v in full.items()}
        y = sst.mamba_inner_fn(*(ref[k] for k in order), D=ref["D"], delta_bias=ref["delta_bias"])
        (y.float() * gy.float()).sum().backward()
        loc = {k: make(k, v, True) for k, v in full.items()}
        yl = sd.mamba_inner_fn(*(loc[k] for k in order), D=loc["D"], delta_bias=loc["delta_bias"],
                               group=dist.group.WORLD)
        (yl.float() * gy[:, start:start + n].float()).sum().backward()
        scale = 2.0
        assert_close("out", yl.detach().float().cpu(), y.detach().float().cpu()[:, start:start + n], dtype_name,
                     scale=scale)
        for k in full:
            if loc[k] is None:
                continue
            gk = loc[k].grad.float()
            if k == "xz":
                want = ref[k].grad.float()[..., start:start + n]
            else:
                dist.all_reduce(gk)
                want = ref[k].grad.float()
            assert_close(f"grad {k}", gk.cpu(), want.cpu(), dtype_name, grad=True, scale=scale)
        results["inner"] = "ok"
    except Exception:
        results["inner"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2 or not dist.is_nccl_available(), reason="needs 2 CUDA GPUs and NCCL")
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_context_parallel_two_gpus(dtype_name, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gpu_worker, args=(2, _free_port(), str(tmp_path), dtype_name), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res.get("inner") == "ok", f"rank {r}:\n{res.get('inner')}"

"""Cached generation: step-by-step decoding reproduces the parallel forward's logits, greedy
generation equals the argmax of the full forward, ragged batches equal each row alone, per-row EOS,
sampling filters, repetition penalty, streamers; on the GPU also the CUDA-graph decode."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ssmkit.models import MambaConfig, MambaLMHeadModel, sample  # noqa: E402
from ssmkit.models.generation import modify_logit_for_repetition_penalty  # noqa: E402

from compare import assert_close  # noqa: E402

V = 61   # padded to 64 rows


def tiny(seed=0, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_layer": 2, "vocab_size": V, "ssm_cfg": {"d_state": 8}, **kw}
    cfg = MambaConfig(**kw)
    m = MambaLMHeadModel(cfg, device=device, dtype=dtype)
    with torch.no_grad():   # larger embeddings than the 0.02 init: logits that differ clearly
        m.backbone.embedding.weight.normal_(0, 1.0)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompts(B=2, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)


def test_greedy_equals_argmax_of_full_forward(model):
    ids = prompts()
    out = model.generate(ids, max_length=14, return_dict_in_generate=True, output_scores=True)
    seq = out.sequences
    assert seq.shape == (2, 14) and torch.equal(seq[:, :6], ids)
    with torch.no_grad():
        full = model(seq).logits
    for i, s in enumerate(out.scores):       # step logits == parallel logits at that position
        assert_close(f"step {i}", s, full[:, 5 + i], "float64")
    assert torch.equal(full[:, 5:-1].argmax(-1), seq[:, 6:])
    assert torch.equal(model.generate(ids, max_length=14), seq)


def test_max_new_tokens_and_validation(model):
    ids = prompts()
    assert model.generate(ids, max_new_tokens=3).shape == (2, 9)
    assert model.generate(ids, max_length=20, max_new_tokens=2).shape == (2, 8)
    assert model.generate(ids, max_length=4).shape == (2, 6)      # the prompt is already longer
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids)
    with pytest.raises(ValueError, match="cg=True"):
        model.generate(ids, max_length=10, cg=True)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []], max_length=10)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(5, dtype=torch.long), max_length=10)


def test_ragged_batch_equals_each_row_alone(model):
    rows = [[5, 9, 1], [3, 3, 7, 11, 2, 8, 40], [60, 1, 2, 3, 4]]
    got = model.generate(rows, max_length=12)
    assert isinstance(got, list) and [len(g) for g in got] == [12, 12, 12]
    for r, g in zip(rows, got):
        alone = model.generate(torch.tensor([r]), max_length=12)[0]
        assert torch.equal(g, alone), (r, g, alone)


def test_attention_mask_either_side_equals_list(model):
    rows = [[5, 9, 1], [3, 3, 7, 11, 2, 8]]
    want = model.generate(rows, max_new_tokens=5)
    L = 6
    right = torch.zeros(2, L, dtype=torch.long)
    left = torch.zeros(2, L, dtype=torch.long)
    mr = torch.zeros(2, L, dtype=torch.long)
    ml = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate(rows):
        right[i, :len(r)] = torch.tensor(r)
        mr[i, :len(r)] = 1
        left[i, L - len(r):] = torch.tensor(r)
        ml[i, L - len(r):] = 1
    for ids, mask in ((right, mr), (left, ml)):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_each_row_stops_at_its_own_eos(model):
    ids = prompts(B=2)
    free = model.generate(ids, max_length=16)
    cands = [int(t) for t in free[0, 6:] if not (free[1, 6:] == t).any()]
    if not cands:
        pytest.skip("the two rows generate the same tokens (pick another seed)")
    eos = cands[0]
    n = 6 + int((free[0, 6:] == eos).nonzero()[0]) + 1         # row 0 ends after its first EOS
    out = model.generate(ids, max_length=16, eos_token_id=eos, pad_token_id=V - 1)
    assert torch.equal(out[0, :n], free[0, :n]) and (out[0, n:] == V - 1).all()
    assert torch.equal(out[1], free[1])      # row 1 keeps going to max_length
    ragged = model.generate([ids[0].tolist(), ids[1].tolist()], max_length=16, eos_token_id=eos)
    assert torch.equal(ragged[0], free[0, :n]) and torch.equal(ragged[1], free[1])
    short = model.generate(ids[:1], max_length=16, eos_token_id=eos)   # all rows done: the loop ends early
    assert short.shape == (1, n)


def test_repetition_penalty_matches_a_plain_loop(model):
    ids = prompts(B=2, L=4)
    got = model.generate(ids, max_length=12, repetition_penalty=1.7)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(8):
            logits = model(seq).logits[:, -1]
            logits = modify_logit_for_repetition_penalty(logits, seq, 1.7)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = modify_logit_for_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    mask = torch.tensor([[True, True, False, False]])
    assert torch.equal(modify_logit_for_repetition_penalty(logits, mask, 2.0), out)


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 50, generator=g)
    top5 = torch.topk(logits, 5, dim=-1).indices
    s = sample(logits, top_k=5, temperature=1.3, generator=g)
    assert (s[:, None] == top5).any(-1).all()
    p = torch.softmax(logits, -1)
    sp, order = torch.sort(p, -1, descending=True)
    keep_n = ((sp.cumsum(-1) - sp) < 0.6).sum(-1)                 # nucleus size per row
    s = sample(logits, top_k=0, top_p=0.6, generator=g)
    rank = (order == s[:, None]).float().argmax(-1)
    assert (rank < keep_n).all()
    s = sample(logits, top_k=0, min_p=0.3, generator=g)
    assert (p.gather(1, s[:, None]).squeeze(1) >= 0.3 * p.max(-1).values).all()
    assert torch.equal(sample(logits), logits.argmax(-1))
    cold = sample(logits, top_k=0, temperature=1e-3, generator=g)
    top2 = torch.topk(logits, 2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05                        # exp(-50): never the runner-up
    assert torch.equal(cold[clear], logits.argmax(-1)[clear]) and clear.sum() > 3000
    s = sample(logits, top_k=0, generator=g)                       # full softmax: many tokens used
    assert len(torch.unique(s)) > 40
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, top_k=0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, top_k=0, temperature=0.0)


def test_sampled_generation_is_reproducible_and_filtered(model):
    ids = prompts()
    a = model.generate(ids, max_length=12, top_k=3, temperature=0.8, generator=torch.Generator().manual_seed(5),
                       return_dict_in_generate=True, output_scores=True)
    b = model.generate(ids, max_length=12, top_k=3, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.sequences, b)
    for i, s in enumerate(a.scores):
        top3 = torch.topk(s, 3, dim=-1).indices
        assert (a.sequences[:, 6 + i, None] == top3).any(-1).all()


def test_streamers(model):
    ids = prompts(B=1)

    class Streamer:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, t):
            self.parts.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    s = Streamer()
    out = model.generate(ids, max_length=10, streamer=s)
    assert s.ended and s.parts[0] == ids[0].tolist()
    assert sum(s.parts[1:], []) == out[0, 6:].tolist()
    got = []
    model.generate(ids, max_length=10, streamer=lambda t: got.extend(t.tolist()))
    assert got == out[0, 6:].tolist()


def test_timings_and_teacher_outputs(model):
    ids = prompts()
    teacher = torch.randint(0, V, (2, 12))
    teacher[:, :6] = ids
    out = model.generate(ids, max_length=12, teacher_outputs=teacher, enable_timing=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, teacher)
    assert out.timings["steps"] == 6 and out.timings["prefill_ms"] > 0 and out.timings["decode_ms"] > 0


# ---- GPU ----------------------------------------------------------------------------------------

def _gpu_model(dtype):
    m = tiny(d_model=64)                     # float64 on the CPU, then moved
    m = m.to("cuda", dtype=dtype)
    return m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cg", [False, True])
def test_gpu_step_logits_equal_full_forward(dtype, cg):
    m = _gpu_model(dtype)
    ids = prompts(B=3, L=20).cuda()
    out = m.generate(ids, max_length=36, cg=cg, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        full = m(out.sequences).logits.float()
    name = "float32" if dtype == torch.float32 else "bfloat16"
    for i, s in enumerate(out.scores):
        assert_close(f"step {i}", s.float(), full[:, 19 + i], name)
    if dtype == torch.float32:
        assert torch.equal(full[:, 19:-1].argmax(-1), out.sequences[:, 20:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_decode_equals_eager(dtype):
    m = _gpu_model(dtype)
    ids = prompts(B=4, L=9).cuda()
    teacher = torch.randint(0, V, (4, 30), device="cuda")
    teacher[:, :9] = ids
    eager = m.generate(ids, max_length=30, teacher_outputs=teacher, return_dict_in_generate=True, output_scores=True)
    graph = m.generate(ids, max_length=30, teacher_outputs=teacher, cg=True, return_dict_in_generate=True,
                       output_scores=True)
    again = m.generate(ids, max_length=30, teacher_outputs=teacher, cg=True, return_dict_in_generate=True,
                       output_scores=True)   # the second call replays the cached graph
    for a, b, c in zip(eager.scores, graph.scores, again.scores):
        assert torch.equal(b, c)
        assert_close("cg vs eager", b.float(), a.float(), "float32" if dtype == torch.float32 else "bfloat16")


@pytest.mark.gpu
def test_gpu_ragged_batch_equals_each_row_alone():
    m = _gpu_model(torch.float32)
    rows = [[5, 9, 1], [3, 3, 7, 11, 2, 8, 40, 1, 1, 1, 7], [60, 1, 2, 3, 4]]
    for cg in (False, True):
        got = m.generate(rows, max_length=24, cg=cg)
        for r, g in zip(rows, got):
            alone = m.generate(torch.tensor([r], device="cuda"), max_length=24)[0]
            assert torch.equal(g, alone), (cg, r, g, alone)


@pytest.mark.gpu
def test_gpu_continuous_batching_after_eos():
    """Rows that stop early drop out of the eager decode batch (state-pool indices): the others
    must still decode exactly as they would alone."""
    m = _gpu_model(torch.float32)
    ids = prompts(B=3, L=8).cuda()
    free = m.generate(ids, max_length=30)
    eos = int(free[0, 10])
    out = m.generate(ids, max_length=30, eos_token_id=eos)
    for i in range(3):
        row = free[i]
        hits = (row[8:] == eos).nonzero()
        n = 30 if len(hits) == 0 else 8 + int(hits[0]) + 1
        assert torch.equal(out[i, :n], row[:n])


def test_bench_generation_runs_on_the_cpu(tmp_path, capsys):
    """benchmarks/bench_generation.py with a tiny random model through the CPU reference path."""
    import json

    from benchmarks import bench_generation

    r = bench_generation.main(["--model", "tiny", "--device", "cpu", "--promptlen", "5", "--genlen", "4",
                               "--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert r["ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0
    assert "CPU reference path" in capsys.readouterr().out
    data = json.loads((tmp_path / "generation_tiny_cpu.json").read_text())
    assert data["results"][0]["batch"] == 2

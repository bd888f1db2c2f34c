"""lm-eval integration (ssmkit.integrations.lm_eval, python -m ssmkit.evals): a tiny random
MambaLMHeadModel (float64, CPU reference path) and a byte-level BPE tokenizer trained here, tasks
from local jsonl files; every score is checked against an independent computation with the model
itself (log-softmax of one unpadded full forward per sequence; greedy ``model.generate`` of one
prompt at a time, cut at the stop string). Nothing is downloaded (HF_*_OFFLINE=1).

Without lm_eval / transformers / tokenizers (the ``eval`` extra) those tests skip; the import
hygiene tests run anyway."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ssmkit.evals import lm_eval_argv  # noqa: E402  (imports nothing of lm_eval)

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
EXTRA = 'the eval extra: pip install -e ".[eval]"'
CORPUS = ["the cat sat on the mat.", "a dog ran in the park.", "the sun is hot and the moon is cold.",
          "birds fly over the sea.", "she reads a book every night.", "we eat rice and fish for dinner."]
EOS = "<|endoftext|>"
TOL = 1e-9          # float64 model: every path agrees to rounding


def _env(**extra):
    env = dict(os.environ, **OFFLINE, **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---- without lm-eval ------------------------------------------------------------------------------

def test_import_ssmkit_does_not_import_lm_eval():
    code = "import sys, ssmkit, ssmkit.models, ssmkit.evals; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_lm_eval_names_the_extra():
    block = "import sys; sys.modules['lm_eval'] = None\n"       # import lm_eval -> ImportError
    code = block + "import ssmkit.integrations.lm_eval"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert out.returncode != 0 and "ImportError" in out.stderr and 'pip install "ssmkit[eval]"' in out.stderr
    code = block + "import runpy; runpy.run_module('ssmkit.evals', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code, "--tasks", "x"], capture_output=True, text=True, env=_env(),
                         cwd=ROOT)
    assert out.returncode == 2 and 'ssmkit[eval]' in out.stderr and "Traceback" not in out.stderr


def test_cli_argv_defaults_the_model():
    assert lm_eval_argv(["--tasks", "t"]) == ["--model", "ssmkit", "--tasks", "t"]
    assert lm_eval_argv(["run", "--tasks", "t"]) == ["run", "--model", "ssmkit", "--tasks", "t"]
    assert lm_eval_argv(["--model", "hf", "--tasks", "t"]) == ["--model", "hf", "--tasks", "t"]
    assert lm_eval_argv(["--model=hf"]) == ["--model=hf"]
    assert lm_eval_argv(["-C", "c.yaml"]) == ["-C", "c.yaml"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert lm_eval_argv(["--help"]) == ["--help"] and lm_eval_argv([]) == []


# ---- fixtures: tokenizer, model, tasks -------------------------------------------------------------

@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    for k, v in OFFLINE.items():
        mp.setenv(k, v)
    for mod, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        try:
            m = __import__(mod, fromlist=[attr])
        except ImportError:
            continue
        mp.setattr(m, attr, True, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lmeval(offline):
    pytest.importorskip("transformers", reason=f"needs {EXTRA}")
    pytest.importorskip("tokenizers", reason=f"needs {EXTRA}")
    mod = pytest.importorskip("lm_eval", reason=f"needs {EXTRA}")
    import ssmkit.integrations.lm_eval as integ

    return mod, integ


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, lmeval):
    """A folder with a checkpoint (config.json + weights) and its tokenizer (tokenizer.json +
    tokenizer_config.json); also the bare tokenizer.json in tok/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ssmkit.models import MambaConfig, MambaLMHeadModel

    d = tmp_path_factory.mktemp("evals")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (d / "tok").mkdir()
    bpe.save(str(d / "tok" / "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tok" / "tokenizer.json"), eos_token=EOS)
    assert len(tok) == 300 and tok.eos_token_id == 0

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=len(tok), ssm_cfg={"d_state": 8})
    model = MambaLMHeadModel(cfg, dtype=torch.float64)
    assert model.config.padded_vocab_size == 304          # logits carry 4 padding rows the scores drop
    with torch.no_grad():   # larger embeddings than the 0.02 init: peaked, clearly different logits
        model.backbone.embedding.weight.normal_(0, 1.0)
    model.eval()
    (d / "model").mkdir()
    model.save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "model"))
    return d


@pytest.fixture(scope="module")
def model(workdir):
    from ssmkit.models import MambaLMHeadModel

    return MambaLMHeadModel.from_pretrained(str(workdir / "model"), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tok(workdir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(workdir / "model"))


def make_lm(lmeval, workdir, **kw):
    _, integ = lmeval
    args = dict(pretrained=str(workdir / "model"), device="cpu", dtype="float64", batch_size=1)
    args.update(kw)
    return integ.SsmkitLM(**args)


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ---- the independent computations -------------------------------------------------------------------

V = 300


@torch.no_grad()
def ref_score(model, tokens: list, n_cont: int):
    """(sum of log-softmax over the tokenizer's V of the last n_cont tokens, all greedy), from one
    unpadded full forward of ``tokens``."""
    logits = model(torch.tensor([tokens])).logits[0, :, :V]
    lp = torch.log_softmax(logits, -1)[len(tokens) - 1 - n_cont: len(tokens) - 1]
    t = torch.tensor(tokens[len(tokens) - n_cont:])
    return lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all())


def ref_pair(tok, context: str, continuation: str):
    """lm-eval's tokenisation of a (context, continuation) request: trailing spaces of the context
    move to the continuation, the continuation is what encoding the whole adds; an empty context
    becomes the prefix token (EOS here)."""
    if not context:
        return [tok.eos_token_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def ref_loglikelihood(model, tok, context, continuation, max_length=2048):
    ctx, cont = ref_pair(tok, context, continuation)
    return ref_score(model, (ctx + cont)[-(max_length + 1):], len(cont))


@torch.no_grad()
def ref_generate(model, tok, prompt: str, max_new: int):
    """Greedy text of one prompt alone (model.generate, unbatched), EOS and special tokens dropped."""
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_length=len(ids) + max_new, top_k=1, eos_token_id=tok.eos_token_id)
    gen = out[0, len(ids):].tolist()
    if tok.eos_token_id in gen:
        gen = gen[:gen.index(tok.eos_token_id) + 1]
    return tok.decode(gen, skip_special_tokens=True)


def cut(text, until):
    for s in until:
        text = text.split(s)[0]
    return text


ONE_TOKEN = (" the", " is", " and")     # one token each after "we eat rice and" with this tokenizer
LL_REQUESTS = [
    ("the cat sat on", " the mat."),           # a context shared by three multi-token continuations
    ("the cat sat on", " a dog"),
    ("the cat sat on", " the sea every night."),
    ("the cat sat on", " the mat."),           # a duplicate request
    ("birds fly over the ", "sea"),            # trailing space moves to the continuation
    ("we eat rice and", " the"),               # one-token continuations of one context
    ("we eat rice and", " is"),
    ("we eat rice and", " and"),
    ("", "she reads a book."),                 # empty context: conditioned on the prefix token
    ("a dog ran in the park. " * 3 + "the sun is", " hot and the moon is cold."),
]


# ---- the LM class on its own ----------------------------------------------------------------------

@pytest.mark.parametrize("share,batch", [(True, 1), (False, 3), ("auto", "auto"), (True, 4)])
def test_loglikelihood_equals_full_forward(lmeval, workdir, model, tok, share, batch):
    lm = make_lm(lmeval, workdir, share_contexts=share, batch_size=batch, max_batch_size=4)
    got = lm.loglikelihood(instances("loglikelihood", LL_REQUESTS))
    assert len(got) == len(LL_REQUESTS)
    for (c, x), (lp, greedy) in zip(LL_REQUESTS, got):
        want_lp, want_greedy = ref_loglikelihood(model, tok, c, x)
        assert abs(lp - want_lp) <= TOL * max(1.0, abs(want_lp)), (c, x, lp, want_lp)
        assert greedy == want_greedy, (c, x)
    assert got[0] == got[3]


def test_greedy_flag_is_true_for_the_greedy_continuation(lmeval, workdir, model, tok):
    ctx = tok.encode("the cat sat on")
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ctx]), max_length=len(ctx) + 5, top_k=1)[0, len(ctx):].tolist()
    other = list(greedy)
    other[2] = (other[2] + 1) % V                  # differs from the greedy tokens at one position
    for share in (True, False):
        lm = make_lm(lmeval, workdir, share_contexts=share, batch_size=2)
        (lp, g), (lp2, g2) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
        assert g and not g2 and lp > lp2
        assert abs(lp - ref_score(model, ctx + greedy, 5)[0]) <= TOL * abs(lp)


def test_truncation_to_max_length(lmeval, workdir, model, tok):
    reqs = [("a dog ran in the park. the sun is hot and the moon is", " cold."),
            ("a dog ran in the park. the sun is hot and the moon is", " hot and cold.")]
    for share in (True, False):
        lm = make_lm(lmeval, workdir, max_length=9, share_contexts=share, batch_size=2)
        got = lm.loglikelihood(instances("loglikelihood", reqs))
        for (c, x), (lp, _) in zip(reqs, got):
            want, _ = ref_loglikelihood(model, tok, c, x, max_length=9)
            assert abs(lp - want) <= TOL * max(1.0, abs(want))


def test_context_sharing_runs_one_prefill(lmeval, workdir, tok):
    """A context with k-token continuations: one prefill row, then k - 1 decode steps; one-token
    continuations need the prefill only; without sharing each request is its own row."""
    lm = make_lm(lmeval, workdir, share_contexts=True, batch_size=8)
    calls = []
    lm.model.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(a[0].shape)), with_kwargs=True)
    ctx = "the cat sat on"
    conts = [" the mat.", " a dog", " the sea every night."]
    k = max(len(ref_pair(tok, ctx, c)[1]) for c in conts)
    lm.loglikelihood(instances("loglikelihood", [(ctx, c) for c in conts]))
    assert calls[0][0] == 1 and calls[0][1] == len(tok.encode(ctx))          # one prefill row: the context
    assert calls[1:] == [(3, 1)] * (k - 1)                                   # then 3 rows decode k - 1 steps
    calls.clear()
    assert all(len(ref_pair(tok, "we eat rice and", c)[1]) == 1 for c in ONE_TOKEN)
    lm.share_contexts = "auto"        # one-token continuations: shared at no decode cost
    lm.loglikelihood(instances("loglikelihood", [("we eat rice and", c) for c in ONE_TOKEN]))
    assert calls == [(1, len(tok.encode("we eat rice and")))]
    calls.clear()
    lm.loglikelihood(instances("loglikelihood", [(ctx, c) for c in conts]))   # auto: decode steps cost more
    assert len(calls) == 1 and calls[0][0] == 3
    calls.clear()
    lm.share_contexts = False
    lm.loglikelihood(instances("loglikelihood", [("we eat rice and", c) for c in ONE_TOKEN]))
    assert len(calls) == 1 and calls[0][0] == 3


def test_loglikelihood_rolling_equals_full_sequence(lmeval, workdir, model, tok):
    docs = ["the sun is hot and the moon is cold.", "she reads a book every night. we eat rice and fish."]
    lm = make_lm(lmeval, workdir, batch_size=2)
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    for d, lp in zip(docs, got):
        ids = tok.encode(d)
        want, _ = ref_score(model, [tok.eos_token_id] + ids, len(ids))      # every token, after the prefix
        assert abs(lp - want) <= TOL * abs(want)
    # windows of max_length tokens (lm-eval's rolling windows): each window scored on its own
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = make_lm(lmeval, workdir, batch_size=3, max_length=6)
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    for d, lp in zip(docs, got):
        wins = [make_disjoint_window(w) for w in get_rolling_token_windows(tok.encode(d), tok.eos_token_id, 6, 1)]
        assert len(wins) > 2
        want = sum(ref_score(model, c + p, len(p))[0] for c, p in wins)
        assert abs(lp - want) <= TOL * abs(want)


PROMPTS = ["the cat sat on", "birds fly", "she reads a book every", "a dog"]


def stops_for(model, tok, n):
    """Per prompt: its greedy text, and a stop string that occurs in it after a few characters."""
    out = []
    for p in PROMPTS:
        text = ref_generate(model, tok, p, n)
        assert len(text) >= 6, (p, text)
        out.append((text, text[3:5]))
    return out


def test_generate_until_equals_greedy_cut_at_stop(lmeval, workdir, model, tok):
    n = 16
    refs = stops_for(model, tok, n)
    until = [s for _, s in refs]
    lm = make_lm(lmeval, workdir, batch_size=3)
    calls = []
    lm.model.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(a[0].shape)), with_kwargs=True)
    got = lm.generate_until(instances("generate_until", [(p, {"until": until, "max_gen_toks": n, "do_sample": False})
                                                         for p in PROMPTS]))
    for (text, _), g in zip(refs, got):
        assert g == cut(text, until)
    # ragged batches of 3 and 1, and each stopped once its rows showed a stop string: fewer
    # decode steps than max_gen_toks
    prefills = [c for c in calls if c[1] > 1]
    assert sorted(c[0] for c in prefills) == [1, 3]
    assert len(calls) - len(prefills) < 2 * (n - 1)
    # per-request stop strings (one group each), batch size 1, max_gen_toks from the model args
    lm = make_lm(lmeval, workdir, max_gen_toks=n)
    got = lm.generate_until(instances("generate_until", [(p, {"until": [s]}) for p, (_, s) in zip(PROMPTS, refs)]))
    assert got == [text.split(s)[0] for text, s in refs]
    # no stop string: the whole greedy text
    got = lm.generate_until(instances("generate_until", [(p, {"until": []}) for p in PROMPTS[:2]]))
    assert got == [text for text, _ in refs[:2]]


def test_generate_until_rejects_unknown_kwargs(lmeval, workdir):
    lm = make_lm(lmeval, workdir)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(instances("generate_until", [("the cat", {"until": ["."], "num_beams": 4})]))


def test_model_args(lmeval, workdir, tok):
    _, integ = lmeval
    with pytest.raises(ValueError, match="unknown model arguments"):
        make_lm(lmeval, workdir, revision="main")
    with pytest.raises(ValueError, match="dtype"):
        make_lm(lmeval, workdir, dtype="int8")
    lm = make_lm(lmeval, workdir, dtype="float32", tokenizer=str(workdir / "tok" / "tokenizer.json"))
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.eot_token_id == 0 and lm.prefix_token_id == 0 and lm.vocab_size == 300   # EOS found in the bare file
    assert lm.max_length == integ.DEFAULT_MAX_LENGTH and lm.batch_size == 1
    lm = make_lm(lmeval, workdir, dtype="auto", batch_size="auto", max_batch_size=5, prefix_token_id=7)
    assert next(lm.model.parameters()).dtype == torch.float32 and lm.batch_size == "auto" and lm.prefix_token_id == 7
    lm = lm_from_string(lmeval, f"pretrained={workdir / 'model'},device=cpu,share_contexts=false,cg=true")
    assert lm.share_contexts is False and lm.cg is False        # no CUDA graph on the CPU
    assert lm.get_model_info()["model_num_parameters"] > 0


def lm_from_string(lmeval, args):
    from lm_eval.api.registry import get_model

    cls = get_model("ssmkit")
    assert cls is get_model("ssmkit-mamba") is lmeval[1].SsmkitLM
    return cls.create_from_arg_string(args, {"batch_size": 2, "device": "cpu"})


# ---- through lm-eval: simple_evaluate and the command line --------------------------------------------

def write_tasks(d: Path, gen_until: list, n_gen: int) -> Path:
    data = d / "data"
    data.mkdir(exist_ok=True)
    mc = [{"question": "the cat sat on", "choices": ["the mat.", "a dog", "the sea every night."], "answer": 0},
          {"question": "we eat rice and", "choices": ["fish", "the", "a"], "answer": 0},
          {"question": "birds fly over the", "choices": ["sea.", "park.", "moon is cold."], "answer": 1}]
    gen = [{"prompt": p, "target": "x"} for p in PROMPTS]
    docs = [{"text": "the sun is hot and the moon is cold."}, {"text": "she reads a book every night."}]
    for name, rows in (("mc", mc), ("gen", gen), ("docs", docs)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = d / "tasks"
    tasks.mkdir(exist_ok=True)

    def head(task, name):
        return textwrap.dedent(f"""\
            task: {task}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data / (name + '.jsonl')}
            test_split: test
            """)

    (tasks / "tiny_mc.yaml").write_text(head("ssmkit_tiny_mc", "mc") + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
        """))
    (tasks / "tiny_gen.yaml").write_text(head("ssmkit_tiny_gen", "gen") + textwrap.dedent(f"""\
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: {json.dumps(gen_until)}
          max_gen_toks: {n_gen}
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    (tasks / "tiny_ppl.yaml").write_text(head("ssmkit_tiny_ppl", "docs") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
        """))
    return tasks


def check_samples(samples, model, tok, refs, until):
    """Every response lm-eval logged equals the independent computation."""
    mc = samples["ssmkit_tiny_mc"]
    assert len(mc) == 3
    for s in mc:
        # in memory: [(ctx, cont), ...] and [[(lp, greedy)], ...]; in the samples file the
        # arguments are {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...} and the numbers strings
        arguments = s["arguments"].values() if isinstance(s["arguments"], dict) else s["arguments"]
        assert len(arguments) == 3
        for args, resp in zip(arguments, s["resps"]):
            ctx, cont = (args["arg_0"], args["arg_1"]) if isinstance(args, dict) else args
            lp, greedy = float(resp[0][0]), str(resp[0][1]) == "True"
            want, want_greedy = ref_loglikelihood(model, tok, ctx, cont)
            assert abs(lp - want) <= TOL * max(1.0, abs(want)) and greedy == want_greedy
    for s in samples["ssmkit_tiny_gen"]:
        i = PROMPTS.index(s["doc"]["prompt"])
        assert s["resps"][0][0] == cut(refs[i][0], until)
    for s in samples["ssmkit_tiny_ppl"]:
        ids = tok.encode(s["doc"]["text"])
        want, _ = ref_score(model, [tok.eos_token_id] + ids, len(ids))
        assert abs(float(s["resps"][0][0]) - want) <= TOL * abs(want)


TASKS = ["ssmkit_tiny_mc", "ssmkit_tiny_gen", "ssmkit_tiny_ppl"]


def test_simple_evaluate(lmeval, workdir, model, tok):
    lm_eval, _ = lmeval
    from lm_eval.tasks import TaskManager

    n = 12
    refs = stops_for(model, tok, n)
    until = [s for _, s in refs[:2]]
    tasks = write_tasks(workdir, until, n)
    res = lm_eval.simple_evaluate(model="ssmkit", model_args={"pretrained": str(workdir / "model"), "dtype": "float64"},
                                  tasks=TASKS, device="cpu", batch_size=2, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    check_samples(res["samples"], model, tok, refs, until)
    r = res["results"]
    assert 0.0 <= r["ssmkit_tiny_mc"]["acc,none"] <= 1.0
    assert r["ssmkit_tiny_gen"]["exact_match,none"] == 0.0
    assert r["ssmkit_tiny_ppl"]["word_perplexity,none"] > 1.0


def test_command_line(lmeval, workdir, model, tok, tmp_path):
    n = 12
    refs = stops_for(model, tok, n)
    until = [s for _, s in refs[:2]]
    tasks = write_tasks(tmp_path, until, n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ssmkit.evals", "--model_args", f"pretrained={workdir / 'model'},dtype=float64",
           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--device", "cpu", "--batch_size", "3",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ssmkit_tiny_mc" in proc.stdout and "ssmkit (" in proc.stdout       # lm-eval's results table
    results = sorted(out.rglob("results_*.json"))
    assert results, list(out.rglob("*"))
    data = json.loads(results[-1].read_text())
    assert data["config"]["model"] == "ssmkit"
    samples = {}
    for t in TASKS:
        files = sorted(out.rglob(f"samples_{t}_*.jsonl"))
        assert files, t
        samples[t] = [json.loads(line) for line in files[-1].read_text().splitlines()]
    check_samples(samples, model, tok, refs, until)


# ---- GPU (the lead's H100/H200 runs) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-4), ("float16", 3e-2), ("bfloat16", 1e-1)])
def test_gpu_kernels_match_cpu_reference(lmeval, workdir, model, tok, dtype, tol):
    """The same checkpoint on CUDA (ssmkit's kernels) against the CPU float64 reference: scores of
    both paths (shared context and one row per request), batched and auto; generation through the
    CUDA graph, ragged batches and one prompt at a time (the same greedy text in float32)."""
    cpu = make_lm(lmeval, workdir, batch_size=4)
    want = cpu.loglikelihood(instances("loglikelihood", LL_REQUESTS))
    for share, batch in ((True, 4), (False, 4), ("auto", "auto")):
        lm = make_lm(lmeval, workdir, device="cuda", dtype=dtype, share_contexts=share, batch_size=batch)
        assert next(lm.model.parameters()).device.type == "cuda"
        got = lm.loglikelihood(instances("loglikelihood", LL_REQUESTS))
        for (c, x), (lp, _), (w, _) in zip(LL_REQUESTS, got, want):
            assert abs(lp - w) <= tol * max(1.0, abs(w)), (dtype, share, c, x, lp, w)
    docs = instances("loglikelihood_rolling", [("the sun is hot and the moon is cold.",)])
    w = cpu.loglikelihood_rolling(docs)[0]
    lp = make_lm(lmeval, workdir, device="cuda", dtype=dtype).loglikelihood_rolling(docs)[0]
    assert abs(lp - w) <= tol * abs(w)
    reqs = instances("generate_until", [(p, {"until": ["."], "max_gen_toks": 16}) for p in PROMPTS])
    eager = make_lm(lmeval, workdir, device="cuda", dtype=dtype, batch_size=3).generate_until(reqs)
    graph = make_lm(lmeval, workdir, device="cuda", dtype=dtype, batch_size=3, cg=True).generate_until(reqs)
    one = make_lm(lmeval, workdir, device="cuda", dtype=dtype, batch_size=1).generate_until(reqs)
    assert all(isinstance(t, str) for t in eager + graph + one) and len(eager) == len(graph) == len(PROMPTS)
    if dtype == "float32":     # same greedy tokens up to fp32 rounding (no near-ties in this model)
        assert eager == graph == one

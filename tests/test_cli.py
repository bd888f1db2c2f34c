"""The command line (``python -m ssmkit``): every subcommand on this CPU machine, and the error
paths (nonzero exit, one line on stderr, no traceback). GPU-marked tests cover the GPU paths."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from ssmkit import cli
from ssmkit.cli import bench as cli_bench
from ssmkit.cli import generate as cli_generate
from ssmkit.cli import info as cli_info

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m ssmkit ARGS`` in a fresh process, from the repository root."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ssmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=full_env)


def assert_one_line_error(proc_or_rc, err: str, code: int | None = None):
    rc = proc_or_rc.returncode if hasattr(proc_or_rc, "returncode") else proc_or_rc
    assert rc != 0
    if code is not None:
        assert rc == code
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- the command itself ---------------------------------------------------------------------

def test_import_stays_light():
    """Neither ``import ssmkit`` nor building the command line imports torch or CuPy."""
    code = ("import sys, ssmkit, ssmkit.cli; ssmkit.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'cupy', 'matplotlib', 'tokenizers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_subcommand():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("info", "warmup", "bench", "generate", "demo"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("cmd", ["info", "warmup", "bench", "generate"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: ssmkit " + cmd in capsys.readouterr().out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--no-such-flag"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_describe_errors_in_one_line():
    from ssmkit._cuda_env import CudaSetupError

    assert cli.describe(CudaSetupError("ssmkit: the driver ...")) == "the driver ..."
    missing = ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")
    assert "optional package 'matplotlib'" in cli.describe(missing)
    assert cli.describe(FileNotFoundError(2, "No such file", "/x/ckpt")) == "file not found: /x/ckpt"
    text = cli.describe(RuntimeError("first\nsecond\n"))
    assert "\n" not in text and text.startswith("RuntimeError: first; second") and "--debug" in text


def test_debug_shows_the_traceback(monkeypatch):
    def boom(args, extra):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_info, "run", boom)
    assert cli.main(["info"]) == 1
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "info"])


# ---- info -----------------------------------------------------------------------------------

def test_info_text():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("ssmkit", "CuPy", "driver", "GPU", "torch", "kernel cache", "sources hash"):
        assert word in out, out
    from ssmkit._registry import ops

    for op in ops():
        assert op in out


def test_info_json_matches_the_registry(tmp_path):
    from ssmkit._registry import ops, variants

    proc = run_cli("info", "--json", env={"CUPY_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cache"]["variants"] == {op: len(variants(op)) for op in ops()}
    assert data["cache"]["dir"] == str(tmp_path / "cache")
    assert data["cache"]["ssmkit_entries"] == {}
    if data["gpus"]:
        assert set(data["cache"]["compiled_for_gpu0"]) == set(ops())
    else:
        assert data["gpu_problem"] and data["cache"]["compiled_for_gpu0"] is None


def test_mangled_path():
    assert cli_info.mangled_path("_ZN3ssm11linear_scanIfEEvNS_16LinearScanParamsE") == ["ssm", "linear_scan"]
    assert cli_info.mangled_path("_ZN3ssm6detail4scanIfEEvv") == ["ssm", "detail", "scan"]
    assert cli_info.mangled_path("my_kernel") == []
    assert cli_info.kernel_function("ssm::selective_scan_fwd<ssm::f16, float, false, false, 16>") == "selective_scan_fwd"


def _cupy_cache_file(folder: Path, name: str, mangled: list[str], cubin: bytes = b"\x7fELF fake cubin"):
    """One cache file in CuPy's disk format (SHA-1 hex of the payload, then the payload: the
    name-expression header, then the cubin); through CuPy's own encoder when it has one."""
    try:
        from cupy.cuda import compiler

        payload = compiler._encode_cache_payload(mangled, cubin)
    except (ImportError, AttributeError):
        payload = b"\x93CUPYNE\x00" + struct.pack("<I", len(mangled))
        payload += b"".join(struct.pack("<I", len(m)) + m.encode() for m in mangled) + cubin
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(hashlib.sha1(payload).hexdigest().encode() + payload)


def test_info_counts_ssmkit_cache_entries(tmp_path):
    """A cache entry written in CuPy's format for a kernel NVRTC really lowered (offline, no GPU)
    counts for its op; other entries count only as files."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings + nvidia-cuda-nvrtc (the test extra)")
    from ssmkit._nvrtc_offline import compile_file
    from ssmkit._registry import variants

    ref = variants("linear_scan", dtype="float32")[0]
    mangled = compile_file(ref.file, [ref.name], 80).lowered[ref.name]
    cache = tmp_path / "cache"
    _cupy_cache_file(cache, "a" * 40 + ".cubin", [mangled])
    _cupy_cache_file(cache, "b" * 40 + ".cubin", ["_ZN5other6kernelIfEEvv"])
    (cache / ("c" * 40 + ".cubin")).write_bytes(b"0" * 40 + b"\x7fELF an old bare cubin")
    proc = run_cli("info", "--json", env={"CUPY_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["cache"]
    assert data["files"] == 3 and data["bytes"] > 0
    assert data["ssmkit_entries"] == {"linear_scan": 1}
    text = run_cli("info", env={"CUPY_CACHE_DIR": str(cache)}).stdout
    assert "3 files" in text


def test_cache_names_through_cupys_compile_path(tmp_path, monkeypatch):
    """The exact count asks CuPy's compile path for each variant's cache file name. Without a
    GPU the architecture is patched in; the names are distinct, nothing is compiled, CuPy is
    left as it was, and a file under a variant's name makes that variant (only) count."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import compiler
    from cupy.cuda._compiler_cache import DiskKernelCacheBackend

    from ssmkit._registry import variants

    refs = variants("linear_scan")[:2]
    folder = tmp_path / "cache"
    backend = DiskKernelCacheBackend(str(folder))
    monkeypatch.setattr(compiler, "_kernel_cache_backend", backend)
    monkeypatch.setattr(compiler, "_get_arch", lambda: "90")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: ("-arch=sm_90", "cubin"))
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    nvrtc_before = compiler._compile_using_nvrtc_no_warning
    try:
        names = cli_info.cache_names(refs)
    except Exception as exc:  # NVRTC not loadable by CuPy here: nothing to test
        pytest.skip(f"CuPy cannot preprocess here: {exc}")
    assert compiler._kernel_cache_backend is backend and compiler._compile_using_nvrtc_no_warning is nvrtc_before
    assert os.environ["CUPY_CACHE_IN_MEMORY"] == "1"
    assert set(names) == set(refs) and len(set(names.values())) == 2
    assert all(len(n) == 40 + len(".cubin") and n.endswith(".cubin") for n in names.values())
    assert cli_info.cached_variants(refs) == {refs[0]: False, refs[1]: False}
    (folder / names[refs[0]]).write_bytes(b"x")
    assert cli_info.cached_variants(refs) == {refs[0]: True, refs[1]: False}
    assert not [p for p in folder.iterdir() if p.name != names[refs[0]]], "the probe wrote to the cache"
    assert cupy is not None


@pytest.mark.gpu
def test_info_counts_a_warmed_variant_exactly(tmp_path):
    """On a GPU: after `ssmkit warmup` of one variant into an empty cache, `ssmkit info` counts
    exactly that one as compiled for this GPU (the key ssmkit computes is the one CuPy wrote)."""
    env = {"CUPY_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_cli("warmup", "--op", "linear_scan", "--dtype", "float32", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warmed up 1 variants" in proc.stdout
    data = json.loads(run_cli("info", "--json", env=env).stdout)["cache"]
    assert data["compiled_for_gpu0"]["linear_scan"] == 1
    assert sum(data["compiled_for_gpu0"].values()) == 1
    assert data["ssmkit_entries"] == {"linear_scan": 1}


# ---- warmup ---------------------------------------------------------------------------------

def test_warmup_dry_run_with_filters():
    from ssmkit._registry import variants

    proc = run_cli("warmup", "--op", "linear_scan", "--dtype", "float32", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    want = [str(r) for r in variants("linear_scan", dtype="float32")]
    listed = [ln.split("\t", 1)[1] for ln in proc.stdout.splitlines() if "\t" in ln]
    assert listed == want and len(want) == 1
    assert "nothing compiled" in proc.stdout


def test_warmup_filter_chooses_the_ops_that_take_it(capsys):
    from ssmkit._registry import variants

    assert cli.main(["warmup", "--filter", "width=4", "--filter", "kind=update", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "\t" in ln]
    assert lines and all(ln.startswith("causal_conv1d\t") for ln in lines)
    assert len(lines) == len(variants("causal_conv1d", width=4, kind="update"))


def test_warmup_list(capsys):
    assert cli.main(["warmup", "--list"]) == 0
    out = capsys.readouterr().out
    assert "selective_scan" in out and "dtype" in out


@pytest.mark.parametrize("argv,needle", [
    (["--op", "no_such_op", "--dry-run"], "unknown op no_such_op"),
    (["--op", "linear_scan", "--filter", "width=4", "--dry-run"], "has no filter width"),
    (["--filter", "nonsense", "--dry-run"], "KEY=VALUE"),
    (["--op", "linear_scan", "--dtype", "int8", "--dry-run"], "no variant matches"),
])
def test_warmup_usage_errors(argv, needle, capsys):
    rc = cli.main(["warmup", *argv])
    line = assert_one_line_error(rc, capsys.readouterr().err, code=2)
    assert needle in line


def test_warmup_without_a_gpu_is_one_line():
    proc = run_cli("warmup", "--op", "linear_scan", "--dtype", "float32", env={"SSMKIT_NO_GPU": "1"})
    line = assert_one_line_error(proc, proc.stderr, code=1)
    assert line.startswith("ssmkit warmup: warmup needs a CUDA GPU")


@pytest.mark.gpu
def test_warmup_compiles_two_variants(tmp_path):
    from ssmkit._registry import variants

    assert len(variants("reduce_partials")) == 2
    for attempt in ("compile", "load from the disk cache"):
        proc = run_cli("warmup", "--op", "reduce_partials", env={"CUPY_CACHE_DIR": str(tmp_path)})
        assert proc.returncode == 0, (attempt, proc.stderr)
        assert "warmed up 2 variants" in proc.stdout
        assert "ssmkit warmup [" in proc.stderr            # the progress bar


# ---- bench ----------------------------------------------------------------------------------

def test_bench_cpu_rows(tmp_path):
    proc = run_cli("bench", "--quick", "--out", tmp_path, env={"SSMKIT_NO_GPU": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "not the GPU kernels" in proc.stdout
    data = json.loads((tmp_path / "bench_cpu.json").read_text())["cpu"]
    names = [r["name"] for r in data["results"]]
    assert any("selective_scan fwd" in n for n in names) and any("causal_conv1d_update" in n for n in names)
    assert all(r["ms"] > 0 and r["ratio"] is None for r in data["results"])
    assert "float64 reference" in data["meta"]["note"]
    assert not (tmp_path / "bench.png").exists()


def _fake_bench_dir(tmp_path: Path, fail: bool = False) -> Path:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    shutil.copy(REPO / "benchmarks" / "plot_results.py", folder / "plot_results.py")
    (folder / "bench_fake.py").write_text(textwrap.dedent(f"""
        import argparse, json, sys
        from pathlib import Path
        ap = argparse.ArgumentParser()
        ap.add_argument("--out", required=True)
        ap.add_argument("--quick", action="store_true")
        a = ap.parse_args()
        print("fake bench running, quick =", a.quick)
        if {fail!r}:
            sys.exit(3)
        rows = [{{"name": "fake_fwd b1", "ms": 0.5, "anchor_ms": 0.6, "ratio": 1.2, "hbm_frac": 0.7}},
                {{"name": "fake_scan b1", "ms": 0.9, "anchor_ms": 0.8, "ratio": 0.889, "exp_frac": 0.3}}]
        Path(a.out, "fake.json").write_text(json.dumps({{"env": {{"gpu": "Fake GPU"}}, "meta": {{"quick": a.quick}},
                                                          "results": rows}}))
    """))
    return folder


def test_bench_gpu_path_runs_the_scripts_and_merges(tmp_path, monkeypatch, capfd):
    """The GPU path's orchestration, with a stand-in benchmark script (GPU status patched)."""
    monkeypatch.setattr(cli_bench, "gpu_status", lambda: (1, ""))
    folder = _fake_bench_dir(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["bench", "--bench-dir", str(folder), "--out", str(out), "--quick"]) == 0
    text = capfd.readouterr().out
    assert "fake bench running, quick = True" in text
    merged = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in merged["fake"]["results"]] == ["fake_fwd b1", "fake_scan b1"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no PNG: matplotlib is not installed" in text
    else:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "2 ratio rows, 2 hardware-fraction rows" in text


def test_bench_failing_script_is_one_error_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(cli_bench, "gpu_status", lambda: (1, ""))
    folder = _fake_bench_dir(tmp_path, fail=True)
    rc = cli.main(["bench", "--bench-dir", str(folder), "--out", str(tmp_path / "out"), "--no-png"])
    line = assert_one_line_error(rc, capfd.readouterr().err, code=1)
    assert "1 benchmark(s) failed: fake" in line


def test_bench_gpu_without_the_scripts_says_where_they_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "gpu_status", lambda: (1, ""))
    rc = cli.main(["bench", "--bench-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    line = assert_one_line_error(rc, capsys.readouterr().err, code=1)
    assert "ship with the source checkout, not the wheel" in line


def test_bench_unknown_benchmark(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "gpu_status", lambda: (1, ""))
    rc = cli.main(["bench", "--op", "nope", "--out", str(tmp_path)])
    line = assert_one_line_error(rc, capsys.readouterr().err, code=2)
    assert "no benchmark nope" in line and "selective_scan" in line


def test_plot_results_draws_both_panels(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import plot_results
    finally:
        sys.path.remove(str(REPO))
    rows = plot_results.load_rows([REPO / "benchmarks" / "results" / "h200.json"])
    drawn = plot_results.plot(rows, tmp_path / "h200.png")
    assert drawn["ratio_rows"] >= 20 and drawn["fraction_rows"] >= 20
    assert (tmp_path / "h200.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
def test_bench_quick_on_the_gpu(tmp_path):
    proc = run_cli("bench", "--op", "causal_conv1d", "--quick", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "bench.json").read_text())
    rows = merged["causal_conv1d"]["results"]
    assert any(r.get("ratio") for r in rows)


# ---- demo -----------------------------------------------------------------------------------

def test_demo_cpu():
    proc = run_cli("demo", "--cpu")
    assert proc.returncode == 0, proc.stderr
    assert "reference" in proc.stdout.lower() and "match" in proc.stdout


def test_demo_help_passes_through(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--size" in capsys.readouterr().out


# ---- generate -------------------------------------------------------------------------------

class _FakeModel:
    """Stands in for ssmkit.models.MambaLMHeadModel: emits ``script`` tokens, one streamer call each."""

    script = [5, 6, 7, 8, 9, 10, 11, 12]
    calls: list = []
    streams = True

    def __init__(self, config=None, device=None, dtype=None):
        self.config = config or types.SimpleNamespace(vocab_size=1000)
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, name, device=None, dtype=None):
        if "missing" in str(name):
            raise FileNotFoundError(2, "No such checkpoint", str(name))
        m = cls(None, device=device, dtype=dtype)
        cls.calls.append(("from_pretrained", name, device, dtype))
        return m

    def eval(self):
        return self

    def generate(self, input_ids, max_length=None, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                 repetition_penalty=1.0, eos_token_id=None, streamer=None, cg=False,
                 return_dict_in_generate=False, output_scores=False):
        import torch

        self.calls.append(("generate", input_ids.tolist(), dict(max_length=max_length, top_k=top_k, top_p=top_p,
                           min_p=min_p, temperature=temperature, repetition_penalty=repetition_penalty,
                           eos_token_id=eos_token_id, cg=cg)))
        new = []
        for tok in self.script[:max_length - input_ids.shape[1]]:
            t = torch.tensor([tok])
            new.append(tok)
            if streamer is not None and self.streams:
                streamer(t)
            if tok == eos_token_id:
                break
        return torch.cat([input_ids, torch.tensor([new], dtype=torch.long)], dim=1)


@pytest.fixture
def fake_models(monkeypatch):
    pytest.importorskip("torch")
    mod = types.ModuleType("ssmkit.models")

    class MambaConfig:
        def __init__(self, d_model=8, n_layer=1, vocab_size=1000, **kw):
            self.d_model, self.n_layer, self.vocab_size = d_model, n_layer, vocab_size

    class Model(_FakeModel):
        calls = []

    mod.MambaConfig, mod.MambaLMHeadModel = MambaConfig, Model
    monkeypatch.setitem(sys.modules, "ssmkit.models", mod)
    return Model


def _word_tokenizer(path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "mamba", "is", "fast", "</s>", "x7", "x8", "x9", "x10", "x11", "x12"]
    vocab = {w: i for i, w in enumerate(words)}     # ids 5.. are what the fake model emits
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_generate_ids_streams_and_passes_the_options(fake_models, capsys):
    rc = cli.main(["generate", "--model", "some/model", "--ids", "1 2,3", "--max-new-tokens", "4", "--device", "cpu",
                   "--temperature", "0.7", "--top-k", "0", "--top-p", "0.9", "--min-p", "0.05",
                   "--repetition-penalty", "1.2", "--seed", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.strip() == "1 2 3 5 6 7 8"
    assert "4 new tokens" in cap.err
    kind, name, device, dtype = fake_models.calls[0]
    import torch

    assert (kind, name, str(device), dtype) == ("from_pretrained", "some/model", "cpu", torch.float32)
    kind, ids, kw = fake_models.calls[1]
    assert ids == [[1, 2, 3]]
    assert kw == dict(max_length=7, top_k=0, top_p=0.9, min_p=0.05, temperature=0.7, repetition_penalty=1.2,
                      eos_token_id=None, cg=False)


def test_generate_text_with_a_tokenizer_stops_at_eos(fake_models, tmp_path, capsys):
    tok = _word_tokenizer(tmp_path / "tok")
    fake_models.script = [3, 4, 5, 6, 1]                   # "mamba is fast </s> hello"
    rc = cli.main(["generate", "--model", "m/x", "--tokenizer", str(tok), "--prompt", "hello world",
                   "--max-new-tokens", "5", "--device", "cpu", "--dtype", "bfloat16"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.split() == ["hello", "world", "mamba", "is", "fast"]
    _, ids, kw = fake_models.calls[1]
    assert ids == [[1, 2]] and kw["eos_token_id"] == 6
    import torch

    assert fake_models.calls[0][3] == torch.bfloat16


def test_generate_finds_the_tokenizer_beside_the_checkpoint(fake_models, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _word_tokenizer(ckpt)
    fake_models.script = [3, 4]
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "hello", "--max-new-tokens", "2",
                     "--device", "cpu", "--no-echo", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.split() == ["mamba", "is"]
    assert fake_models.calls[0][1] == str(ckpt) and fake_models.calls[1][2]["eos_token_id"] is None


def test_generate_prints_what_a_model_did_not_stream(fake_models, capsys):
    fake_models.streams = False
    assert cli.main(["generate", "--model", "a/b", "--ids", "9", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "9 5 6 7"


def test_generate_random_model_config(fake_models, capsys):
    assert cli.main(["generate", "--model", "random:d_model=16,vocab_size=50", "--ids", "1", "--max-new-tokens", "1",
                     "--device", "cpu", "--no-echo"]) == 0
    assert capsys.readouterr().out.strip() == "5"


@pytest.mark.parametrize("argv,needle,code", [
    (["--model", "./missing/ckpt", "--ids", "1"], "checkpoint not found: ./missing/ckpt", 1),
    (["--model", "hub/missing", "--ids", "1"], "file not found", 1),
    (["--model", "a/b", "--prompt", "hi"], "--prompt needs a tokenizer", 2),
    (["--model", "a/b", "--ids", "1 x"], "--ids takes integers", 2),
    (["--model", "a/b", "--ids", "1", "--tokenizer", "./no/tokenizer.json"], "tokenizer not found", 1),
    (["--model", "a/b", "--ids", "1", "--cg"], "--cg", 2),
    (["--model", "a/b", "--ids", "5000"], "outside the model's vocabulary", 2),
    (["--model", "random:d_model", "--ids", "1"], "KEY=VALUE", 2),
])
def test_generate_errors_are_one_line(fake_models, argv, needle, code, capsys):
    rc = cli.main(["generate", *argv, "--device", "cpu"])
    line = assert_one_line_error(rc, capsys.readouterr().err, code=code)
    assert needle in line


def test_generate_cuda_without_a_gpu(fake_models, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU")
    rc = cli.main(["generate", "--model", "a/b", "--ids", "1", "--device", "cuda"])
    assert "needs a CUDA GPU" in assert_one_line_error(rc, capsys.readouterr().err, code=1)


def test_generate_without_the_models_package(monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "ssmkit.models", None)
    rc = cli.main(["generate", "--model", "a/b", "--ids", "1", "--device", "cpu"])
    assert "ssmkit.models is not available" in assert_one_line_error(rc, capsys.readouterr().err, code=1)


def test_generate_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    rc = cli.main(["generate", "--model", "a/b", "--ids", "1"])
    assert 'needs torch: pip install "ssmkit[torch]"' in assert_one_line_error(rc, capsys.readouterr().err, code=1)


def test_generate_error_in_a_fresh_process_has_no_traceback(tmp_path):
    proc = run_cli("generate", "--model", tmp_path / "missing" / "ckpt", "--ids", "1", "--device", "cpu")
    assert "not found" in assert_one_line_error(proc, proc.stderr, code=1)


def test_generate_with_a_real_random_model(capsys):
    """ssmkit.models' tiny random model end to end on the CPU (skips until ssmkit.models exists)."""
    pytest.importorskip("torch")
    models = pytest.importorskip("ssmkit.models")
    rc = cli.main(["generate", "--model", "random:d_model=32,n_layer=2,vocab_size=64", "--ids", "1 2 3",
                   "--max-new-tokens", "6", "--device", "cpu", "--seed", "0", "--no-echo"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = [int(t) for t in cap.out.split()]
    assert len(got) == 6 and all(0 <= t < 64 for t in got)
    # greedy decoding is deterministic: the same tokens as generate() on the same random model
    import torch

    torch.manual_seed(0)
    model = models.MambaLMHeadModel(models.MambaConfig(d_model=32, n_layer=2, vocab_size=64), device="cpu",
                                    dtype=torch.float32)
    want = model.generate(torch.tensor([[1, 2, 3]]), max_length=9)
    assert got == want[0, 3:].tolist()


@pytest.mark.gpu
def test_generate_with_a_random_model_on_the_gpu(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("ssmkit.models")
    for extra in ([], ["--cg"]):
        rc = cli.main(["generate", "--model", "random:d_model=64,n_layer=2,vocab_size=128", "--ids", "1 2 3",
                       "--max-new-tokens", "8", "--device", "cuda", "--seed", "0", "--no-echo", *extra])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert len(cap.out.split()) == 8

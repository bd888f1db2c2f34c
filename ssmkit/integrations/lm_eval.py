"""lm-eval (EleutherAI's lm-evaluation-harness, 0.4.x) for ssmkit's Mamba language model.

    python -m ssmkit.evals --model_args pretrained=state-spaces/mamba-130m \\
        --tasks lambada_openai,hellaswag --device cuda --batch_size 64

    import lm_eval
    import ssmkit.integrations.lm_eval     # registers the model names "ssmkit" and "ssmkit-mamba"
    lm_eval.simple_evaluate(model="ssmkit", model_args="pretrained=PATH,dtype=float16", tasks=[...])

:class:`SsmkitLM` is an ``lm_eval.api.model.TemplateLM`` (lm-eval's tokenising base class, which
HFLM extends too) around a :class:`ssmkit.models.MambaLMHeadModel`. It does not extend HFLM: HFLM's
constructor needs accelerate and a transformers model config, its scoring runs one padded forward
per request, and its generation needs transformers' ``generate``; this class scores and generates
through the model's own prefill and decode (``InferenceParams``). Model arguments (``--model_args``):

    pretrained      checkpoint folder or hub name (MambaLMHeadModel.from_pretrained), or a model object
    tokenizer       tokenizer.json, a folder, or a hub name (transformers); default: the checkpoint
                    folder's tokenizer, else the hub repo's, else EleutherAI/gpt-neox-20b (the
                    tokenizer of state-spaces' checkpoints, which ship none)
    dtype           auto (float16 on CUDA, as upstream's eval wrapper; float32 on the CPU), float16,
                    bfloat16, float32, float64
    device          cuda, cuda:N or cpu (cuda without a GPU falls back to the CPU with a warning, as
                    lm-eval's hf model does; the CPU runs the float64 reference: exact but slow)
    batch_size      rows per forward, or "auto": start at max_batch_size (64) and halve on CUDA OOM
    max_length      context window in tokens (2048): contexts are left-truncated to it and
                    loglikelihood_rolling splits documents into windows of it, as lm-eval does for
                    every model (Mamba itself has no position limit)
    max_gen_toks    default generation budget (256) when a task gives none
    share_contexts  auto (default), true or false: score requests that share a context from one
                    prefill of that context (see below)
    cg              true: decode generate_until through a CUDA graph (``generate(cg=True)``)
    add_bos_token, prefix_token_id   as lm-eval's hf model

Scoring (``loglikelihood``): a request (context, continuation) needs the log-probabilities of the
continuation's k tokens. Requests are grouped by their (token) context. A group is scored either

* one row per request: the prefill runs context + continuation[:-1] and the LM head only the last
  k positions (``num_last_tokens``), or
* shared: one prefill of the context gives the first continuation token of every request in the
  group from its last logits; the context's states (conv and SSM, per layer) are then copied to
  one row per continuation, which decodes its remaining k - 1 tokens teacher-forced.

Multiple-choice tasks with one-token answers (MMLU-style) always share: one forward per question
instead of one per choice. For longer continuations the shared path trades prefill tokens for
sequential decode steps; ``share_contexts=auto`` takes it when it saves more prefill tokens than
:data:`DECODE_STEP_TOKENS` per decode step. Both ways give the same numbers (up to rounding): each
row's logits are those of its own sequence alone. Rows of a batch are left-padded and the padding
masked out of the conv and scan (``InferenceParams.prompt_mask``), so batching changes nothing
either. Log-probabilities are over the tokenizer's vocabulary: the logits of the padded vocabulary
rows (the model's V is rounded up to a multiple of 8) are dropped before the softmax.

``loglikelihood_rolling`` scores lm-eval's disjoint windows of each document (the first
conditioned on ``prefix_token_id``) the same way and sums them. ``generate_until`` runs
``model.generate`` on ragged batches of prompts sorted by length (the prompt is one prefill, then
cached decode steps), greedy unless a task asks for sampling (``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``), and stops at EOS, at ``max_gen_toks``,
or once every row of the batch has produced one of the task's stop strings; the text is cut at
the first stop string, as lm-eval does.

Not covered: data parallelism over several processes (``accelerate launch``), chat templates
beyond the tokenizer's own ``apply_chat_template``, multimodal tasks.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

try:
    import lm_eval.models  # noqa: F401  lm-eval's own model names (get_model imports them only into an empty registry)
    from lm_eval import utils as _lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # tests/test_evals.py::test_missing_lm_eval_names_the_extra
    raise ImportError(f'ssmkit.integrations.lm_eval needs lm-eval (0.4.10 or later 0.4.x): pip install "ssmkit[eval]"'
                      f" ({exc})") from exc

import torch
from tqdm import tqdm

from ssmkit.models import InferenceParams, MambaLMHeadModel
from ssmkit.models.generation import _left_padded

log = logging.getLogger("ssmkit.lm_eval")

# Context window for truncation and rolling windows: the value of upstream's eval wrapper
# (lm-eval's "mamba_ssm" model), so results compare with the published ones.
DEFAULT_MAX_LENGTH = 2048
# Generation budget when a task gives none: lm-eval's hf model's default.
DEFAULT_MAX_GEN_TOKS = 256
# The tokenizer of state-spaces' Mamba checkpoints (they ship none): upstream's eval default.
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
# Batch size "auto" starts here and halves on CUDA out-of-memory.
DEFAULT_MAX_BATCH_SIZE = 64
# A decode step costs about as much as this many prefill tokens; share_contexts=auto shares a
# context when (decode steps) * DECODE_STEP_TOKENS < (prefill tokens saved). An estimate, not a
# measurement yet: an eager decode step of mamba-130m is ~24 layers x ~10 launches at ~10-30 us
# each from Python (DESIGN.md's per-call costs) = 2.5-7 ms, a prefill token ~2 x 130e6 FLOP at
# ~1e14 FLOP/s = ~3 us, so ~1000 tokens; mamba-2.8b: ~15 ms / ~60 us = ~250. The choice never
# changes results, only speed; pass decode_step_tokens=N to override.
DECODE_STEP_TOKENS = 1000
# EOS of a tokenizer that names none (a bare tokenizer.json): the first of these in its vocabulary.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
# Generation kwargs of lm-eval tasks that generate_until honours (the rest raise ValueError).
_GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
               "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on the CPU (the float64 reference "
                    "path: exact but slow)", device)
        return torch.device("cpu")
    return dev


def _resolve_dtype(dtype, device: torch.device):
    """The torch dtype the weights are cast to."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"ssmkit lm-eval model: dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


def _parse_bool(name, value, allowed=()):
    if isinstance(value, bool) or value in allowed:
        return value
    s = str(value).lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    if s in allowed:
        return s
    raise ValueError(f"ssmkit lm-eval model: {name} must be true or false{' or ' if allowed else ''}"
                     f"{' or '.join(allowed)}, got {value!r}")


def _has_tokenizer_files(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model", "vocab.json"))


def load_tokenizer(tokenizer, pretrained=None):
    """A transformers tokenizer from ``tokenizer`` (an object with encode/decode, a tokenizer.json
    file, a folder, or a hub name); None: ``pretrained``'s folder or hub repo when it holds one,
    else :data:`DEFAULT_TOKENIZER`."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    try:
        import transformers
    except ImportError as exc:
        raise ImportError('the ssmkit lm-eval model needs transformers for its tokenizer: pip install "ssmkit[eval]"'
                          f" ({exc})") from exc
    if tokenizer is None:
        if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained):
            tokenizer = pretrained if _has_tokenizer_files(pretrained) else DEFAULT_TOKENIZER
        elif isinstance(pretrained, str):
            try:                       # transformers-layout repos ("...-hf") ship their tokenizer
                return transformers.AutoTokenizer.from_pretrained(pretrained)
            except (OSError, ValueError) as exc:
                log.info("no tokenizer in %s (%s): using %s", pretrained, exc, DEFAULT_TOKENIZER)
                tokenizer = DEFAULT_TOKENIZER
        else:
            raise ValueError("ssmkit lm-eval model: a model object needs tokenizer=...")
    path = os.path.expanduser(str(tokenizer))
    if os.path.isfile(path):
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.eos_token is None:              # a bare tokenizer.json names no EOS
        vocab = tok.get_vocab()
        eos = next((t for t in EOS_TOKENS if t in vocab), None)
        if eos is not None:
            tok.eos_token = eos
    return tok


@dataclass
class _Job:
    """One prefill row: ``prefix`` tokens, and the requests scored from it: (request index,
    continuation). shared=False: one request, prefix = context + continuation[:-1]; shared=True:
    prefix = the group's context, continuations decoded from its states."""

    prefix: list
    items: list = field(default_factory=list)
    shared: bool = False

    @property
    def n_last(self) -> int:
        return 1 if self.shared else len(self.items[0][1])


class _StopStrings:
    """A streamer for ``generate``: records each row's generated tokens (up to its first EOS) and
    raises :class:`_AllStopped` once every row has reached EOS or shows one of ``until`` in its
    decoded text, so the batch stops decoding there instead of at max_gen_toks."""

    def __init__(self, lm, n_rows: int, until: list, limit: int):
        self.lm, self.until, self.limit = lm, [s for s in until if s], limit
        self.tokens = [[] for _ in range(n_rows)]
        self.done = [False] * n_rows

    def __call__(self, tok):
        for r, t in enumerate(tok.tolist()):
            if self.done[r]:
                continue
            self.tokens[r].append(int(t))
            if (t == self.lm.eot_token_id or len(self.tokens[r]) >= self.limit
                    or (self.until and any(s in self.lm.tok_decode(self.tokens[r]) for s in self.until))):
                self.done[r] = True
        if all(self.done):
            raise _AllStopped


class _AllStopped(Exception):
    pass


@register_model("ssmkit", "ssmkit-mamba")
class SsmkitLM(TemplateLM):
    """lm-eval model for :class:`ssmkit.models.MambaLMHeadModel` (module docstring: arguments,
    how requests are scored and generated)."""

    backend = "causal"

    def __init__(self, pretrained="state-spaces/mamba-130m", tokenizer=None, dtype="auto", device="cuda",
                 batch_size=1, max_batch_size=None, max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
                 share_contexts="auto", decode_step_tokens=DECODE_STEP_TOKENS, cg=False, add_bos_token=None,
                 prefix_token_id=None, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"ssmkit lm-eval model: unknown model arguments {sorted(kwargs)} (known: pretrained, "
                             "tokenizer, dtype, device, batch_size, max_batch_size, max_length, max_gen_toks, "
                             "share_contexts, decode_step_tokens, cg, add_bos_token, prefix_token_id)")
        bs = str(batch_size).lower()
        self._auto_batch = bs.startswith("auto")
        self._batch = int(max_batch_size or DEFAULT_MAX_BATCH_SIZE) if self._auto_batch else int(batch_size)
        if self._batch < 1:
            raise ValueError(f"ssmkit lm-eval model: batch_size must be >= 1 or auto, got {batch_size!r}")
        self.batch_sizes = {}                      # lm-eval reports these (results["config"]["batch_sizes"])
        self._max_length = int(max_length) if max_length else DEFAULT_MAX_LENGTH
        self._max_gen_toks = int(max_gen_toks)
        self.share_contexts = _parse_bool("share_contexts", share_contexts, ("auto",))
        self.decode_step_tokens = int(decode_step_tokens)
        cg = _parse_bool("cg", cg)
        self.add_bos_token = None if add_bos_token is None else _parse_bool("add_bos_token", add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)

        if isinstance(pretrained, torch.nn.Module):
            self._model = pretrained
            self._device = next(pretrained.parameters()).device
            self.pretrained = type(pretrained).__name__
        else:
            self._device = _resolve_device(device)
            self._model = MambaLMHeadModel.from_pretrained(str(pretrained), device=self._device,
                                                           dtype=_resolve_dtype(dtype, self._device))
            self.pretrained = str(pretrained)
        self._model.eval()
        self.cg = cg and self._device.type == "cuda"
        self.tokenizer = load_tokenizer(tokenizer, pretrained if not isinstance(pretrained, torch.nn.Module) else None)
        model_vocab = self._model.lm_head.weight.shape[0]
        self.vocab_size = min(len(self.tokenizer), model_vocab)
        if len(self.tokenizer) > model_vocab:
            log.warning("the tokenizer has %d tokens, the model %d: ids from %d on cannot be scored",
                        len(self.tokenizer), model_vocab, model_vocab)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config=None):
        return cls.create_from_arg_obj(_lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config=None):
        # --model_args win over --device / --batch_size (lm-eval passes its default device,
        # cuda:0, even when none is given, and would raise TypeError for a device in both).
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return "auto" if self._auto_batch else self._batch

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        for t in (self.custom_prefix_token_id, getattr(self.tokenizer, "bos_token_id", None), self.eot_token_id):
            if t is not None:
                return t
        raise ValueError("ssmkit lm-eval model: the tokenizer has neither a BOS nor an EOS token to condition an "
                         "empty context on; pass prefix_token_id=ID")

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **kw))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        p = next(self._model.parameters())
        return {"model_num_parameters": sum(q.numel() for q in self._model.parameters()),
                "model_dtype": str(p.dtype), "model_revision": "", "model_sha": ""}

    # ---- batching --------------------------------------------------------------------------------

    def _chunks(self, items: list, run) -> None:
        """``run(chunk)`` over ``items`` in chunks of the batch size; with batch_size=auto a CUDA
        out-of-memory error halves the batch size and retries the chunk."""
        i = 0
        while i < len(items):
            n = self._batch
            chunk = items[i:i + n]
            try:
                run(chunk)
            except torch.cuda.OutOfMemoryError:
                if not self._auto_batch or n == 1:
                    raise
                self._batch = n // 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory at batch size %d: retrying with %d", n, self._batch)
                continue
            if self._auto_batch:
                self.batch_sizes[0] = self._batch
            i += len(chunk)

    @torch.no_grad()
    def _prefill(self, rows: list, n_last: int):
        """Left-padded prefill of token lists ``rows``: (logits (B, n_last, V) of each row's last
        n_last positions, InferenceParams holding every row's states after its last token)."""
        ids, mask, _ = _left_padded(rows, None, pad_token_id=0, device=self._device)
        params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
        params.prompt_mask = mask
        logits = self._model(ids, inference_params=params, num_last_tokens=n_last).logits
        params.prompt_mask = None
        params.seqlen_offset = ids.shape[1]
        return logits, params

    def _logprobs(self, logits):
        """log-softmax over the tokenizer's vocabulary, at least in float32."""
        x = logits[..., :self.vocab_size]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return torch.log_softmax(x, dim=-1)

    # ---- loglikelihood -----------------------------------------------------------------------------

    def _share(self, ctx_len: int, conts: list) -> bool:
        if len(conts) < 2 or self.share_contexts is False:
            return False
        if self.share_contexts is True:
            return True
        steps = max(len(c) for c in conts) - 1
        saved = sum(ctx_len + len(c) - 1 for c in conts) - ctx_len
        return steps * self.decode_step_tokens < saved

    def _score(self, pairs: list, pbar=None) -> list:
        """(log-probability, is_greedy) of each (context tokens, continuation tokens) pair."""
        L = self.max_length
        groups = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("ssmkit lm-eval model: empty continuation")
            if len(cont) > L:
                raise ValueError(f"ssmkit lm-eval model: continuation of {len(cont)} tokens > max_length {L}")
            if max(cont) >= self.vocab_size:
                raise ValueError(f"ssmkit lm-eval model: token id {max(cont)} >= the vocabulary ({self.vocab_size})")
            whole = (list(ctx) + list(cont))[-(L + 1):]      # as lm-eval: the model sees at most L tokens
            groups.setdefault(tuple(whole[:len(whole) - len(cont)]), []).append((i, list(cont)))
        jobs = []
        for ctx, items in groups.items():
            if self._share(len(ctx), [c for _, c in items]):
                jobs.append(_Job(list(ctx), items, shared=True))
            else:
                jobs.extend(_Job(list(ctx) + c[:-1], [(i, c)]) for i, c in items)
        jobs.sort(key=lambda j: -len(j.prefix))
        out = [None] * len(pairs)

        def run(chunk):
            logits, params = self._prefill([j.prefix for j in chunk], max(j.n_last for j in chunk))
            scored, decode = [], []
            for r, job in enumerate(chunk):
                for i, cont in job.items:
                    k = 1 if job.shared else len(cont)
                    lp = self._logprobs(logits[r, logits.shape[1] - k:])         # (k, V)
                    t = torch.tensor(cont[:k], device=lp.device)
                    scored.append((i, lp.gather(-1, t[:, None]).sum().double(), (lp.argmax(-1) == t).all()))
                    if job.shared and len(cont) > 1:
                        decode.append((r, i, cont))
            del logits
            for i, lp, greedy in zip([i for i, _, _ in scored], torch.stack([x[1] for x in scored]).tolist(),
                                     torch.stack([x[2] for x in scored]).tolist()):
                out[i] = (lp, greedy)
            for s in range(0, len(decode), self._batch):
                self._decode_continuations(params, decode[s:s + self._batch], out)
            if pbar is not None:
                pbar.update(sum(len(j.items) for j in chunk))

        self._chunks(jobs, run)
        return out

    @torch.no_grad()
    def _decode_continuations(self, params, rows: list, out: list) -> None:
        """Adds to ``out[i]`` the scores of cont[1:] for each (prefill row r, request i, cont),
        decoding from a copy of row r's states (teacher-forced, one step per token)."""
        dev = self._device
        idx = torch.tensor([r for r, _, _ in rows], device=dev)
        p = InferenceParams(max_seqlen=params.max_seqlen, max_batch_size=len(rows))
        p.key_value_memory_dict = {k: tuple(s.index_select(0, idx) for s in v)
                                   for k, v in params.key_value_memory_dict.items()}
        p.seqlen_offset = params.seqlen_offset
        K = max(len(c) for _, _, c in rows)
        toks = torch.tensor([c + [0] * (K - len(c)) for _, _, c in rows], device=dev)       # (n, K)
        valid = torch.arange(K, device=dev)[None, :] < torch.tensor([len(c) for _, _, c in rows], device=dev)[:, None]
        total = torch.zeros(len(rows), dtype=torch.float64, device=dev)
        greedy = torch.ones(len(rows), dtype=torch.bool, device=dev)
        for step in range(K - 1):
            logits = self._model(toks[:, step:step + 1], inference_params=p, num_last_tokens=1).logits[:, -1]
            lp = self._logprobs(logits)
            p.seqlen_offset += 1
            t, v = toks[:, step + 1], valid[:, step + 1]
            total += torch.where(v, lp.gather(-1, t[:, None]).squeeze(-1).double(), 0.0)
            greedy &= ~v | (lp.argmax(-1) == t)
        for (_, i, _), lp, g in zip(rows, total.tolist(), greedy.tolist()):
            out[i] = (out[i][0] + lp, out[i][1] and g)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="ssmkit loglikelihood")
        res = self._score([(ctx, cont) for _, ctx, cont in requests], pbar)
        pbar.close()
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args[:1]
            for ctx, cont in map(_lm_utils.make_disjoint_window, _lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(r)
        pbar = tqdm(total=len(windows), disable=disable_tqdm or self.rank != 0, desc="ssmkit loglikelihood_rolling")
        scores = self._score(windows, pbar)
        pbar.close()
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generate_until ----------------------------------------------------------------------------

    def _gen_settings(self, gen_kwargs: dict):
        """(until, max_gen_toks, sampling kwargs of generate) from a task's generation kwargs."""
        kw = copy.deepcopy(dict(gen_kwargs or {}))
        unknown = sorted(set(kw) - _GEN_KWARGS)
        if unknown:
            raise ValueError(f"ssmkit lm-eval model: unsupported generation kwargs {unknown} "
                             f"(supported: {sorted(_GEN_KWARGS)})")
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = None if self.eot_token_id is None else self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)
        n = next((kw.pop(a) for a in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                  if kw.get(a) is not None), self.max_gen_toks)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        do_sample = kw.get("do_sample")
        do_sample = temperature > 0.0 if do_sample is None else _parse_bool("do_sample", do_sample)
        sampling = {"repetition_penalty": float(kw.get("repetition_penalty", 1.0))}
        if do_sample:
            sampling.update(top_k=int(kw.get("top_k") or 0), top_p=float(kw.get("top_p") or 0.0),
                            min_p=float(kw.get("min_p") or 0.0), temperature=temperature or 1.0)
        else:
            sampling["top_k"] = 1
        return until, int(n), sampling

    @torch.no_grad()
    def _generate(self, prompts: list, until: list, max_new: int, sampling: dict) -> list:
        """Generated token lists (EOS included when reached) for token-list prompts."""
        stop = _StopStrings(self, len(prompts), until, max_new)
        try:
            seqs = self._model.generate(prompts, max_new_tokens=max_new, eos_token_id=self.eot_token_id,
                                        vocab_size=self.vocab_size, streamer=stop, cg=self.cg, **sampling)
        except _AllStopped:
            return stop.tokens
        return [s[len(p):].tolist() for s, p in zip(seqs, prompts)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        args = [(req.args[0], req.args[1]) for req in requests]
        groups = {}
        for i, (_, kw) in enumerate(args):
            groups.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        res = [None] * len(args)
        pbar = tqdm(total=len(args), disable=disable_tqdm or self.rank != 0, desc="ssmkit generate_until")
        for idxs in groups.values():
            until, max_new, sampling = self._gen_settings(args[idxs[0]][1])
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"ssmkit lm-eval model: max_gen_toks {max_new} leaves no room for the prompt in "
                                 f"max_length {self.max_length}")
            prompts = {i: self.tok_encode(args[i][0], left_truncate_len=room) or [self.prefix_token_id]
                       for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))

            def run(chunk, until=until, max_new=max_new, sampling=sampling, prompts=prompts):
                for i, toks in zip(chunk, self._generate([prompts[i] for i in chunk], until, max_new, sampling)):
                    text = self.tok_decode(toks)
                    for s in until:
                        if s:
                            text = text.split(s)[0]
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                pbar.update(len(chunk))

            self._chunks(order, run)
        pbar.close()
        return res

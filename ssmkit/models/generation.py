"""Cached generation for the Mamba language model: InferenceParams, sampling, the decode loop and
the CUDA-graph decode step (upstream's ``mamba_ssm.utils.generation``, plus ragged batches).

The prompt runs once through the parallel path, which leaves every layer's conv and SSM state in
``InferenceParams.key_value_memory_dict``; each later token is one :meth:`Mamba.step` per layer.
With ``cg=True`` the whole decode step (embedding, all layers, norm, LM head) is one CUDA graph per
batch size, replayed per token.

Ragged batches (ssmkit extension): prompts of different lengths are left-padded; the padding is
masked out of the conv input and the scan input, so each row's states equal those of its prompt
alone. All rows then decode together; a row stops at its own EOS or length limit, and once rows
have stopped the eager decode runs only the live rows, addressing their states through the decode
kernels' state-pool indices (continuous batching).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class InferenceParams:
    """Decode state of one generation: the per-layer (conv_state, ssm_state) in
    ``key_value_memory_dict`` and the number of tokens already consumed (``seqlen_offset``).

    ssmkit extensions: ``prompt_mask`` (B, L) bool marks the real tokens of a left-padded ragged
    prompt during prefill; ``batch_indices`` (b,) int32 maps the decode batch's rows to state rows
    (continuous batching; -1 skips a row)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None
    prompt_mask: Optional[Tensor] = None
    batch_indices: Optional[Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        self.prompt_mask = None
        self.batch_indices = None
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


@dataclass
class GenerationOutput:
    """``sequences``: (B, L_prompt + T) LongTensor (rows that stopped early are padded with
    ``pad_token_id``), or for a ragged batch a list of 1-D tensors, each its prompt and its own
    generated tokens. ``scores``: per generated step, the (B, V) logits (with ``output_scores``).
    ``timings``: prefill and decode milliseconds and the number of decode steps."""

    sequences: object
    scores: Optional[tuple] = None
    timings: Optional[dict] = None


# Upstream's names for the two output kinds (greedy, sampled).
GreedySearchDecoderOnlyOutput = SampleDecoderOnlyOutput = GenerationOutput


# ---- sampling ---------------------------------------------------------------------------------

def modify_logit_for_repetition_penalty(logits, prev_output_tokens, repetition_penalty=1.0):
    """CTRL's penalty on tokens already seen: logits (B, V), prev_output_tokens (B, T) or a (B, V)
    bool mask of seen tokens. Positive logits are divided by the penalty, negative multiplied."""
    if repetition_penalty == 1.0:
        return logits
    if prev_output_tokens.dtype == torch.bool:
        seen = prev_output_tokens
        pen = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        return torch.where(seen, pen, logits)
    score = torch.gather(logits, 1, prev_output_tokens)
    score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return logits.scatter(1, prev_output_tokens, score)


def sample(logits, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, generator=None):
    """One token per row from logits (B, V): greedy when ``top_k == 1`` (upstream's default),
    else sampled from softmax(logits / temperature) restricted to the ``top_k`` largest
    (0: all), the smallest set of probability mass >= ``top_p`` (0 or 1: all) and the tokens
    with probability >= ``min_p`` times the row's largest. Returns (B,) int64."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in [0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"sample: min_p must be in [0, 1], got {min_p}")
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---- the CUDA-graph decode step ----------------------------------------------------------------

class DecodeGraph:
    """One captured decode step (all layers) for a fixed batch size: static token input, static
    states (``params.key_value_memory_dict``) and static logits (B, V)."""

    def __init__(self, model, batch_size: int, max_seqlen: int, pool=None, n_warmups: int = 2):
        device = next(model.parameters()).device
        self.batch_size = batch_size
        self.params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)
        self.params.key_value_memory_dict = model.allocate_inference_cache(batch_size, max_seqlen)
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.params.seqlen_offset = 1
        # Warm up on a side stream (compiles every kernel variant and fills ssmkit's launch
        # caches), then capture. The states get garbage here; a prefill overwrites all of them.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(n_warmups):
                model(self.input_ids, inference_params=self.params, num_last_tokens=1)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(self.input_ids, inference_params=self.params, num_last_tokens=1).logits[:, -1]
        self.params.seqlen_offset = 0

    def run(self, tokens: Tensor) -> Tensor:
        self.input_ids.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits


def _graph_for(model, batch_size: int, max_seqlen: int) -> DecodeGraph:
    cache = model.__dict__.setdefault("_decoding_cache", {})
    p = next(model.parameters())
    key = (batch_size, p.dtype, p.device)
    g = cache.get(key)
    if g is None:
        if "pool" not in cache:
            cache["pool"] = torch.cuda.graph_pool_handle()
        g = cache[key] = DecodeGraph(model, batch_size, max_seqlen, pool=cache["pool"])
    return g


# ---- prompts ----------------------------------------------------------------------------------

def _left_padded(input_ids, attention_mask, pad_token_id, device):
    """(ids (B, L) left-padded, mask (B, L) bool or None when no row is padded, prompt lengths (B,))."""
    if isinstance(input_ids, (list, tuple)):
        rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in input_ids]
        if not rows:
            raise ValueError("generate: input_ids is an empty list")
        lens = torch.tensor([len(r) for r in rows])
        if int(lens.min()) < 1:
            raise ValueError("generate: every prompt needs at least one token")
        L = int(lens.max())
        ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = r
            mask[i, L - len(r):] = True
    else:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("generate: input_ids must be a (B, L) tensor or a list of token sequences, got "
                             f"{type(input_ids).__name__} of shape {getattr(input_ids, 'shape', None)}")
        ids = input_ids.long()
        if attention_mask is None:
            lens = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
            return ids.to(device), None, lens
        if tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(f"generate: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(ids.shape)}")
        m = attention_mask.bool().cpu()
        lens = m.sum(1)
        if int(lens.min()) < 1:
            raise ValueError("generate: every prompt needs at least one token (attention_mask row of zeros)")
        L = ids.shape[1]
        # any padding side -> left padding: stable sort puts the pads first, tokens in order
        order = torch.argsort(m.int(), dim=1, stable=True)
        ids = torch.gather(ids.cpu(), 1, order)
        mask = torch.arange(L)[None, :] >= (L - lens)[:, None]
        ids = torch.where(mask, ids, torch.full_like(ids, pad_token_id))
    if bool(mask.all()):
        mask = None
    return ids.to(device), (None if mask is None else mask.to(device)), lens


# ---- the decode loop ----------------------------------------------------------------------------

@torch.no_grad()
def decode(input_ids, model, max_length=None, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
           repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, attention_mask=None, max_new_tokens=None,
           teacher_outputs=None, vocab_size=None, cg=False, enable_timing=False, output_scores=False,
           streamer=None, generator=None):
    """Generate from ``model`` (a :class:`MambaLMHeadModel`); see :meth:`GenerationMixin.generate`."""
    params0 = next(model.parameters())
    device = params0.device
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    ragged_input = isinstance(input_ids, (list, tuple)) or attention_mask is not None
    ids, mask, prompt_lens = _left_padded(input_ids, attention_mask, pad_token_id, device)
    batch, Lp = ids.shape
    if max_length is None and max_new_tokens is None:
        raise ValueError("generate: give max_length (total tokens per row, prompt included) or max_new_tokens")
    limit = torch.full((batch,), 1 << 62, dtype=torch.long)
    if max_length is not None:
        limit = torch.minimum(limit, int(max_length) - prompt_lens)
    if max_new_tokens is not None:
        limit = torch.minimum(limit, torch.full_like(limit, int(max_new_tokens)))
    limit = limit.clamp(min=0)
    n_max = int(limit.max())
    if cg and device.type != "cuda":
        raise ValueError(f"generate: cg=True captures a CUDA graph and needs a CUDA model, the model is on {device}")

    timings = {}
    if enable_timing and device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    # -- prefill: one parallel pass fills every layer's states ------------------------------------
    if cg:
        for m in model.modules():          # refresh cached decode weights before the graph reads them
            if hasattr(m, "_decode_weights"):
                m._decode_weights()
        graph = _graph_for(model, batch, Lp + n_max)
        params = graph.params
        params.reset(Lp + n_max, batch)
    else:
        graph = None
        params = InferenceParams(max_seqlen=Lp + n_max, max_batch_size=batch)
    params.prompt_mask = mask
    logits = model(ids, inference_params=params, num_last_tokens=1).logits[:, -1]
    params.prompt_mask = None
    params.seqlen_offset = Lp
    if enable_timing:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()

    if streamer is not None and hasattr(streamer, "put") and mask is None:
        streamer.put(ids.cpu())            # transformers' streamers take the prompt first
    seen = None
    if repetition_penalty != 1.0:
        V = logits.shape[-1]
        seen = torch.zeros(batch, V, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    limit_d = limit.to(device)
    finished = limit_d == 0
    scores, generated = [], []
    live = None                            # rows the eager decode still runs (None: all)
    step = 0
    while step < n_max:
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        if output_scores:
            scores.append(logits.clone())
        proc = logits if seen is None else modify_logit_for_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample(proc, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, generator=generator)
        if teacher_outputs is not None and Lp + step < teacher_outputs.shape[1]:
            tok = teacher_outputs[:, Lp + step].to(device)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        generated.append(tok)
        if seen is not None:
            seen.scatter_(1, tok[:, None], (~finished)[:, None])
        if streamer is not None:
            (streamer.put if hasattr(streamer, "put") else streamer)(tok.cpu())
        step += 1
        stop = step >= limit_d
        if eos_token_id is not None:
            stop = stop | (tok == eos_token_id)
        finished = finished | stop
        if step >= n_max or bool(finished.all()):
            break
        # -- one decode step -------------------------------------------------------------------
        if graph is not None:
            logits = graph.run(tok)
        else:
            if batch > 1 and bool(finished.any()):
                live = (~finished).nonzero().squeeze(1)
                params.batch_indices = live.to(torch.int32)
                part = model(tok[live][:, None], inference_params=params, num_last_tokens=1).logits[:, -1]
                logits = torch.zeros(batch, part.shape[-1], dtype=part.dtype, device=device)
                logits[live] = part
                params.batch_indices = None
            else:
                logits = model(tok[:, None], inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += 1
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    if enable_timing:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["decode_ms"] = (time.perf_counter() - t1) * 1e3
        timings["steps"] = len(generated)

    gen = torch.stack(generated, dim=1) if generated else torch.empty(batch, 0, dtype=torch.long, device=device)
    if ragged_input:
        counts = (torch.arange(gen.shape[1], device=device)[None, :] < limit_d[:, None])
        if eos_token_id is not None and gen.shape[1]:
            # keep tokens up to and including the row's first EOS
            is_eos = gen == eos_token_id
            after = (is_eos.int().cumsum(1) - is_eos.int()) > 0
            counts = counts & ~after
        n_new = counts.sum(1).cpu()
        seqs = [torch.cat([ids[i, Lp - int(prompt_lens[i]):], gen[i, :int(n_new[i])]]) for i in range(batch)]
    else:
        seqs = torch.cat([ids, gen], dim=1)
    return GenerationOutput(sequences=seqs, scores=tuple(scores) if output_scores else None,
                            timings=timings if enable_timing else None)


class GenerationMixin:
    """``generate`` for :class:`MambaLMHeadModel` (upstream's GenerationMixin signature)."""

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        raise NotImplementedError

    def generate(self, input_ids, max_length=None, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                 return_dict_in_generate=False, output_scores=False, **kwargs):
        """Generate tokens after ``input_ids``.

        input_ids: (B, L) LongTensor; or a list of token sequences of different lengths (a ragged
            batch), or (B, L) with ``attention_mask`` (B, L) (1 = token, 0 = padding, either side).
        max_length: tokens per row in total, prompt included (upstream); ``max_new_tokens``
            (keyword) caps the generated ones instead or as well.
        top_k, top_p, min_p, temperature: sampling (``top_k=1``: greedy); ``repetition_penalty``.
        eos_token_id: a row stops after emitting it (each row on its own); later positions of a
            stopped row hold ``pad_token_id`` (default: eos_token_id, else 0).
        streamer: an object with ``put(tokens)`` / ``end()`` (transformers' protocol; ``put``
            first gets the prompt) or a callable; each step passes the new (B,) tokens on the CPU.
        cg: decode through one CUDA graph per batch size (captured on first use, kept on the model).
        Also ``generator`` (a torch.Generator for sampling), ``teacher_outputs``, ``vocab_size``
        (logits beyond it are dropped), ``enable_timing``.

        Returns the sequences ((B, L + T) LongTensor; a list of 1-D tensors for a ragged batch),
        or with ``return_dict_in_generate`` a :class:`GenerationOutput` (sequences, scores with
        ``output_scores``, timings with ``enable_timing``).
        """
        out = decode(input_ids, self, max_length, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                     output_scores=output_scores, **kwargs)
        return out if return_dict_in_generate else out.sequences

    def clear_decoding_cache(self):
        """Drop the captured decode graphs and their state buffers."""
        self.__dict__.pop("_decoding_cache", None)

"""MixerModel and MambaLMHeadModel: the Mamba language model (upstream's
``mamba_ssm.models.mixer_seq_simple``), with checkpoint loading and cached generation.

input_ids (B, L) -> embedding (B, L, d_model) -> n_layer blocks -> norm_f -> lm_head (tied to the
embedding by default) -> logits (B, L, V), V = vocab_size padded to pad_vocab_size_multiple.
"""
from __future__ import annotations

import math
from collections import namedtuple
from functools import partial

import torch
import torch.nn as nn

import ssmkit.torch as sst

from .block import _norm_eps, create_block
from .config import MambaConfig
from .generation import GenerationMixin
from .mamba import Mamba

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True, n_residuals_per_layer=1):
    """Upstream's initialisation: zero Linear biases (but dt_proj's), N(0, 0.02) embeddings, and the
    residual branches' output projections scaled by 1/sqrt(n_residuals_per_layer * n_layer)
    (GPT-2's prenorm rescaling)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    def __init__(self, d_model, n_layer, d_intermediate, vocab_size, ssm_cfg=None, attn_layer_idx=None,
                 attn_cfg=None, norm_epsilon=1e-5, rms_norm=False, initializer_cfg=None, fused_add_norm=False,
                 residual_in_fp32=False, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.embedding = nn.Embedding(vocab_size, d_model, **factory)
        self.layers = nn.ModuleList([
            create_block(d_model, d_intermediate=d_intermediate, ssm_cfg=ssm_cfg, attn_layer_idx=attn_layer_idx,
                         attn_cfg=attn_cfg, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                         residual_in_fp32=residual_in_fp32, fused_add_norm=fused_add_norm, layer_idx=i, **factory)
            for i in range(n_layer)])
        self.norm_f = (sst.RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **factory)
        self.apply(partial(_init_weights, n_layer=n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=1 if d_intermediate == 0 else 2))

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        """input_ids (B, L) -> hidden states (B, L, d_model) after norm_f."""
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        norm = self.norm_f
        if not self.fused_add_norm:
            residual = hidden_states + residual if residual is not None else hidden_states
            return norm(residual.to(dtype=norm.weight.dtype))
        return sst.layer_norm_fn(hidden_states, norm.weight, norm.bias, residual=residual, prenorm=False,
                                 residual_in_fp32=self.residual_in_fp32, eps=_norm_eps(norm),
                                 is_rms_norm=isinstance(norm, sst.RMSNorm))


class MambaLMHeadModel(nn.Module, GenerationMixin):
    """The Mamba language model. ``MambaLMHeadModel(config, device=, dtype=)`` builds a randomly
    initialised model; :meth:`from_pretrained` loads a checkpoint (upstream's layout, the
    transformers layout, or a hub name); :meth:`generate` decodes with cached states.
    ``context_parallel_group`` (or :meth:`set_context_parallel_group`): the sequence split over the
    ranks of a ``torch.distributed`` group, see :mod:`ssmkit.distributed`."""

    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None,
                 context_parallel_group=None):
        super().__init__()
        self.config = config
        if config.attn_layer_idx:
            raise NotImplementedError("ssmkit's models have no attention layers (config.attn_layer_idx must be empty)")
        factory = {"device": device, "dtype": dtype}
        self.backbone = MixerModel(config.d_model, config.n_layer, config.d_intermediate, config.padded_vocab_size,
                                   ssm_cfg=config.ssm_cfg, attn_layer_idx=config.attn_layer_idx,
                                   attn_cfg=config.attn_cfg, norm_epsilon=config.norm_epsilon,
                                   rms_norm=config.rms_norm, initializer_cfg=initializer_cfg,
                                   fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32,
                                   **factory)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()
        self.set_context_parallel_group(context_parallel_group)

    def set_context_parallel_group(self, group):
        """Context parallelism: every mixer runs ``ssmkit.distributed.mamba_inner_fn`` over
        ``group`` (None: off). Each rank then passes its contiguous slice of the sequence
        (input_ids (B, L_r), rank order = sequence order; ``ssmkit.distributed.shard``) and gets
        its slice of the logits; the parameters' gradients are this rank's share (all-reduce them,
        as data parallelism does, for the single-process gradient). Not for ``generate``."""
        for m in self.modules():
            if isinstance(m, Mamba):
                m.context_parallel_group = group

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        """input_ids (B, L) -> CausalLMOutput(logits (B, L or num_last_tokens, V)).
        ``position_ids`` is accepted for upstream compatibility and unused (Mamba has no positions)."""
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden_states))

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs):
        """A model from a local directory (upstream's layout: config.json + pytorch_model.bin or
        model.safetensors; or transformers' MambaForCausalLM layout, mapped on load) or a hub name
        (needs ``huggingface_hub`` and the network; ``pip install "ssmkit[hub]"``).
        ``dtype`` casts the floating-point weights; ``device`` places them."""
        from .checkpoints import load_pretrained

        config, state_dict = load_pretrained(pretrained_model_name, device=device, dtype=dtype)
        model = cls(config, device=device, dtype=dtype, **kwargs)
        model.load_state_dict(state_dict, strict=True)
        return model

    def save_pretrained(self, save_directory, layout: str = "mamba_ssm", safe_serialization: bool = False):
        """Writes config.json and the weights. ``layout``: "mamba_ssm" (upstream's names,
        pytorch_model.bin, or model.safetensors with ``safe_serialization``) or "transformers"
        (MambaForCausalLM's config names and keys, model.safetensors)."""
        from .checkpoints import save_pretrained

        save_pretrained(self, save_directory, layout=layout, safe_serialization=safe_serialization)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A checkpoint saved with tied weights may hold only the embedding (safetensors drops
        # shared tensors): tie it back rather than reporting lm_head.weight as missing.
        if self.config.tie_embeddings and "lm_head.weight" not in state_dict:
            state_dict = dict(state_dict)
            emb = state_dict.get("backbone.embedding.weight")
            if emb is not None:
                state_dict["lm_head.weight"] = emb
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

"""Mamba: the Mamba-1 mixer (``mamba_ssm.modules.mamba_simple.Mamba``) on ssmkit's kernels.

Shapes: hidden_states (B, L, d_model); D = d_inner = expand * d_model channels, N = d_state,
R = dt_rank, W = d_conv. Parameters, names, shapes and initialisation are upstream's, so an
upstream ``state_dict`` loads unchanged:

    in_proj   Linear(d_model, 2D, bias=bias)         conv1d   Conv1d(D, D, W, groups=D) weight (D, 1, W)
    x_proj    Linear(D, R + 2N, bias=False)          dt_proj  Linear(R, D), bias = softplus^-1(dt)
    A_log     (D, N) = log(1..N) (S4D-real)          D        (D,) ones
    out_proj  Linear(D, d_model, bias=bias)

Paths: training / plain forward with ``use_fast_path`` goes through ``mamba_inner_fn`` (one
autograd node); ``use_fast_path=False`` composes causal_conv1d_fn and selective_scan_fn; with an
``inference_params`` the prompt runs the composed path and fills the decode states (the conv's
last inputs and the scan's last state), and later tokens run :meth:`Mamba.step`
(causal_conv1d_update + selective_state_update). CPU tensors run the float64 reference path.

Context parallelism: with ``context_parallel_group`` (a ``torch.distributed`` process group, also
settable as an attribute) each rank's hidden_states hold a contiguous slice of L in rank order,
and the forward runs ``ssmkit.distributed.mamba_inner_fn`` (the conv's halo and the scan's
carries cross ranks, never activations); not with ``inference_params``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssmkit.torch as sst


def _weight_dtype(dtype):
    """The dtype of the scan's A, D and delta_bias for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Mamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, context_parallel_group=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.context_parallel_group = context_parallel_group
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weight scaled to keep the variance at init; bias = softplus^-1(dt) with dt
        # log-uniform in [dt_min, dt_max] (floored), so softplus(dt_proj(.)) starts in that range.
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))       # softplus^-1
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A = -(1..N) per channel, kept as log in fp32 (the scan wants fp32 A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._decode_cache = None

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, hidden_states, inference_params=None):
        """hidden_states (B, L, d_model) -> (B, L, d_model).

        With ``inference_params`` (a :class:`ssmkit.models.InferenceParams`): at
        ``seqlen_offset == 0`` the prompt fills this layer's decode states (rows of a left-padded
        ragged batch start at ``inference_params.prompt_mask``); later calls decode one token."""
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state,
                                      batch_indices=inference_params.batch_indices)
                return out
        # xz (B, 2D, L) with L innermost: one GEMM over (d_model, B L), viewed (as upstream).
        xz = (self.in_proj.weight @ hidden_states.reshape(-1, hidden_states.shape[-1]).t())
        xz = xz.view(-1, batch, seqlen).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]
        # The scan's A, D and delta_bias are fp32 (fp64 for a float64 model: the reference path).
        wdt = _weight_dtype(xz.dtype)
        A = -torch.exp(self.A_log.to(wdt))
        D, dt_bias = self.D.to(wdt), self.dt_proj.bias.to(wdt)
        if self.context_parallel_group is not None:
            if inference_params is not None:
                raise NotImplementedError("Mamba: context_parallel_group does not support inference_params "
                                          "(decoding); set it to None for generation")
            from ssmkit.distributed import mamba_inner_fn as cp_inner_fn

            return cp_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                               self.out_proj.weight, self.out_proj.bias, A, None, None, D, delta_bias=dt_bias,
                               delta_softplus=True, group=self.context_parallel_group)
        if self.use_fast_path and inference_params is None:
            return sst.mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                      self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A,
                                      None, None, D, delta_bias=dt_bias, delta_softplus=True)
        x, z = xz.chunk(2, dim=1)
        mask = None if inference_params is None else inference_params.prompt_mask
        if mask is not None:
            # Left padding: zeroed inputs before a row's first token are what a zero conv state
            # would give, and a zero conv output there adds nothing to the (zero) scan state.
            x = x * mask[:, None, :].to(x.dtype)
        weight = self.conv1d.weight.reshape(self.d_inner, self.d_conv)
        want_states = conv_state is not None
        res = sst.causal_conv1d_fn(x, weight, self.conv1d.bias, activation=self.activation,
                                   return_final_states=want_states)
        x, conv_final = res if want_states else (res, None)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        x_dbl = F.linear(x.transpose(1, 2).reshape(batch * seqlen, self.d_inner), self.x_proj.weight)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(-1, batch, seqlen).transpose(0, 1)
        B = B.reshape(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        C = C.reshape(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        y = sst.selective_scan_fn(x, dt.to(x.dtype), A, B.to(x.dtype), C.to(x.dtype), D, z=z,
                                  delta_bias=dt_bias, delta_softplus=True,
                                  return_last_state=ssm_state is not None)
        if ssm_state is not None:
            y, last_state = y
            with torch.no_grad():
                ssm_state.copy_(last_state)
                # The decode step's shift register holds the last W inputs (upstream's layout):
                # the conv's final states are the last W - 1; the oldest column is never read.
                conv_state[..., -(self.d_conv - 1):].copy_(conv_final)
                conv_state[..., : conv_state.shape[-1] - (self.d_conv - 1)].zero_()
        return self.out_proj(y.transpose(1, 2))

    # ---- decoding -----------------------------------------------------------------------------

    def _decode_weights(self, dtype=None):
        """(A fp32, conv weight (D, W), D, dt_bias) for the decode step. A = -exp(A_log) is kept
        and refreshed in place only when A_log changes (upstream recomputes it every token: two
        launches per layer); in place, so a captured decode graph reads the new values too."""
        wdt = _weight_dtype(self.in_proj.weight.dtype if dtype is None else dtype)
        key = (self.A_log._version, self.A_log.data_ptr(), wdt)
        c = self._decode_cache
        if c is None or c[0] != key:
            with torch.no_grad():
                A = -torch.exp(self.A_log.to(wdt))
                if c is not None and c[1].shape == A.shape and c[1].device == A.device and c[1].dtype == wdt:
                    c[1].copy_(A)
                    A = c[1]
            c = self._decode_cache = (key, A)
        return c[1], self.conv1d.weight.reshape(self.d_inner, self.d_conv), self.D, self.dt_proj.bias

    def step(self, hidden_states, conv_state, ssm_state, batch_indices=None):
        """One token: hidden_states (B, 1, d_model) -> (out (B, 1, d_model), conv_state, ssm_state),
        the states updated in place. ``batch_indices`` (B,) int32 (ssmkit extension): the state
        rows of a larger pool each batch row uses (continuous batching); -1 skips a row."""
        if hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba.step decodes one token at a time, got hidden_states of shape "
                             f"{tuple(hidden_states.shape)}")
        xz = self.in_proj(hidden_states.squeeze(1))                   # (B, 2D)
        A, weight, D, dt_bias = self._decode_weights(xz.dtype)
        if xz.dtype == torch.float64:    # the fp64 (reference) step takes fp64 weights
            D, dt_bias = D.double(), dt_bias.double()
        x, z = xz.chunk(2, dim=-1)
        x = sst.causal_conv1d_update(x, conv_state, weight, self.conv1d.bias, self.activation,
                                     conv_state_indices=batch_indices)
        x_db = self.x_proj(x)                                        # (B, R + 2N)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)                        # (B, D); the bias goes in the kernel
        y = sst.selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                       state_batch_indices=batch_indices)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """(conv_state (B, D, W), ssm_state (B, D, N)), zeros; dtypes: the conv weight's and
        dt_proj's (upstream's), or ``dtype``."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError("Mamba: decoding with inference_params needs layer_idx (the cache key)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

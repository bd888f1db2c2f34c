"""``torch.library`` custom ops (namespace ``ssmkit``): what ``torch.compile`` sees.

Each op's body is the same ``_impl`` function the eager autograd.Functions call; its fake
(meta) kernel gives output shapes, dtypes and strides without running anything, so
``torch.compile(fullgraph=True)`` traces a function that calls ``ssmkit.torch`` ops without a
graph break. Custom ops cannot return None: an absent optional gradient (or the CPU path's
absent saved states) is an empty (0,) tensor, turned back into None by the autograd glue.

    ssmkit::selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                               delta_softplus, save) -> (out, last_state, saved_states)
    ssmkit::selective_scan_bwd(dout, u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                               saved_states, dlast_state?, delta_softplus) -> 9 gradients
    ssmkit::linear_scan(a, b, initial?, reverse) -> h
    ssmkit::linear_scan_bwd(a, b, dh, initial?, reverse, h) -> (da, db, dinitial)
    ssmkit::causal_conv1d_fwd(x, weight, bias?, seq_idx?, initial_states?, return_final_states,
                              silu) -> (out, final_states)
    ssmkit::causal_conv1d_bwd(x, weight, bias?, dout, seq_idx?, initial_states?, dfinal_states?,
                              silu) -> (dx, dweight, dbias, dinitial_states)
    ssmkit::causal_conv1d_update(x, conv_state!, weight, bias?, silu, cache_seqlens?,
                                 conv_state_indices?) -> out
    ssmkit::selective_state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, dt_softplus,
                                   state_batch_indices?) -> out

The forward ops have autograd formulas (``register_autograd``) that call the backward ops; the
backward ops and the decode ops have none (no double backward; decode is inference-only).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ssmkit.ops.selective_scan import SAVE_EVERY

from . import _impl


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _or_empty(t, like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _strided_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides of ``torch.empty_like(like)`` (what the fake kernel promises)."""
    want = torch.empty_like(like, device="meta").stride()
    if t.stride() == want:
        return t
    r = torch.empty_like(like)
    r.copy_(t)
    return r


# ---- selective scan ---------------------------------------------------------------------------

@torch.library.custom_op("ssmkit::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                       delta_softplus: bool, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, last, saved = _impl.ss_forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                        delta_softplus, save, True)
    return out, _impl._contig(last), _impl.ss_saved_tensor(saved, A)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save):
    batch, dim, seqlen = u.shape
    n = A.shape[1]
    out = u.new_empty((batch, dim, seqlen))
    last = A.new_empty((batch, dim, n))
    if save and u.device.type != "cpu":     # CUDA (and meta): the chunk-boundary states, as bytes,
        # followed by the un-gated output when z is given (see _impl.ss_saved_tensor)
        nbytes = batch * dim * ((seqlen + SAVE_EVERY - 1) // SAVE_EVERY) * n * A.element_size()
        if z is not None:
            nbytes += batch * dim * seqlen * u.element_size()
        saved = u.new_empty((nbytes,), dtype=torch.uint8)
    else:
        saved = _empty(A)
    return out, last, saved


@torch.library.custom_op("ssmkit::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       initial_state: Optional[Tensor], saved: Tensor, dlast_state: Optional[Tensor],
                       delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor, Tensor]:
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    grads = _impl.ss_backward(dout, *args, delta_softplus, saved, dlast_state)
    return tuple(_empty(u) if g is None else _impl._contig(g) for g in grads)


@selective_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, dlast_state, delta_softplus):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(_empty(u) if t is None else t.new_empty(t.shape) for t in args)


def _ss_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus


def _ss_backward(ctx, dout, dlast, dsaved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved = ctx.saved_tensors
    if dout is None:
        dout = u.new_zeros(u.shape)
    g = torch.ops.ssmkit.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                                            dlast, ctx.delta_softplus)
    present = (True, True, True, True, True, D is not None, z is not None, delta_bias is not None,
               initial_state is not None)
    return tuple(gi if p else None for gi, p in zip(g, present)) + (None, None)


selective_scan_fwd.register_autograd(_ss_backward, setup_context=_ss_setup)


# ---- linear scan ------------------------------------------------------------------------------

@torch.library.custom_op("ssmkit::linear_scan", mutates_args=())
def linear_scan(a: Tensor, b: Tensor, initial: Optional[Tensor], reverse: bool) -> Tensor:
    return _impl.ls_forward(a, b, initial, reverse)


@linear_scan.register_fake
def _(a, b, initial, reverse):
    return b.new_empty(b.shape)


@torch.library.custom_op("ssmkit::linear_scan_bwd", mutates_args=())
def linear_scan_bwd(a: Tensor, b: Tensor, dh: Tensor, initial: Optional[Tensor], reverse: bool,
                    h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    da, db, dinit = _impl.ls_backward(a, b, dh, initial, reverse, h)
    return _impl._contig(da), _impl._contig(db), _or_empty(_impl._contig(dinit), a)


@linear_scan_bwd.register_fake
def _(a, b, dh, initial, reverse, h):
    return a.new_empty(a.shape), b.new_empty(b.shape), (_empty(a) if initial is None else initial.new_empty(initial.shape))


def _ls_setup(ctx, inputs, output):
    a, b, initial, reverse = inputs
    ctx.save_for_backward(a, b, initial, output)
    ctx.reverse = reverse


def _ls_backward(ctx, dh):
    a, b, initial, h = ctx.saved_tensors
    da, db, dinit = torch.ops.ssmkit.linear_scan_bwd(a, b, dh, initial, ctx.reverse, h)
    return da, db, (dinit if initial is not None else None), None


linear_scan.register_autograd(_ls_backward, setup_context=_ls_setup)


# ---- causal conv1d ----------------------------------------------------------------------------

@torch.library.custom_op("ssmkit::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                      initial_states: Optional[Tensor], return_final_states: bool,
                      silu: bool) -> tuple[Tensor, Tensor]:
    out, final = _impl.conv_forward(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    return out, _or_empty(final, x)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    out = torch.empty_like(x)
    if return_final_states:
        final = x.new_empty((x.shape[0], x.shape[1], weight.shape[-1] - 1))
    else:
        final = _empty(x)
    return out, final


@torch.library.custom_op("ssmkit::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor,
                      seq_idx: Optional[Tensor], initial_states: Optional[Tensor],
                      dfinal_states: Optional[Tensor], silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dinit = _impl.conv_backward(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, silu)
    return (_strided_like(dx, x), _impl._contig(dw), _or_empty(_impl._contig(db), weight),
            _or_empty(_impl._contig(dinit), x))


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, silu):
    return (torch.empty_like(x), weight.new_empty(weight.shape),
            _empty(weight) if bias is None else bias.new_empty(bias.shape),
            _empty(x) if initial_states is None else initial_states.new_empty(initial_states.shape))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu
    ctx.return_final_states = return_final_states


def _conv_backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    if not ctx.return_final_states:
        dfinal = None
    dx, dw, db, dinit = torch.ops.ssmkit.causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states,
                                                           dfinal, ctx.silu)
    return (dx, dw, db if bias is not None else None, None,
            dinit if initial_states is not None else None, None, None)


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("ssmkit::causal_conv1d_update", mutates_args={"conv_state"})
def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                         cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor]) -> Tensor:
    return _impl.conv_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices)


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    return torch.empty_like(x)


# ---- selective state update -----------------------------------------------------------------

@torch.library.custom_op("ssmkit::selective_state_update", mutates_args={"state"})
def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                           dt_softplus: bool, state_batch_indices: Optional[Tensor]) -> Tensor:
    return _impl.ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return torch.empty_like(x)

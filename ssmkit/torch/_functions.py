"""Eager autograd: ``torch.autograd.Function``s over the shared ``_impl`` bodies.

Eager calls take this path (cheaper per call than the custom-op dispatcher); under
``torch.compile`` the public functions switch to the custom ops in ``_ops`` instead. Tensors are
saved only when some input needs a gradient, and every differentiable input gets one.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _impl


class SelectiveScanFunction(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state)
    -> (out, last_state or None). The backward takes the gradient of last_state too."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        save = any(ctx.needs_input_grad[:9])
        out, last, saved = _impl.ss_forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                            delta_softplus, save, return_last_state)
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
            ctx.scan_saved = saved       # ssmkit.ScanSaved: chunk-boundary states (GPU)
            ctx.delta_softplus = delta_softplus
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        grads = _impl.ss_backward(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.delta_softplus,
                                  ctx.scan_saved, dlast)
        need = ctx.needs_input_grad
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None)


class LinearScanFunction(torch.autograd.Function):
    """(a, b, initial, reverse) -> h."""

    @staticmethod
    def forward(ctx, a, b, initial, reverse):
        h = _impl.ls_forward(a, b, initial, reverse)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(a, b, initial, h)
            ctx.reverse = reverse
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        a, b, initial, h = ctx.saved_tensors
        da, db, dinit = _impl.ls_backward(a, b, dh, initial, ctx.reverse, h)
        need = ctx.needs_input_grad
        return (da if need[0] else None, db if need[1] else None, dinit if need[2] else None, None)


class CausalConv1dFunction(torch.autograd.Function):
    """(x, weight, bias, seq_idx, initial_states, return_final_states, silu) -> (out, final or None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, return_final_states, silu):
        out, final = _impl.conv_forward(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:5]):
            ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
            ctx.silu = silu
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dx, dw, db, dinit = _impl.conv_backward(x, weight, bias, dout, seq_idx, initial_states, dfinal, ctx.silu)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None,
                dinit if need[4] else None, None, None)

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


def _linear_2d(t):
    """(B, D, L) -> (B L, D) rows, as F.linear reads them (a copy unless already that layout)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def _delta_from_rows(delta_proj_weight, rows, batch: int, L: int):
    """delta (B, D, L) with L innermost, as the scan reads it: (D, B L) from one GEMM, viewed."""
    return (delta_proj_weight @ rows.t()).view(-1, batch, L).transpose(0, 1)


def _variable_bc(cols, batch: int, L: int):
    """(B L, N) columns of x_dbl -> (B, 1, N, L) with L contiguous (the scan's fast layout)."""
    return cols.reshape(batch, L, -1).transpose(1, 2).unsqueeze(1).contiguous()


class MambaInnerFunction(torch.autograd.Function):
    """The Mamba-1 block interior as one autograd node (upstream's MambaInnerFn):
    xz (B, 2D, L) -> conv1d + silu -> x_proj -> dt_proj -> selective scan gated by z -> out_proj.

    Saved for the backward: xz, x_dbl (B L, R + 2N), B/C (B, 1, N, L), the scan's chunk states and
    un-gated output, and with ``checkpoint_lvl`` 0 also the conv output and delta (level 1
    recomputes those two in the backward, so a layer keeps no more than upstream's level 1).
    Real A, variable B/C from x_proj; the other mamba_inner_fn options go through the composed path.
    Under CUDA autocast the projection weights run in the autocast dtype, as upstream's.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, D, delta_bias, delta_softplus, checkpoint_lvl):
        import torch.nn.functional as F

        if torch.is_autocast_enabled("cuda") and xz.is_cuda:
            dt = torch.get_autocast_dtype("cuda")
            x_proj_weight = x_proj_weight.to(dt)
            delta_proj_weight = delta_proj_weight.to(dt)
            out_proj_weight = out_proj_weight.to(dt)
            out_proj_bias = out_proj_bias.to(dt) if out_proj_bias is not None else None
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        batch, _, L = xz.shape
        rank = delta_proj_weight.shape[1]
        N = A.shape[-1]
        w = conv1d_weight.reshape(conv1d_weight.shape[0], conv1d_weight.shape[-1])
        x, z = xz.chunk(2, dim=1)
        conv_out, _ = _impl.conv_forward(x, w, conv1d_bias, None, None, False, True)
        x_dbl = F.linear(_linear_2d(conv_out), x_proj_weight)                     # (B L, R + 2N)
        delta = _delta_from_rows(delta_proj_weight, x_dbl[:, :rank], batch, L).to(conv_out.dtype)
        B = _variable_bc(x_dbl[:, rank:rank + N], batch, L).to(conv_out.dtype)
        C = _variable_bc(x_dbl[:, rank + N:], batch, L).to(conv_out.dtype)
        out_z, _, saved = _impl.ss_forward(conv_out, delta, A, B, C, D, z, delta_bias, None, delta_softplus,
                                           True, False)
        ctx.scan_saved = saved
        ctx.delta_softplus = delta_softplus
        ctx.checkpoint_lvl = checkpoint_lvl
        ctx.has_out_bias = out_proj_bias is not None
        ctx.conv_weight_shape = conv1d_weight.shape
        # The gated output is needed for out_proj's weight gradient: rebuilt from the scan's
        # saved un-gated output on the GPU; the CPU reference keeps none, so it is kept there.
        keep_out_z = out_z if getattr(saved, "y", None) is None else None
        if checkpoint_lvl >= 1:
            conv_out, delta = None, None
        ctx.save_for_backward(xz, w, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight, out_proj_weight,
                              conv_out, delta, A, B, C, D, delta_bias, keep_out_z)
        return F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dout):
        import torch.nn.functional as F

        (xz, w, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight, out_proj_weight, conv_out, delta,
         A, B, C, D, delta_bias, out_z) = ctx.saved_tensors
        batch, _, L = xz.shape
        rank = delta_proj_weight.shape[1]
        N = A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        if conv_out is None:          # checkpoint_lvl 1: recompute the conv output and delta
            conv_out, _ = _impl.conv_forward(x, w, conv1d_bias, None, None, False, True)
            delta = _delta_from_rows(delta_proj_weight, x_dbl[:, :rank], batch, L).to(conv_out.dtype)
        saved = ctx.scan_saved
        if out_z is None:
            y = _impl.ss_ungated(saved)
            out_z = (y.float() * F.silu(z.float())).to(y.dtype)
        dout2 = dout.reshape(-1, dout.shape[-1])                                  # (B L, out)
        dout_proj_weight = dout2.t() @ _linear_2d(out_z).to(dout2.dtype)
        dout_proj_bias = dout2.sum(0) if ctx.has_out_bias else None
        dy = (out_proj_weight.t() @ dout2.t().to(out_proj_weight.dtype)).view(-1, batch, L).transpose(0, 1)
        grads = _impl.ss_backward(dy.to(conv_out.dtype), conv_out, delta, A, B, C, D, z, delta_bias, None,
                                  ctx.delta_softplus, saved, None)
        dconv_out, ddelta, dA, dB, dC, dD, dz, ddelta_bias, _ = grads
        # x_dbl's gradient: [ddelta rows | dB | dC]
        dx_dbl = torch.empty_like(x_dbl)
        dd2 = ddelta.transpose(0, 1).reshape(ddelta.shape[1], -1).to(x_dbl.dtype)   # (D, B L)
        ddelta_proj_weight = dd2 @ x_dbl[:, :rank]
        dx_dbl[:, :rank] = dd2.t() @ delta_proj_weight
        dx_dbl[:, rank:rank + N] = dB.reshape(batch, N, L).transpose(1, 2).reshape(-1, N)
        dx_dbl[:, rank + N:] = dC.reshape(batch, N, L).transpose(1, 2).reshape(-1, N)
        dx_proj_weight = dx_dbl.t() @ _linear_2d(conv_out).to(dx_dbl.dtype)
        dconv_out = dconv_out + (x_proj_weight.t() @ dx_dbl.t()).view(-1, batch, L).transpose(0, 1).to(dconv_out.dtype)
        dx, dw, dbias, _ = _impl.conv_backward(x, w, conv1d_bias, dconv_out, None, None, None, True)
        dxz = torch.cat((dx, dz.to(dx.dtype)), dim=1)
        return (dxz, dw.reshape(ctx.conv_weight_shape), dbias, dx_proj_weight, ddelta_proj_weight,
                dout_proj_weight, dout_proj_bias, dA, dD, ddelta_bias, None, None)

"""The forward/backward bodies shared by the autograd.Functions (eager) and the custom ops
(torch.compile): torch tensors in, torch tensors out, one device per call.

CUDA tensors run ssmkit's host code on CuPy views inside ``gpu_context`` (torch's device, current
stream and caching allocator); CPU tensors run the same host functions on NumPy arrays, i.e. the
float64 reference. Nothing here records autograd state.
"""
from __future__ import annotations

import functools
import inspect

import torch

import ssmkit
from ssmkit.ops import linear_scan as _ls_mod
from ssmkit.ops import selective_scan as _ss_mod
from ssmkit.ops import selective_state_update as _ssu_mod

try:
    from ssmkit.ops import causal_conv1d as _conv_mod
except ImportError:  # pragma: no cover - a build without the conv op: the reference path only
    _conv_mod = None

from ._bridge import (device_of, from_numpy, gpu_context, has_bf16, np_view, shadows, to_torch, view,
                      views, _torch_device)

SS_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
SS_OP = "selective_scan_fn"


def _contig(t):
    """Custom-op outputs must have the strides their fake kernels promise (C-contiguous)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def host(name: str):
    """ssmkit's public host function ``name`` or None when this build does not have it yet."""
    return getattr(ssmkit, name, None)


@functools.lru_cache(maxsize=None)
def accepts(fn, param: str) -> bool:
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _missing(name: str):
    raise NotImplementedError(f"ssmkit.{name} is not available in this ssmkit build; the CUDA path of "
                              "this ssmkit.torch op needs it")


# ---- selective scan ---------------------------------------------------------------------------

def ss_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, save: bool,
               want_last: bool):
    """Returns (out, last_state or None, saved or None).

    ``save``: keep what the backward needs (``ssmkit.ScanSaved``). last_state is returned when
    ``want_last`` (always computed when ``save``)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    idx = device_of(SS_OP, SS_NAMES, args)
    if idx >= 0:
        out = torch.empty(u.shape, dtype=u.dtype, device=_torch_device(idx))
        with gpu_context(idx):
            v = views(SS_OP, idx, SS_NAMES, args)
            kw = dict(D=v[5], z=v[6], delta_bias=v[7], delta_softplus=delta_softplus, initial_state=v[8],
                      out=view(out, "out", idx))
            if save:
                _, last, saved = ssmkit.selective_scan_fwd(*v[:5], **kw)
                return out, (to_torch(last) if want_last else None), saved
            if want_last:
                _, last = ssmkit.selective_scan(*v[:5], return_last_state=True, **kw)
                return out, to_torch(last), None
            ssmkit.selective_scan(*v[:5], **kw)
            return out, None, None
    if has_bf16(args):
        _ss_mod.validate(*shadows(args[:7]), shadows((delta_bias,))[0], delta_softplus,
                         shadows((initial_state,))[0])
    n = [np_view(t) for t in args]
    kw = dict(D=n[5], z=n[6], delta_bias=n[7], delta_softplus=delta_softplus, initial_state=n[8])
    if save:
        o, last, saved = ssmkit.selective_scan_fwd(*n[:5], **kw)
    else:
        o, last = ssmkit.selective_scan(*n[:5], return_last_state=True, **kw)
        saved = None
    return from_numpy(o, u.dtype), (from_numpy(last) if want_last or save else None), saved


_specs: dict = {}


def _scan_spec(v, args, delta_softplus):
    """The host's SelectiveScanSpec for these (already forward-validated) arguments, cached by
    the shapes, dtypes and flags it is made of."""
    key = (delta_softplus,) + tuple(None if t is None else (t.shape, t.dtype) for t in args)
    spec = _specs.get(key)
    if spec is None:
        spec = _ss_mod.validate(*v[:7], v[7], delta_softplus, v[8])
        if len(_specs) > 1024:
            _specs.clear()
        _specs[key] = spec
    return spec


def ss_saved_tensor(saved, A):
    """What the forward keeps, as one uint8 tensor (a custom op returns tensors): the chunk-boundary
    states' bytes, then (with z) the un-gated output's bytes. Empty when there is none (CPU)."""
    states = None if saved is None else saved.states
    if states is None:
        return A.new_empty((0,))
    parts = [_contig(to_torch(states)).reshape(-1).view(torch.uint8)]
    if saved.y is not None:
        parts.append(_contig(to_torch(saved.y)).reshape(-1).view(torch.uint8))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _unpack_saved(saved_bytes, u, A, z, spec):
    """Inverse of ss_saved_tensor: (states (B, D, n_saved, N) in A's dtype, y (B, D, L) or None)."""
    if saved_bytes.numel() == 0:             # nothing was kept (the reference path recomputes)
        return saved_bytes, None
    Bsz, Dsz, L = u.shape
    N = A.shape[1]
    nb = Bsz * Dsz * spec.n_saved * N * A.element_size()
    states = saved_bytes[:nb].view(A.dtype).view(Bsz, Dsz, spec.n_saved, N)
    y = saved_bytes[nb:].view(u.dtype).view(Bsz, Dsz, L) if z is not None else None
    return states, y


def ss_ungated(saved):
    """The un-gated output y + D u (B, D, L) that a GPU forward with z kept, as a tensor, or None."""
    y = getattr(saved, "y", None)
    return None if y is None else to_torch(y)


def ss_backward(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, saved,
                dlast_state=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), None where the
    input is None. ``saved``: the ScanSaved of the forward, or its states tensor (custom ops)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    names = SS_NAMES + ("dout", "dlast_state")
    idx = device_of(SS_OP, names, args + (dout, dlast_state))
    if idx >= 0:
        with gpu_context(idx):
            v = views(SS_OP, idx, names, args + (dout, dlast_state))
            if isinstance(saved, torch.Tensor):      # custom-op path: rebuild the ScanSaved
                spec = _scan_spec(v, args, delta_softplus)
                states, y = _unpack_saved(saved, u, A, z, spec)
                saved = ssmkit.ScanSaved(view(states, "saved", idx), spec,
                                         None if y is None else view(y, "saved_y", idx))
            # torch.use_deterministic_algorithms(True) selects the bitwise-reproducible dB/dC sums.
            det = True if torch.are_deterministic_algorithms_enabled() else None
            grads = ssmkit.selective_scan_bwd(v[9], *v[:5], D=v[5], z=v[6], delta_bias=v[7],
                                              delta_softplus=delta_softplus, initial_state=v[8], saved=saved,
                                              dlast_state=v[10], deterministic=det)
            return tuple(to_torch(g) for g in grads)
    if has_bf16(args + (dout,)):
        _ss_mod.validate(*shadows(args[:7]), shadows((delta_bias,))[0], delta_softplus,
                         shadows((initial_state,))[0])
    n = [np_view(t) for t in args]
    grads = ssmkit.selective_scan_bwd(np_view(dout), *n[:5], D=n[5], z=n[6], delta_bias=n[7],
                                      delta_softplus=delta_softplus, initial_state=n[8],
                                      dlast_state=np_view(dlast_state))
    return tuple(None if g is None else from_numpy(g, t.dtype) for g, t in zip(grads, args))


# ---- linear scan ------------------------------------------------------------------------------

LS_NAMES = ("a", "b", "initial")


def ls_forward(a, b, initial, reverse: bool):
    args = (a, b, initial)
    idx = device_of("linear_scan", LS_NAMES, args)
    if idx >= 0:
        with gpu_context(idx):
            v = views("linear_scan", idx, LS_NAMES, args)
            h = ssmkit.linear_scan(v[0], v[1], v[2], reverse=reverse)
            return _contig(to_torch(h))
    if has_bf16(args):
        _ls_mod.validate(*shadows(args), reverse)
    return from_numpy(ssmkit.linear_scan(np_view(a), np_view(b), np_view(initial), reverse=reverse), b.dtype)


def ls_backward(a, b, dh, initial, reverse: bool, h=None):
    """(da, db, dinitial); dinitial None when initial is None."""
    args = (a, b, initial)
    names = LS_NAMES + ("dh", "h")
    idx = device_of("linear_scan", names, args + (dh, h))
    if idx >= 0:
        with gpu_context(idx):
            v = views("linear_scan", idx, names, args + (dh, h))
            g = ssmkit.linear_scan_bwd(v[0], v[1], v[3], v[2], reverse=reverse, h=v[4])
            return tuple(_contig(to_torch(x)) for x in g)
    if has_bf16(args):
        _ls_mod.validate(*shadows(args), reverse)
    g = ssmkit.linear_scan_bwd(np_view(a), np_view(b), np_view(dh), np_view(initial), reverse=reverse,
                               h=np_view(h))
    return tuple(None if x is None else from_numpy(x, t.dtype) for x, t in zip(g, args))


# ---- causal conv1d ----------------------------------------------------------------------------

CONV_NAMES = ("x", "weight", "bias", "seq_idx", "initial_states")
CONV_OP = "causal_conv1d_fn"


def _act(silu: bool):
    return "silu" if silu else None


def _reference(name):
    from ssmkit import reference

    return getattr(reference, name)


def conv_forward(x, weight, bias, seq_idx, initial_states, return_final: bool, silu: bool):
    """Returns (out, final_states or None); out has x's strides (as upstream's empty_like(x))."""
    args = (x, weight, bias, seq_idx, initial_states)
    idx = device_of(CONV_OP, CONV_NAMES, args)
    fn = host("causal_conv1d")
    if idx >= 0:
        if fn is None:
            _missing("causal_conv1d")
        out = torch.empty_like(x)
        with gpu_context(idx):
            v = views(CONV_OP, idx, CONV_NAMES, args)
            kw = dict(activation=_act(silu), seq_idx=v[3], initial_states=v[4],
                      return_final_states=return_final)
            if accepts(fn, "out"):
                kw["out"] = view(out, "out", idx)
            res = fn(v[0], v[1], v[2], **kw)
            o, final = res if return_final else (res, None)
            if "out" not in kw:
                out.copy_(to_torch(o))
            return out, (_contig(to_torch(final)) if return_final else None)
    if has_bf16(args) and _conv_mod is not None:
        sh = shadows(args)
        _conv_mod.validate(sh[0], sh[1], sh[2], _act(silu), sh[3], sh[4])
    n = [np_view(t) for t in args]
    f = fn or _reference("causal_conv1d")
    res = f(n[0], n[1], n[2], activation=_act(silu), seq_idx=n[3], initial_states=n[4],
            return_final_states=return_final)
    o, final = res if return_final else (res, None)
    out = torch.empty_like(x)
    out.copy_(from_numpy(o, x.dtype))
    return out, (from_numpy(final, x.dtype) if return_final else None)


def conv_backward(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, silu: bool):
    """(dx, dweight, dbias, dinitial_states), None for absent bias / initial_states."""
    args = (x, weight, bias, seq_idx, initial_states)
    names = CONV_NAMES + ("dout", "dfinal_states")
    idx = device_of(CONV_OP, names, args + (dout, dfinal_states))
    fn = host("causal_conv1d_bwd")
    if idx >= 0:
        if fn is None:
            _missing("causal_conv1d_bwd")
        with gpu_context(idx):
            v = views(CONV_OP, idx, names, args + (dout, dfinal_states))
            g = fn(v[0], v[1], v[2], v[5], activation=_act(silu), seq_idx=v[3], initial_states=v[4],
                   dfinal_states=v[6])
            return tuple(to_torch(t) for t in g)
    if has_bf16(args + (dout,)) and _conv_mod is not None:
        sh = shadows(args)
        _conv_mod.validate(sh[0], sh[1], sh[2], _act(silu), sh[3], sh[4])
    n = [np_view(t) for t in args]
    f = fn or _reference("causal_conv1d_bwd")
    g = f(n[0], n[1], n[2], np_view(dout), activation=_act(silu), seq_idx=n[3], initial_states=n[4],
          dfinal_states=np_view(dfinal_states))
    likes = (x, weight, bias, initial_states)
    return tuple(None if t is None else from_numpy(t, like.dtype) for t, like in zip(g, likes))


UPD_NAMES = ("x", "conv_state", "weight", "bias", "cache_seqlens", "conv_state_indices")


def conv_update(x, conv_state, weight, bias, silu: bool, cache_seqlens, conv_state_indices):
    """Decode step: updates ``conv_state`` in place, returns out (x's shape and dtype)."""
    args = (x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    idx = device_of("causal_conv1d_update", UPD_NAMES, args)
    fn = host("causal_conv1d_update")
    if idx >= 0:
        if fn is None:
            _missing("causal_conv1d_update")
        out = torch.empty_like(x)
        with gpu_context(idx):
            v = views("causal_conv1d_update", idx, UPD_NAMES, args)
            kw = dict(activation=_act(silu), cache_seqlens=v[4], conv_state_indices=v[5])
            if accepts(fn, "out"):
                kw["out"] = view(out, "out", idx)
            o = fn(v[0], v[1], v[2], v[3], **kw)
            if "out" not in kw:
                out.copy_(to_torch(o))
            return out
    # The reference runs on copies: the caller's tensors are validated here (true dtypes of bf16,
    # and the layout of the state written back into).
    if (has_bf16(args) or not conv_state.is_contiguous()) and _conv_mod is not None:
        sh = shadows(args)
        _conv_mod.validate_update(sh[0], sh[1], sh[2], sh[3], _act(silu), sh[4], sh[5], None)
    n = [np_view(t) for t in args]
    f = fn or _reference("causal_conv1d_update")
    o = f(n[0], n[1], n[2], n[3], activation=_act(silu), cache_seqlens=n[4], conv_state_indices=n[5])
    _write_back(conv_state, n[1])
    out = torch.empty_like(x)
    out.copy_(from_numpy(o, x.dtype))
    return out


def _write_back(t, arr):
    """After an in-place NumPy update: copy back when ``arr`` was a converted copy of ``t``."""
    if t.dtype is torch.bfloat16 or not _shares(t, arr):
        with torch.no_grad():
            t.copy_(from_numpy(arr, t.dtype))


def _shares(t, arr) -> bool:
    try:
        return arr.__array_interface__["data"][0] == t.data_ptr()
    except Exception:
        return False


# ---- selective state update -----------------------------------------------------------------

SSU_NAMES = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices")


def ssu(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool, state_batch_indices):
    """One decode step: updates ``state`` in place, returns out (x's shape and dtype)."""
    args = (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    idx = device_of("selective_state_update", SSU_NAMES, args)
    if idx >= 0:
        out = torch.empty_like(x)
        with gpu_context(idx):
            v = views("selective_state_update", idx, SSU_NAMES, args)
            ssmkit.selective_state_update(*v[:6], D=v[6], z=v[7], dt_bias=v[8], dt_softplus=dt_softplus,
                                          state_batch_indices=v[9], out=view(out, "out", idx))
        return out
    if has_bf16(args) or not state.is_contiguous():   # the caller's tensors (the reference runs on copies)
        sh = shadows(args)
        _ssu_mod.validate(*sh[:9], dt_softplus=dt_softplus, state_batch_indices=sh[9])
    n = [np_view(t) for t in args]
    o = ssmkit.selective_state_update(*n[:6], D=n[6], z=n[7], dt_bias=n[8], dt_softplus=dt_softplus,
                                      state_batch_indices=n[9])
    _write_back(state, n[0])
    out = torch.empty_like(x)
    out.copy_(from_numpy(o, x.dtype))
    return out

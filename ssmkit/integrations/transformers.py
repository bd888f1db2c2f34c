"""transformers' ``MambaForCausalLM`` on ssmkit's kernels.

    import ssmkit.integrations.transformers as ssmkit_hf
    from transformers import MambaForCausalLM

    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf").cuda()
    ssmkit_hf.enable()                  # or: with ssmkit_hf.use_ssmkit(): ...
    out = model.generate(input_ids.cuda(), max_new_tokens=32)
    ssmkit_hf.disable()                 # transformers' own functions again

transformers' Mamba mixer calls five module-level functions of
``transformers.models.mamba.modeling_mamba`` for its convolution and scan. :func:`enable` replaces
them with routers that send calls whose tensors live on a routed device type (``"cuda"`` by
default) to :mod:`ssmkit.torch` and every other call to the function they replaced. The patch is
process-wide (module globals, not one model): it covers models built before and after the call,
and :func:`disable` puts the replaced objects back. Importing this module imports neither torch
nor transformers; :func:`enable` does.

Two mechanisms are recognised (:func:`mechanism` says which one the installed version has):

``"kernel-functions"`` (checked on transformers 5.17.0 and 5.25.0): ``causal_conv1d_fn``,
``causal_conv1d_update``, ``mamba_selective_scan``, ``mamba_selective_state_update`` and
``mamba_inner_fn``, each a torch implementation that transformers wraps (at import) to call
``causal_conv1d`` / ``mamba_ssm`` when installed or a hub kernel (``kernels``). The mixer has one
forward for every device, so the routed calls are, per mixer layer:

* prefill (several tokens, with or without a cache) and eval: ``causal_conv1d_fn`` ->
  ``ssmkit.torch.causal_conv1d_fn`` (silu fused), ``mamba_selective_scan`` ->
  ``ssmkit.torch.selective_scan_fn`` (D skip, silu(z) gate, dt bias + softplus fused; the last
  state is returned for the cache when there is one);
* decode (one token with a cache): ``causal_conv1d_update`` -> ``ssmkit.torch.causal_conv1d_update``
  (in place on the cache's conv state) and ``mamba_selective_state_update`` ->
  ``ssmkit.torch.selective_state_update`` (in place on the recurrent state; 5.25 passes a clone
  that the cache then takes). 5.25's assisted-decoding path (a cache that records past states)
  runs the conv and scan above for the leading tokens and the decode step for each kept state;
* training (``model.train()`` and no cache): ``mamba_inner_fn`` -> ``ssmkit.torch.mamba_inner_fn``
  (conv, x_proj, dt_proj, scan and out_proj as one autograd function). transformers' own
  ``mamba_inner_fn`` returns None, which sends the mixer down the unfused path; with
  ``enable(fused_training=False)`` ssmkit's router returns None too, and training runs
  ``causal_conv1d_fn`` and ``selective_scan_fn`` with autograd through that unfused path.

``"fast-path-globals"`` (transformers 4.46 to 5.0; checked on CPU with 4.46.0 and 5.0.0 by forcing
``cuda_kernels_forward``, not yet on a GPU): ``MambaMixer.forward`` takes ``cuda_kernels_forward``
when the module globals ``selective_state_update``, ``selective_scan_fn``, ``causal_conv1d_fn``,
``causal_conv1d_update`` and ``mamba_inner_fn`` (upstream signatures) are all set and the weights
are on CUDA. enable() sets
them, sets the module's ``is_fast_path_available`` flag where it has one (4.x) and, where
``MambaMixer.__init__`` re-reads them through ``lazy_load_kernel`` (5.0), puts modules holding
ssmkit's functions into that loader's cache under "causal-conv1d" and "mamba-ssm" so that mixers
built later keep them. Prefill then calls ``causal_conv1d_fn`` and ``selective_scan_fn``, decode
``causal_conv1d_update`` and ``selective_state_update`` (on ``MambaCache``'s states, in the model
dtype), training ``mamba_inner_fn``. CPU weights keep the slow torch forward (``devices`` must
include "cuda").

What stays in torch: the embedding, RMSNorms, residual adds, in_proj / x_proj / dt_proj /
out_proj matmuls (outside ``mamba_inner_fn``), the attention-mask multiplies, the cache
bookkeeping (padding and concatenating conv states, copying recurrent states) and the LM head.

Dtypes: with fp32 ``A`` the mixer passes the scan's ``D`` / ``delta_bias`` in fp32, and the decode
step's ``D`` in the model dtype with ``dt_bias`` in fp32 (5.x). ssmkit's scan takes D and
delta_bias in fp32 (the routers cast them to A's dtype if they are not); its decode step reads a
16-bit D / dt_bias as is when this ssmkit build does (probed once by enable()), else the routers
cast them to fp32 (one small copy per layer and step for a 16-bit model). The conv and out_proj
biases of ``mamba_inner_fn`` go to their weights' dtype (transformers 5.x passes the out_proj bias,
later 5.0-era code also the conv bias, in fp32, which the conv kernel refuses next to a 16-bit
weight). ``seq_idx`` goes to int32.

Not covered / not working:

* Calls under ``torch.export`` go to transformers' own functions (as transformers does for
  ``mamba_ssm``). ``torch.compile`` of a patched model is untested (the routers are plain Python
  in front of ssmkit.torch's custom ops; "fast-path-globals" versions leave the kernel path
  while compiling).
* While enabled, the replaced functions do not reach hub kernels installed with
  ``model.kernelize()`` / ``use_kernels=True`` or an installed ``mamba_ssm`` / ``causal_conv1d``
  for routed devices (they still do for the others).
* A conv activation other than silu/swish (``config.hidden_act``) sends the conv calls to
  transformers' functions. The fused training path (``mamba_inner_fn``, as with ``mamba_ssm``)
  cannot see the activation: it always applies silu, and it does not re-apply the attention mask
  after the conv (the mixer masks its input). Use ``fused_training=False`` to train a model with
  another ``hidden_act`` or on left-padded batches ("kernel-functions" versions only).
* A multi-token forward that continues a non-empty cache (chunked prefill) starts the scan from a
  zero state, as transformers' own scan function does (its signature has no initial state).
* ROCm builds of torch report "cuda" devices; ssmkit's kernels need an NVIDIA GPU.
* ``"cpu"`` in ``devices`` runs ssmkit's float64 NumPy reference (slow; for tests and debugging).
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import types

__all__ = ["enable", "disable", "is_enabled", "use_ssmkit", "mechanism", "KERNEL_FUNCTIONS",
           "FAST_PATH_GLOBALS", "UnrecognisedTransformersError"]

KERNEL_FUNCTIONS = "kernel-functions"
FAST_PATH_GLOBALS = "fast-path-globals"
DEVICE_TYPES = ("cuda", "cpu")
_ACTIVATIONS = (None, "silu", "swish")

# "kernel-functions": name -> the leading positional parameters its torch function must have.
_KERNEL_FUNCTION_PARAMS = {
    "causal_conv1d_fn": ("hidden_states", "weight", "bias", "activation"),
    "causal_conv1d_update": ("hidden_states", "conv_state", "weight", "bias", "activation"),
    "mamba_selective_scan": ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                             "return_last_state"),
    "mamba_selective_state_update": ("state", "hidden_states", "dt", "A", "B", "C", "D", "dt_bias", "dt_softplus",
                                     "z"),
    "mamba_inner_fn": ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight",
                       "out_proj_weight", "out_proj_bias", "A", "B", "C", "D", "delta_bias", "delta_softplus"),
}
# "fast-path-globals": the globals cuda_kernels_forward calls (upstream signatures) and, for 5.0's
# lazy_load_kernel, the loader entry that MambaMixer.__init__ reads each of them from.
_FAST_PATH_NAMES = ("causal_conv1d_fn", "causal_conv1d_update", "selective_scan_fn", "selective_state_update",
                    "mamba_inner_fn")
_LOADER_ENTRIES = {"causal-conv1d": ("causal_conv1d_fn", "causal_conv1d_update"),
                   "mamba-ssm": ("selective_scan_fn", "selective_state_update", "mamba_inner_fn")}
_ABSENT = object()

_lock = threading.RLock()
_patch = None                    # the applied _Patch, or None
_devices = frozenset(("cuda",))  # device types routed to ssmkit (read by the routers on each call)
_fused_training = True           # "kernel-functions": mamba_inner_fn -> ssmkit (True) or None (False)
_st = None                       # ssmkit.torch, imported by enable()
_torch = None
_ssu_own_dtypes = None           # whether ssmkit's selective_state_update reads a 16-bit D / dt_bias as is


# ---- import and recognition -------------------------------------------------------------------

def _modeling():
    """transformers' modeling_mamba module; ImportError naming the package when it is missing."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("ssmkit.integrations.transformers needs the 'transformers' package, which is not "
                          "installed: pip install 'ssmkit[transformers]' (or pip install transformers)") from exc
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError as exc:
        raise ImportError(f"ssmkit.integrations.transformers: transformers {transformers.__version__} has no "
                          f"Mamba model (transformers.models.mamba.modeling_mamba): {exc}") from exc
    return modeling_mamba


def _version(mm=None) -> str:
    try:
        import transformers
        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"


class UnrecognisedTransformersError(RuntimeError):
    """The installed transformers picks Mamba's kernels in a way this integration does not know."""


def _unrecognised(mm, why: str) -> UnrecognisedTransformersError:
    return UnrecognisedTransformersError(
        f"ssmkit.integrations.transformers does not recognise how transformers {_version(mm)} "
        f"({getattr(mm, '__file__', mm)}) picks Mamba's kernels: {why}. It knows the "
        f"'{KERNEL_FUNCTIONS}' mechanism (module functions {', '.join(_KERNEL_FUNCTION_PARAMS)}; transformers "
        f"5.17/5.25) and the '{FAST_PATH_GLOBALS}' one (MambaMixer.cuda_kernels_forward with module globals "
        f"{', '.join(_FAST_PATH_NAMES)}; transformers 4.46-5.0). Nothing was patched.")


def _is_router(obj) -> bool:
    return getattr(obj, "_ssmkit_router", False)


def _unrouted(obj):
    """What ``obj`` replaced when it is one of our routers, else ``obj`` itself."""
    return obj.transformers_original if _is_router(obj) else obj


def _positional_params(fn):
    """The leading positional parameter names of transformers' torch function behind ``fn`` (a
    function wrapped with functools.wraps, or, with ``kernels`` installed, an nn.Module instance
    whose class's forward closes over that function); None when they cannot be read."""
    candidates = [fn]
    forward = getattr(type(fn), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:
            continue
        if inspect.isfunction(contents):
            candidates.append(contents)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for c in candidates:
        try:
            params = tuple(p.name for p in inspect.signature(c).parameters.values() if p.kind in kinds)
        except (TypeError, ValueError):
            continue
        if params:
            return params
    return None


def _loader_mapping(mm):
    """The cache dict of 5.0's ``lazy_load_kernel`` (its ``mapping`` default), or None."""
    loader = getattr(mm, "lazy_load_kernel", None)
    if loader is None:
        return None
    try:
        mapping = inspect.signature(loader).parameters["mapping"].default
    except (KeyError, TypeError, ValueError):
        raise _unrecognised(mm, "its lazy_load_kernel has no 'mapping' cache argument") from None
    if not isinstance(mapping, dict):
        raise _unrecognised(mm, f"its lazy_load_kernel's mapping default is a {type(mapping).__name__}, not a dict")
    return mapping


def _detect(mm) -> str:
    mixer = getattr(mm, "MambaMixer", None)
    if not isinstance(mixer, type):
        raise _unrecognised(mm, "it has no MambaMixer class")
    if hasattr(mixer, "cuda_kernels_forward"):
        has_flag = isinstance(getattr(mm, "is_fast_path_available", None), bool)
        loader = _loader_mapping(mm)
        if not has_flag and loader is None:
            raise _unrecognised(mm, "MambaMixer has cuda_kernels_forward but the module has neither an "
                                    "is_fast_path_available flag nor lazy_load_kernel")
        if loader is None:
            missing = [n for n in _FAST_PATH_NAMES if not hasattr(mm, n)]
            if missing:
                raise _unrecognised(mm, f"the module globals {missing} are missing")
        return FAST_PATH_GLOBALS
    missing = [n for n in _KERNEL_FUNCTION_PARAMS if not callable(_unrouted(getattr(mm, n, None)))]
    if missing:
        raise _unrecognised(mm, f"MambaMixer has no cuda_kernels_forward and the module functions {missing} "
                                f"are missing")
    for name, want in _KERNEL_FUNCTION_PARAMS.items():
        got = _positional_params(_unrouted(getattr(mm, name)))
        if got is not None and got[:len(want)] != want:
            raise _unrecognised(mm, f"{name} takes ({', '.join(got)}), expected ({', '.join(want)}, ...)")
    return KERNEL_FUNCTIONS


def mechanism() -> str:
    """How the installed transformers picks Mamba's kernels: ``KERNEL_FUNCTIONS`` or
    ``FAST_PATH_GLOBALS``. Raises ImportError without transformers and
    ``UnrecognisedTransformersError`` for a version whose mechanism is unknown here."""
    return _detect(_modeling())


# ---- routing ------------------------------------------------------------------------------------

def _device_type(args, kwargs):
    for a in args:
        if isinstance(a, _torch.Tensor):
            return a.device.type
    for a in kwargs.values():
        if isinstance(a, _torch.Tensor):
            return a.device.type
    return None


def _exporting() -> bool:
    f = getattr(_torch.compiler, "is_exporting", None)
    return bool(f is not None and f())


def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _router(name: str, adapter, original, accepts=None):
    """A function that calls ``adapter`` (ssmkit) for tensors on a routed device type (and
    arguments ``accepts`` takes), else ``original`` (transformers' object it replaces)."""
    def route(*args, **kwargs):
        if (_device_type(args, kwargs) in _devices and (accepts is None or accepts(args, kwargs))
                and not _exporting()):
            return adapter(*args, **kwargs)
        if original is None:
            raise RuntimeError(f"ssmkit.integrations.transformers: {name} called on device "
                               f"{_device_type(args, kwargs)!r}, which is not routed to ssmkit "
                               f"(devices={sorted(_devices)}), and transformers has no {name} of its own")
        return original(*args, **kwargs)

    route.__name__ = route.__qualname__ = name
    route.__doc__ = (f"transformers' {name} routed by ssmkit.integrations.transformers: ssmkit "
                     f"({adapter.__name__}) on the enabled device types, else the replaced function.")
    route._ssmkit_router = True
    route.ssmkit_adapter = adapter
    route.transformers_original = original
    return route


def _real_dtype(A):
    return {_torch.complex64: _torch.float32, _torch.complex128: _torch.float64}.get(A.dtype, A.dtype)


def _like_A(t, A):
    """D / dt_bias / delta_bias in A's (real) dtype, as ssmkit's scan and decode step take them."""
    if t is None:
        return None
    dt = _real_dtype(A)
    return t if t.dtype == dt else t.to(dt)


def _as(t, ref):
    return t if t is None or t.dtype == ref.dtype else t.to(ref.dtype)


def _int32(t):
    return t if t is None or t.dtype == _torch.int32 else t.to(_torch.int32)


# "kernel-functions" adapters: transformers' parameter names and order.

def _ssu_weight(t, A):
    """D / dt_bias for ssmkit's decode step: as is where it reads them in their own dtype, else in
    A's dtype (older ssmkit: fp32 only; one small copy per layer and step for a 16-bit model)."""
    return t if _ssu_own_dtypes else _like_A(t, A)


def _probe_ssu_dtypes() -> bool:
    """One tiny CPU call (validation is shared with the GPU path): does selective_state_update
    take a bf16 D and dt_bias with fp32 A?"""
    t, bf = _torch, _torch.bfloat16
    try:
        _st.selective_state_update(t.zeros(1, 1, 1), t.zeros(1, 1, dtype=bf), t.zeros(1, 1, dtype=bf), t.zeros(1, 1),
                                   t.zeros(1, 1, dtype=bf), t.zeros(1, 1, dtype=bf), t.zeros(1, dtype=bf), None,
                                   t.zeros(1, dtype=bf), True)
    except Exception:   # TypeError from validation (or no bf16 on this host): the cast is always right
        return False
    return True


def _kf_causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, seq_idx=None, **_):
    return _st.causal_conv1d_fn(hidden_states, weight, bias, seq_idx=_int32(seq_idx), activation=activation)


def _kf_causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **_):
    return _st.causal_conv1d_update(hidden_states, conv_state, weight, bias, activation=activation)


def _kf_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **_):
    return _st.selective_scan_fn(hidden_states, dt, A, B, C, _like_A(D, A), z, _like_A(delta_bias, A),
                                 delta_softplus, return_last_state)


def _kf_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                               z=None, **_):
    return _st.selective_state_update(state, hidden_states, dt, A, B, C, _ssu_weight(D, A), z,
                                      _ssu_weight(dt_bias, A), dt_softplus)


def _kf_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True,
                       b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6, **_):
    if not _fused_training:
        return None          # the mixer's unfused path, on the routed conv and scan
    return _st.mamba_inner_fn(xz, conv1d_weight, _as(conv1d_bias, conv1d_weight), x_proj_weight, delta_proj_weight,
                              out_proj_weight, _as(out_proj_bias, out_proj_weight), A, B, C, _like_A(D, A),
                              _like_A(delta_bias, A), delta_softplus=delta_softplus, b_rms_weight=b_rms_weight,
                              c_rms_weight=c_rms_weight, dt_rms_weight=dt_rms_weight,
                              b_c_dt_rms_eps=b_c_dt_rms_eps)


# "fast-path-globals" adapters: upstream (mamba_ssm / causal_conv1d) signatures.

def _fp_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
    return _st.causal_conv1d_fn(x, weight, bias, _int32(seq_idx), initial_states, return_final_states,
                                final_states_out, activation)


def _fp_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    return _st.causal_conv1d_update(x, conv_state, weight, bias, activation, _int32(cache_seqlens),
                                    _int32(conv_state_indices))


def _fp_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    return _st.selective_scan_fn(u, delta, A, B, C, _like_A(D, A), z, _like_A(delta_bias, A), delta_softplus,
                                 return_last_state)


def _fp_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None, **_):
    return _st.selective_state_update(state, x, dt, A, B, C, _ssu_weight(D, A), z, _ssu_weight(dt_bias, A),
                                      dt_softplus, state_batch_indices)


def _fp_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                       C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, **kwargs):
    return _st.mamba_inner_fn(xz, conv1d_weight, _as(conv1d_bias, conv1d_weight), x_proj_weight, delta_proj_weight,
                              out_proj_weight, _as(out_proj_bias, out_proj_weight), A, B, C, _like_A(D, A),
                              _like_A(delta_bias, A), B_proj_bias, C_proj_bias, delta_softplus, checkpoint_lvl,
                              **kwargs)


def _conv_act_ok(index: int):
    """accepts(): the conv activation (keyword, or positional at ``index``) is one ssmkit fuses."""
    return lambda args, kwargs: _arg(args, kwargs, index, "activation") in _ACTIVATIONS


_ROUTES = {
    KERNEL_FUNCTIONS: {
        "causal_conv1d_fn": (_kf_causal_conv1d_fn, _conv_act_ok(3)),
        "causal_conv1d_update": (_kf_causal_conv1d_update, _conv_act_ok(4)),
        "mamba_selective_scan": (_kf_selective_scan, None),
        "mamba_selective_state_update": (_kf_selective_state_update, None),
        "mamba_inner_fn": (_kf_mamba_inner_fn, None),
    },
    FAST_PATH_GLOBALS: {
        "causal_conv1d_fn": (_fp_causal_conv1d_fn, _conv_act_ok(7)),
        "causal_conv1d_update": (_fp_causal_conv1d_update, _conv_act_ok(4)),
        "selective_scan_fn": (_fp_selective_scan_fn, None),
        "selective_state_update": (_fp_selective_state_update, None),
        "mamba_inner_fn": (_fp_mamba_inner_fn, None),
    },
}


# ---- patching -----------------------------------------------------------------------------------

class _Patch:
    """What enable() changed in transformers, with the values to put back."""

    def __init__(self, mm, mech):
        self.mm = mm
        self.mechanism = mech
        self.globals = {}        # module global -> its value before (or _ABSENT)
        self.loader = None       # 5.0's lazy_load_kernel cache dict
        self.loader_saved = {}   # its entries before (or _ABSENT)

    def apply(self):
        mm = self.mm
        routers = {}
        for name, (adapter, accepts) in _ROUTES[self.mechanism].items():
            before = getattr(mm, name, _ABSENT)
            self.globals.setdefault(name, _unrouted(before) if before is not _ABSENT else _ABSENT)
            original = self.globals[name]
            routers[name] = _router(name, adapter, None if original is _ABSENT else original, accepts)
            setattr(mm, name, routers[name])
        if self.mechanism == FAST_PATH_GLOBALS:
            if isinstance(getattr(mm, "is_fast_path_available", None), bool):
                self.globals.setdefault("is_fast_path_available", mm.is_fast_path_available)
                mm.is_fast_path_available = True
            self.loader = _loader_mapping(mm)
            if self.loader is not None:
                for entry, names in _LOADER_ENTRIES.items():
                    before = self.loader.get(entry, _ABSENT)
                    if not getattr(before, "_ssmkit_loader_module", False):
                        self.loader_saved.setdefault(entry, before)
                    module = types.ModuleType(f"ssmkit.integrations.transformers[{entry}]")
                    module._ssmkit_loader_module = True
                    for n in names:
                        setattr(module, n, routers[n])
                    self.loader[entry] = module

    def revert(self):
        mm = self.mm
        for name, value in self.globals.items():
            if value is _ABSENT:
                # 5.0 defines these globals in MambaMixer.__init__; a mixer built while enabled
                # still reads them, so None (no kernel: the slow path) rather than a NameError.
                setattr(mm, name, None)
            else:
                setattr(mm, name, value)
        for entry, value in self.loader_saved.items():
            if value is _ABSENT:
                self.loader.pop(entry, None)
            else:
                self.loader[entry] = value


def enable(devices=("cuda",), fused_training: bool = True) -> str:
    """Route transformers' Mamba kernel calls on ``devices`` (device types, a subset of
    ("cuda", "cpu")) to ssmkit.torch; returns the mechanism patched (see :func:`mechanism`).

    Idempotent: calling it again (e.g. with other ``devices``) updates the routing and keeps the
    originals saved by the first call. ``fused_training``: training takes the fused
    ``mamba_inner_fn`` (True) or the unfused conv + scan path (False; "kernel-functions" only).
    Raises ImportError without transformers (or torch), ``UnrecognisedTransformersError`` for a
    transformers whose mechanism is unknown, ValueError for bad arguments.
    """
    global _patch, _devices, _fused_training, _st, _torch, _ssu_own_dtypes
    devs = (devices,) if isinstance(devices, str) else tuple(devices)
    bad = [d for d in devs if d not in DEVICE_TYPES]
    if bad or not devs:
        raise ValueError(f"enable: devices must be a non-empty subset of {DEVICE_TYPES}, got {devices!r}")
    with _lock:
        mm = _modeling()
        mech = _patch.mechanism if _patch is not None and _patch.mm is mm else _detect(mm)
        if mech == FAST_PATH_GLOBALS:
            if "cuda" not in devs:
                raise ValueError(f"enable: with transformers {_version(mm)} ('{FAST_PATH_GLOBALS}') only CUDA "
                                 f"weights take the kernel path, so devices must include 'cuda', got {devices!r}")
            if not fused_training:
                raise ValueError(f"enable: fused_training=False needs the '{KERNEL_FUNCTIONS}' mechanism "
                                 f"(transformers >= 5.17); transformers {_version(mm)}'s cuda_kernels_forward "
                                 f"always trains through mamba_inner_fn")
        import torch
        import ssmkit.torch as st
        _torch, _st = torch, st
        if _ssu_own_dtypes is None:
            _ssu_own_dtypes = _probe_ssu_dtypes()
        _devices = frozenset(devs)
        _fused_training = bool(fused_training)
        if _patch is None or _patch.mm is not mm:
            _patch = _Patch(mm, mech)
        _patch.apply()
        return mech


def disable() -> None:
    """Put back the functions (and flags, loader entries) that :func:`enable` replaced. A no-op
    when not enabled."""
    global _patch
    with _lock:
        if _patch is not None:
            _patch.revert()
            _patch = None


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _patch is not None


@contextlib.contextmanager
def use_ssmkit(devices=("cuda",), fused_training: bool = True):
    """``with use_ssmkit(): ...`` enables the routing for the block and restores the previous
    state (disabled, or enabled with its earlier options) afterwards."""
    with _lock:
        was = (_devices, _fused_training) if _patch is not None else None
        enable(devices, fused_training)
    try:
        yield
    finally:
        with _lock:
            if was is None:
                disable()
            else:
                enable(tuple(was[0]), was[1])

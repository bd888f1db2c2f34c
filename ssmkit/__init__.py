"""ssmkit: Mamba's GPU kernels (selective scan, causal conv1d, decode steps) with no build step.

Raw CUDA sources ship in the package and are compiled on first use by NVRTC through CuPy
(``cupy.RawModule``), cached on disk. Every op takes CuPy arrays (GPU kernels), NumPy arrays
(the float64 reference: the CPU path) or any DLPack array. ``ssmkit.torch`` holds autograd
adapters with the upstream ``mamba_ssm`` / ``causal_conv1d`` signatures.

Shape letters: B batch, D channels, L length, N state size, G groups, W conv width,
H heads, P head dim.
"""
from __future__ import annotations

from ._layout import checkout_extra_path as _checkout_extra_path

# In a source checkout, ``reference/`` sits beside this package: make it ``ssmkit.reference``
# (a wheel ships it inside the package).
__path__.extend(_checkout_extra_path())  # type: ignore[name-defined]

__version__ = "0.1.0"

from .ops.linear_scan import linear_scan, linear_scan_bwd  # noqa: E402
from .ops.selective_scan import selective_scan, selective_scan_fwd, selective_scan_bwd, ScanSaved  # noqa: E402
from .ops.selective_state_update import selective_state_update, SelectiveStateUpdatePlan  # noqa: E402
from .ops.causal_conv1d import causal_conv1d, causal_conv1d_bwd, causal_conv1d_update  # noqa: E402
from .ops.layer_norm import layer_norm, layer_norm_fwd, layer_norm_bwd  # noqa: E402
from ._warmup import warmup  # noqa: E402

__all__ = ["linear_scan", "linear_scan_bwd", "selective_scan", "selective_scan_fwd", "selective_scan_bwd",
           "ScanSaved", "warmup"]
__all__ += ["selective_state_update", "SelectiveStateUpdatePlan"]
__all__ += ["causal_conv1d", "causal_conv1d_bwd", "causal_conv1d_update"]
__all__ += ["layer_norm", "layer_norm_fwd", "layer_norm_bwd"]

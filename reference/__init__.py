"""Float64 NumPy reference implementations of the ssmkit kernels.

These are the test oracle and the CPU fallback path. Everything is computed in
float64 / complex128 and cast back to the input dtypes.
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_bwd, causal_conv1d_update
from .layer_norm import layer_norm, layer_norm_bwd
from .linear_scan import linear_scan, linear_scan_bwd
from .selective_scan import selective_scan, selective_scan_bwd
from .selective_state_update import selective_state_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_bwd",
    "causal_conv1d_update",
    "layer_norm",
    "layer_norm_bwd",
    "linear_scan",
    "linear_scan_bwd",
    "selective_scan",
    "selective_scan_bwd",
    "selective_state_update",
]

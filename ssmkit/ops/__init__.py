"""Host code, one module per op: validation into a spec, kernel choice, launch."""
from . import linear_scan  # noqa: F401
from . import selective_scan  # noqa: F401
from . import reduce_partials  # noqa: F401
from . import selective_state_update  # noqa: F401
from . import causal_conv1d  # noqa: F401
from . import layer_norm  # noqa: F401

"""How many hypothesis examples the GPU property tests draw (issue 13: at least 1000 per op
across the suite, each compared with the float64 reference).

A property test runs as several pytest items, "shards", each its own hypothesis run of
``per_shard`` examples, so that pytest-xdist spreads one op's examples over the workers instead
of one worker drawing them all. ``SSMKIT_GPU_EXAMPLES`` (default 1000) sets the examples per op;
``share`` splits them between an op's tests (forward 0.5 + backward 0.5, ...).
"""
from __future__ import annotations

import math
import os

GPU_EXAMPLES_PER_OP = int(os.environ.get("SSMKIT_GPU_EXAMPLES", "1000"))


def shards(per_shard: int, share: float = 1.0) -> list[int]:
    """Shard indices for a property test of ``per_shard`` examples that should cover ``share``
    of its op's examples."""
    return list(range(max(1, math.ceil(GPU_EXAMPLES_PER_OP * share / per_shard))))

"""Deterministic folding of per-block partial sums (used by the backward kernels).

``FoldPlan(jobs)``: a fixed set of folds, each ``part`` (outer, K, inner) contiguous fp32/fp64
(complex as pairs) -> ``out`` (outer, inner) in the output's dtype, summed over K in a fixed
order, all in one launch of kernels_cu/reduce_partials.cu (jobs are grouped by accumulator type,
up to JOBS per launch).
"""
from __future__ import annotations

from .._compile import KernelRef
from .._launch import prepare
from .._params import Params
from .._registry import register

OP = "reduce_partials"
_ACC = {"float32": "float", "float64": "double"}
_OUT_CODE = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
_REAL = {"complex64": "float32", "complex128": "float64"}
THREADS = 256
JOBS = 6                 # kReduceJobs in reduce_partials.cu
MAX_BLOCKS = 132 * 32    # grid-stride beyond this: enough to fill any current GPU
# The C struct declares arrays; the mirror names their elements (same layout).
PARAMS = Params("ssm::ReduceParams",
                [(f"part{j}", "ptr") for j in range(JOBS)] + [(f"out{j}", "ptr") for j in range(JOBS)]
                + [(f"{f}{j}", "int64_t") for f in ("outer", "K", "inner") for j in range(JOBS)]
                + [(f"start{j}", "int64_t") for j in range(JOBS + 1)]
                + [(f"out_type{j}", "int32_t") for j in range(JOBS)] + [("n_jobs", "int32_t")],
                c_names={f"{f}{j}": f"{f}[{j}]" for f in ("part", "out", "outer", "K", "inner", "out_type", "start")
                         for j in range(JOBS + 1)})


def kernel_ref(acc: str) -> KernelRef:
    return KernelRef("reduce_partials.cu", f"ssm::reduce_partials<{_ACC[acc]}>")


@register(OP)
def variants(dtype: str | None = None) -> list[KernelRef]:
    return [kernel_ref("float32"), kernel_ref("float64")]


def _name(dtype) -> str:
    return dtype if isinstance(dtype, str) else dtype.name


class FoldPlan:
    """Folds with fixed shapes and dtypes, prepared once; ``plan(parts, outs)`` launches them
    (``parts``/``outs``: arrays in the order of ``jobs``) on the current stream."""

    def __init__(self, jobs):
        """``jobs``: list of ((outer, K, inner), part dtype name, out dtype name)."""
        groups: dict[str, list] = {}
        for idx, ((outer, K, inner), part_dt, out_dt) in enumerate(jobs):
            acc, out = _name(part_dt), _name(out_dt)
            if acc in _REAL:                      # complex: sum the (re, im) pairs as reals
                acc, inner, out = _REAL[acc], inner * 2, _REAL[out]
            if out == "float64" and acc != "float64":
                raise TypeError(f"{OP}: an fp64 output needs fp64 partials, got {acc}")
            groups.setdefault(acc, []).append((idx, outer, K, inner, _OUT_CODE[out]))
        self.launches = []
        for acc, items in groups.items():
            for c in range(0, len(items), JOBS):
                chunk = items[c:c + JOBS]
                row = PARAMS.row(n_jobs=len(chunk))
                start = 0
                for j, (_, outer, K, inner, code) in enumerate(chunk):
                    row[PARAMS.index(f"outer{j}")] = outer
                    row[PARAMS.index(f"K{j}")] = K
                    row[PARAMS.index(f"inner{j}")] = inner
                    row[PARAMS.index(f"out_type{j}")] = code
                    row[PARAMS.index(f"start{j}")] = start
                    start += outer * inner
                for j in range(len(chunk), JOBS + 1):
                    row[PARAMS.index(f"start{j}")] = start
                blocks = max(1, min(-(-start // THREADS), MAX_BLOCKS))
                launch = prepare(kernel_ref(acc), grid=(blocks,), block=(THREADS,))
                ptr_slots = [(idx, PARAMS.index(f"part{j}"), PARAMS.index(f"out{j}"))
                             for j, (idx, *_rest) in enumerate(chunk)]
                self.launches.append((launch, row, ptr_slots))

    def __call__(self, parts, outs) -> None:
        for launch, row, slots in self.launches:
            row = row[:]
            for idx, pi, oi in slots:
                row[pi] = parts[idx].data.ptr
                row[oi] = outs[idx].data.ptr
            launch.row(PARAMS, row)

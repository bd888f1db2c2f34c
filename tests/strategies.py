"""Hypothesis strategies shared by the ssmkit test-suite.

Each ``*_specs()`` strategy draws a small frozen dataclass describing a problem
(shapes, flags and an RNG seed); ``spec.build()`` deterministically generates the
float64 / complex128 NumPy inputs from it. The ``*_problems()`` strategies draw a
spec and return the built inputs as a ``Problem``: a dict of keyword arguments for
the matching reference function, with the spec attached as ``problem.spec`` (and
used as its repr, so failing examples print compactly).

GPU tests can cast a problem to other dtypes with ``cast_problem``.

Value ranges are chosen to be well-conditioned: A has negative real part
(-exp(normal)), delta is positive and ~0.01-1 after bias/softplus, other inputs
are standard normal.
"""

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "Problem", "cast_problem", "divisors",
    "ScanSpec", "scan_specs", "scan_problems", "small_scan_shapes",
    "ConvSpec", "conv_specs", "conv_problems", "random_seq_idx",
    "ConvUpdateSpec", "conv_update_specs", "conv_update_problems",
    "SSUSpec", "ssu_specs", "ssu_problems",
    "seeds",
]


class Problem(dict):
    """Keyword arguments for a reference function plus the ``spec`` they came from."""

    def __init__(self, spec, inputs):
        super().__init__(inputs)
        self.spec = spec

    def __repr__(self):
        return f"Problem({self.spec!r})"


def cast_problem(problem, real_dtype, complex_dtype=np.complex64, skip=("seq_idx",)):
    """Copy of ``problem`` with floating arrays cast to ``real_dtype`` and complex
    arrays to ``complex_dtype``; integer arrays and non-arrays are kept."""
    out = {}
    for key, value in problem.items():
        if isinstance(value, np.ndarray) and key not in skip:
            if np.iscomplexobj(value):
                value = value.astype(complex_dtype)
            elif np.issubdtype(value.dtype, np.floating):
                value = value.astype(real_dtype)
        out[key] = value
    return Problem(problem.spec, out)


def divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def seeds():
    return st.integers(min_value=0, max_value=2**32 - 1)


def _normal(rng, shape, cplx=False):
    x = rng.standard_normal(shape)
    if cplx:
        x = x + 1j * rng.standard_normal(shape)
    return x


# --------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class ScanSpec:
    """selective_scan problem. B_kind / C_kind: "const" (D, N), "var" (B, N, L),
    "group" (B, G, N, L) with B_groups / C_groups groups."""

    batch: int
    dim: int
    dstate: int
    seqlen: int
    B_kind: str
    C_kind: str
    B_groups: int
    C_groups: int
    complex_A: bool
    complex_B: bool
    complex_C: bool
    has_D: bool
    has_z: bool
    has_delta_bias: bool
    delta_softplus: bool
    has_initial_state: bool
    seed: int

    def _bc(self, rng, kind, groups, cplx):
        if kind == "const":
            shape = (self.dim, self.dstate)
        elif kind == "var":
            shape = (self.batch, self.dstate, self.seqlen)
        else:
            shape = (self.batch, groups, self.dstate, self.seqlen)
        return _normal(rng, shape, cplx)

    def build(self):
        rng = np.random.default_rng(self.seed)
        Bsz, D, N, L = self.batch, self.dim, self.dstate, self.seqlen
        A = -np.exp(rng.normal(0.0, 1.0, (D, N)))
        if self.complex_A:
            A = A + 1j * rng.normal(0.0, 2.0, (D, N))
        if self.delta_softplus:
            delta = rng.uniform(-4.0, 0.5, (Bsz, D, L))       # softplus -> ~0.02..1
            delta_bias = rng.uniform(-0.5, 0.5, D)
        else:
            delta = rng.uniform(0.01, 1.0, (Bsz, D, L))
            delta_bias = rng.uniform(0.0, 0.3, D)
        inputs = dict(
            u=rng.standard_normal((Bsz, D, L)),
            delta=delta,
            A=A,
            B=self._bc(rng, self.B_kind, self.B_groups, self.complex_B),
            C=self._bc(rng, self.C_kind, self.C_groups, self.complex_C),
            D=rng.standard_normal(D) if self.has_D else None,
            z=rng.standard_normal((Bsz, D, L)) if self.has_z else None,
            delta_bias=delta_bias if self.has_delta_bias else None,
            delta_softplus=self.delta_softplus,
            initial_state=(_normal(rng, (Bsz, D, N), self.complex_A)
                           if self.has_initial_state else None),
        )
        return inputs


@st.composite
def small_scan_shapes(draw, max_batch=2, max_dim=8, max_dstate=6, max_seqlen=40, min_seqlen=1):
    """(batch, dim, dstate, seqlen)."""
    return (
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_dim)),
        draw(st.integers(1, max_dstate)),
        draw(st.integers(min_seqlen, max_seqlen)),
    )


@st.composite
def scan_specs(draw, max_batch=2, max_dim=8, max_dstate=6, max_seqlen=40, min_seqlen=1,
               complex_A=None, variable_BC=None, initial_state=None, bc_kinds=None):
    """ScanSpec with random flags. Pass complex_A / variable_BC / initial_state as
    bools to pin those choices (variable_BC=True forces "var"/"group" B and C,
    False forces "const"); bc_kinds (a list of kinds) overrides variable_BC."""
    batch, dim, dstate, seqlen = draw(small_scan_shapes(max_batch, max_dim, max_dstate,
                                                        max_seqlen, min_seqlen))
    kinds = ["const", "var", "group"]
    if variable_BC is True:
        kinds = ["var", "group"]
    elif variable_BC is False:
        kinds = ["const"]
    if bc_kinds is not None:
        kinds = list(bc_kinds)
    cA = draw(st.booleans()) if complex_A is None else complex_A
    return ScanSpec(
        batch=batch, dim=dim, dstate=dstate, seqlen=seqlen,
        B_kind=draw(st.sampled_from(kinds)),
        C_kind=draw(st.sampled_from(kinds)),
        B_groups=draw(st.sampled_from(divisors(dim))),
        C_groups=draw(st.sampled_from(divisors(dim))),
        complex_A=cA,
        complex_B=cA and draw(st.booleans()),
        complex_C=cA and draw(st.booleans()),
        has_D=draw(st.booleans()),
        has_z=draw(st.booleans()),
        has_delta_bias=draw(st.booleans()),
        delta_softplus=draw(st.booleans()),
        has_initial_state=(draw(st.booleans()) if initial_state is None else initial_state),
        seed=draw(seeds()),
    )


def scan_problems(**kwargs):
    """Problem with selective_scan keyword arguments (see scan_specs for options)."""
    return scan_specs(**kwargs).map(lambda s: Problem(s, s.build()))


# --------------------------------------------------------------------------- conv


def random_seq_idx(rng, batch, seqlen, allow_padding=True):
    """(B, L) int32 seq_idx: nondecreasing segment ids, some segments possibly -1."""
    out = np.empty((batch, seqlen), dtype=np.int32)
    for b in range(batch):
        nseg = int(rng.integers(1, min(4, seqlen) + 1))
        cuts = np.sort(rng.choice(np.arange(1, seqlen), size=nseg - 1, replace=False)) if nseg > 1 else []
        ids = np.zeros(seqlen, dtype=np.int32)
        for c in cuts:
            ids[c:] += 1
        if allow_padding and rng.random() < 0.5:
            ids[ids == rng.integers(0, nseg)] = -1
        out[b] = ids
    return out


@dataclass(frozen=True)
class ConvSpec:
    batch: int
    dim: int
    seqlen: int
    width: int
    has_bias: bool
    activation: object  # None or "silu"
    has_seq_idx: bool
    has_initial_states: bool
    seed: int

    def build(self):
        rng = np.random.default_rng(self.seed)
        Bsz, D, L, W = self.batch, self.dim, self.seqlen, self.width
        return dict(
            x=rng.standard_normal((Bsz, D, L)),
            weight=rng.standard_normal((D, W)) / np.sqrt(W),
            bias=rng.standard_normal(D) if self.has_bias else None,
            activation=self.activation,
            seq_idx=random_seq_idx(rng, Bsz, L) if self.has_seq_idx else None,
            initial_states=rng.standard_normal((Bsz, D, W - 1)) if self.has_initial_states else None,
        )


@st.composite
def conv_specs(draw, max_batch=2, max_dim=8, max_seqlen=40, min_width=2, max_width=8,
               seq_idx=None, initial_states=None):
    return ConvSpec(
        batch=draw(st.integers(1, max_batch)),
        dim=draw(st.integers(1, max_dim)),
        seqlen=draw(st.integers(1, max_seqlen)),
        width=draw(st.integers(min_width, max_width)),
        has_bias=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "silu"])),
        has_seq_idx=draw(st.booleans()) if seq_idx is None else seq_idx,
        has_initial_states=draw(st.booleans()) if initial_states is None else initial_states,
        seed=draw(seeds()),
    )


def conv_problems(**kwargs):
    """Problem with causal_conv1d keyword arguments (see conv_specs for options)."""
    return conv_specs(**kwargs).map(lambda s: Problem(s, s.build()))


@dataclass(frozen=True)
class ConvUpdateSpec:
    """causal_conv1d_update problem. The pool has ``pool_extra`` rows not used by any
    batch row; with ``has_indices`` a shuffled conv_state_indices is used and, if
    ``pad_row`` >= 0, batch row ``pad_row`` gets index -1 (padding)."""

    batch: int
    dim: int
    width: int
    state_len: int
    new_len: int
    x_2d: bool
    has_bias: bool
    activation: object
    ring: bool
    has_indices: bool
    pool_extra: int
    pad_row: int
    seed: int

    def build(self):
        rng = np.random.default_rng(self.seed)
        Bsz, D, W, S = self.batch, self.dim, self.width, self.state_len
        pool = Bsz + self.pool_extra
        shape = (Bsz, D) if self.x_2d else (Bsz, D, self.new_len)
        indices = None
        if self.has_indices:
            indices = rng.permutation(pool)[:Bsz].astype(np.int32)
            if self.pad_row >= 0:
                indices[self.pad_row] = -1
        return dict(
            x=rng.standard_normal(shape),
            conv_state=rng.standard_normal((pool, D, S)),
            weight=rng.standard_normal((D, W)) / np.sqrt(W),
            bias=rng.standard_normal(D) if self.has_bias else None,
            activation=self.activation,
            cache_seqlens=rng.integers(0, 50, Bsz).astype(np.int32) if self.ring else None,
            conv_state_indices=indices,
        )


@st.composite
def conv_update_specs(draw, max_batch=3, max_dim=6, max_width=6, max_new_len=5):
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(2, max_width))
    x_2d = draw(st.booleans())
    has_indices = draw(st.booleans())
    return ConvUpdateSpec(
        batch=batch,
        dim=draw(st.integers(1, max_dim)),
        width=width,
        state_len=width - 1 + draw(st.integers(0, 3)),
        new_len=1 if x_2d else draw(st.integers(1, max_new_len)),
        x_2d=x_2d,
        has_bias=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "silu"])),
        ring=draw(st.booleans()),
        has_indices=has_indices,
        pool_extra=draw(st.integers(0, 2)) if has_indices else 0,
        pad_row=draw(st.integers(-1, batch - 1)) if has_indices else -1,
        seed=draw(seeds()),
    )


def conv_update_problems(**kwargs):
    return conv_update_specs(**kwargs).map(lambda s: Problem(s, s.build()))


# --------------------------------------------------------------------------- state update


@dataclass(frozen=True)
class SSUSpec:
    """selective_state_update problem. Mamba-1 uses ``dim``; Mamba-2 uses
    ``nheads``, ``headdim``, ``ngroups``. Pool / padding as in ConvUpdateSpec."""

    mamba2: bool
    batch: int
    dim: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    has_D: bool
    has_z: bool
    has_dt_bias: bool
    dt_softplus: bool
    has_indices: bool
    pool_extra: int
    pad_row: int
    seed: int

    def build(self):
        rng = np.random.default_rng(self.seed)
        Bsz, N = self.batch, self.dstate
        if self.mamba2:
            chan = (self.nheads, self.headdim)
            bc_shape = (Bsz, self.ngroups, N)
        else:
            chan = (self.dim,)
            bc_shape = (Bsz, N)
        pool = Bsz + self.pool_extra
        indices = None
        if self.has_indices:
            indices = rng.permutation(pool)[:Bsz].astype(np.int32)
            if self.pad_row >= 0:
                indices[self.pad_row] = -1
        if self.dt_softplus:
            dt = rng.uniform(-4.0, 0.5, (Bsz,) + chan)
            dt_bias = rng.uniform(-0.5, 0.5, chan)
        else:
            dt = rng.uniform(0.01, 1.0, (Bsz,) + chan)
            dt_bias = rng.uniform(0.0, 0.3, chan)
        return dict(
            state=rng.standard_normal((pool,) + chan + (N,)),
            x=rng.standard_normal((Bsz,) + chan),
            dt=dt,
            A=-np.exp(rng.normal(0.0, 1.0, chan + (N,))),
            B=rng.standard_normal(bc_shape),
            C=rng.standard_normal(bc_shape),
            D=rng.standard_normal(chan) if self.has_D else None,
            z=rng.standard_normal((Bsz,) + chan) if self.has_z else None,
            dt_bias=dt_bias if self.has_dt_bias else None,
            dt_softplus=self.dt_softplus,
            state_batch_indices=indices,
        )


@st.composite
def ssu_specs(draw, mamba2=None, max_batch=3, max_dim=8, max_heads=4, max_headdim=4, max_dstate=6):
    is2 = draw(st.booleans()) if mamba2 is None else mamba2
    batch = draw(st.integers(1, max_batch))
    nheads = draw(st.integers(1, max_heads))
    has_indices = draw(st.booleans())
    return SSUSpec(
        mamba2=is2,
        batch=batch,
        dim=draw(st.integers(1, max_dim)),
        nheads=nheads,
        headdim=draw(st.integers(1, max_headdim)),
        ngroups=draw(st.sampled_from(divisors(nheads))),
        dstate=draw(st.integers(1, max_dstate)),
        has_D=draw(st.booleans()),
        has_z=draw(st.booleans()),
        has_dt_bias=draw(st.booleans()),
        dt_softplus=draw(st.booleans()),
        has_indices=has_indices,
        pool_extra=draw(st.integers(0, 2)) if has_indices else 0,
        pad_row=draw(st.integers(-1, batch - 1)) if has_indices else -1,
        seed=draw(seeds()),
    )


def ssu_problems(**kwargs):
    """Problem with selective_state_update keyword arguments (see ssu_specs)."""
    return ssu_specs(**kwargs).map(lambda s: Problem(s, s.build()))

"""ssmkit.distributed: context parallelism, the sequence split over the ranks of a process group.

    from ssmkit.distributed import selective_scan_fn, causal_conv1d_fn, mamba_inner_fn

Each rank of ``group`` holds one contiguous slice of the sequence axis L, in rank order (rank 0
the first tokens); the slices may have unequal lengths (0 included). Every other axis (B, D, N,
the weights) is the same on every rank. The functions take the ``ssmkit.torch`` signatures plus a
keyword ``group`` and return this rank's slice of what the single call on the whole sequence
returns; the gradients flowing back into the local inputs are this rank's slice of the single
call's (per-token inputs: u, delta, z, variable B/C, x, xz), or this rank's share of them
(weights, A, D, delta_bias, constant B/C: summing over the ranks, as data parallelism's
all-reduce does, gives the single call's gradient). ``group=None`` is the plain single call; so is
a group of one rank.

What crosses between ranks is per-rank carries, never activations:

- selective scan: the scan h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t is affine in its
  initial state, so over a slice it is h_out = P h_in + S with S the slice's final state from a
  zero start and P = exp(A sum_t delta_t) the slice's total decay, both (B, D, N). One all_gather
  of (S, P) gives every rank the exclusive scan over ranks h_in(r) = P_{r-1} h_in(r-1) + S_{r-1}.
- causal conv1d: each rank's W - 1 last input columns (its halo), one all_gather of (B, D, W-1);
  a rank shorter than W - 1 takes columns from several earlier ranks, as the single call would.

Per rank and call that is 2 B D N elements of A's dtype (scan) and B D (W-1) of x's (conv),
gathered from every rank (all_gather: world size times that arrives), plus a few int64 of shape
metadata (checked: every rank must agree on B, D, N, W, the dtypes and flags; a mismatch raises
ValueError on every rank, before any data moves). The backward moves the same amounts once more
(the transposed collective: reduce-scatter under NCCL, all-reduce elsewhere, e.g. gloo). The
activations (B, D, L) never move.

Costs: the scan runs twice forward (once from a zero state for S, once from the received h_in:
exact, and the same kernel, against a correction term C_t^T (prod of decays up to t) h_in that
would need its own (B, D, N, L)-sized pass) and twice backward (the carry's gradient flows
through the first scan's final state). So 2x the single-GPU scan work on 1/world of the sequence,
and 2 saved chunk-state sets per layer. The conv runs once (its halo is an ``initial_states``).

Autograd: the collectives run inside ``torch.autograd.Function``s, so ``loss.backward()`` runs
them too, and every rank of the group must run the backward through every call (as with DDP);
each call's graph is the same on every rank, so the collectives meet in the same order. CPU
tensors with the gloo backend run the float64 reference (tests); CUDA tensors with NCCL run the
kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ssmkit.torch as sst

__all__ = ["selective_scan_fn", "causal_conv1d_fn", "mamba_inner_fn", "split_sizes", "shard", "gather",
           "group_size"]


# ---- group helpers ----------------------------------------------------------------------------

def group_size(group) -> int:
    """Ranks in ``group`` (1 for None: no context parallelism)."""
    if group is None:
        return 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ssmkit.distributed: a group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or pass group=None)")
    return dist.get_world_size(group)


def split_sizes(L: int, world_size: int) -> list:
    """Slice lengths of an even split of L over world_size ranks: the first L % world_size
    ranks take one more (L = 37 over 4: [10, 9, 9, 9])."""
    if world_size < 1 or L < 0:
        raise ValueError(f"split_sizes: need L >= 0 and world_size >= 1, got L={L}, world_size={world_size}")
    q, r = divmod(L, world_size)
    return [q + (i < r) for i in range(world_size)]


def shard(x, group, dim: int = -1, sizes=None):
    """This rank's contiguous slice of ``x`` along ``dim`` (a view). ``sizes``: the length of
    every rank's slice (default :func:`split_sizes`); they must sum to x.shape[dim]."""
    world = group_size(group)
    rank = dist.get_rank(group) if group is not None else 0
    L = x.shape[dim]
    sizes = split_sizes(L, world) if sizes is None else [int(s) for s in sizes]
    if len(sizes) != world or sum(sizes) != L or min(sizes) < 0:
        raise ValueError(f"shard: sizes {sizes} must be {world} non-negative lengths summing to {L}")
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def gather(x, group, dim: int = -1):
    """The whole sequence from every rank's slice along ``dim`` (slices of unequal lengths
    allowed); every other axis must agree. Not differentiable (tests, evaluation)."""
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    sizes = _all_gather_ints([x.shape[dim]], x.device, group)
    L_max = max(s[0] for s in sizes)
    pad = list(x.shape)
    pad[dim] = L_max - x.shape[dim]
    xp = torch.cat([x.detach(), x.new_zeros(pad)], dim).contiguous()
    parts = [torch.empty_like(xp) for _ in range(world)]
    dist.all_gather(parts, xp, group=group)
    return torch.cat([p.narrow(dim, 0, s[0]) for p, s in zip(parts, sizes)], dim)


# ---- collectives ------------------------------------------------------------------------------

def _all_gather_ints(values, device, group) -> list:
    """Every rank's list of ints (same length everywhere), as lists, in rank order."""
    world = dist.get_world_size(group)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


def _is_nccl(group) -> bool:
    try:
        return dist.get_backend(group) == "nccl"
    except (RuntimeError, ValueError):     # pragma: no cover - a backend without a name
        return False


def _gather_raw(x, group):
    """(world, *x.shape): every rank's x, in rank order."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((world,) + tuple(x.shape))
    if _is_nccl(group):
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


class _AllGather(torch.autograd.Function):
    """x (...) -> (world, ...). Backward: rank r's gradient is the sum over ranks of their
    gradient for row r (reduce-scatter; all-reduce + pick the row where the backend has none)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_raw(x, group)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        rank = dist.get_rank(group)
        grad = grad.clone(memory_format=torch.contiguous_format)     # reduced in place
        if _is_nccl(group):
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        return grad[rank].clone(), None


def _all_gather(x, group):
    """Differentiable all_gather of a real or complex tensor: (world, *x.shape)."""
    cplx = x.is_complex()
    xr = torch.view_as_real(x) if cplx else x
    needs = torch.is_grad_enabled() and xr.requires_grad
    out = _AllGather.apply(xr, group) if needs else _gather_raw(xr.detach(), group)
    return torch.view_as_complex(out) if cplx else out


# ---- validation -------------------------------------------------------------------------------

_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4, torch.complex64: 5,
               torch.complex128: 6}


def _code(t) -> int:
    return -1 if t is None else (_DTYPE_CODE.get(t.dtype, 0) * 64 + t.dim())


def _agree(op: str, group, device, what: str, local: list, L: int) -> list:
    """All-gather [L] + ``local`` (ints describing shapes, dtypes, flags) and check every rank
    has the same ``local``; returns every rank's L. Raises ValueError on every rank alike."""
    rows = _all_gather_ints([L] + list(local), device, group)
    first = rows[0][1:]
    for r, row in enumerate(rows):
        if row[1:] != first:
            raise ValueError(f"ssmkit.distributed.{op}: the ranks of the group disagree on {what}: "
                             f"rank 0 has {first}, rank {r} has {row[1:]} (every axis but L, every "
                             f"dtype and flag must be the same on every rank)")
    return [row[0] for row in rows]


def _first_rank_only(op, name, t, rank):
    if t is not None and rank != 0:
        raise ValueError(f"ssmkit.distributed.{op}: '{name}' is the state before the whole sequence and belongs "
                         f"to the group's rank 0 (the first slice); pass None on rank {rank}")


# ---- selective scan ---------------------------------------------------------------------------

def _total_decay(delta, A, delta_bias, delta_softplus):
    """P = exp(A * sum_t delta'_t): (B, D, N) in A's dtype, the decay of a whole slice
    (delta' = softplus(delta + delta_bias) as the kernel computes it, in A's precision)."""
    real = torch.float64 if A.dtype in (torch.float64, torch.complex128) else torch.float32
    d = delta.to(real)
    if delta_bias is not None:
        d = d + delta_bias.to(real)[:, None]
    if delta_softplus:
        d = F.softplus(d)                    # threshold 20, as the kernel's
    s = d.sum(-1)                            # (B, D)
    return torch.exp(A[None] * s[..., None].to(A.dtype))


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, group):
    """The distributed scan after validation (see selective_scan_fn)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # Pass 1: this slice's final state from a zero start (rank 0: from the sequence's initial
    # state). D and z do not reach the state.
    _, S = sst.selective_scan_fn(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True,
                                 initial_state=initial_state)
    P = _total_decay(delta, A, delta_bias, delta_softplus)
    SP = _all_gather(torch.stack((S, P)), group)              # (world, 2, B, D, N)
    # Exclusive scan over the ranks; every rank builds all `world` carries (the same graph on
    # every rank, so the gather's backward runs everywhere) and takes its own.
    h = initial_state if initial_state is not None else torch.zeros_like(S)
    H = [h]
    for q in range(world - 1):
        Sq, Pq = SP[q, 0], SP[q, 1]
        # rank 0's S already includes its initial state's decayed contribution
        h = Sq if q == 0 else Pq * h + Sq
        H.append(h)
    h_in = torch.stack(H)[rank]
    # Pass 2: the slice from the received state gives the output (and the local end state).
    return sst.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                 initial_state=h_in)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, group=None):
    """Context-parallel ``ssmkit.torch.selective_scan_fn``: this rank's slice of L.

    u, delta, z: (B, D, L_r), this rank's contiguous slice (L_r may differ between ranks);
    A: (D, N); B, C: constant (D, N) or variable (B, [G,] N, L_r) (complex A: upstream's
    interleaved (B, [G,] N, 2 L_r) or complex); D, delta_bias: (D,). initial_state: (B, D, N),
    the state before the whole sequence, given on rank 0 only (None elsewhere).
    group: a ``torch.distributed`` process group whose rank order is the sequence order
    (``torch.distributed.group.WORLD`` for all processes); None: the plain single call.

    Returns out (B, D, L_r), equal to the single call's out[..., slice], and with
    ``return_last_state`` the state at the end of this rank's slice (B, D, N) (on the last rank
    the single call's last_state). Every input gets its gradient (per-token inputs: this slice's;
    A, D, delta_bias, constant B/C: this rank's share, summing to the single call's).

    Communication per call: one all_gather of 2 B D N elements of A's dtype per rank forward,
    the transposed collective backward, plus a few int64 of shape checks. Compute: the local
    scan twice (forward and backward), see the module docstring.
    """
    if group_size(group) == 1:
        return sst.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state=initial_state)
    rank = dist.get_rank(group)
    _first_rank_only("selective_scan_fn", "initial_state", initial_state, rank)
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"ssmkit.distributed.selective_scan_fn: u must be (B, D, L) and A (D, N), got u "
                         f"{tuple(u.shape)}, A {tuple(A.shape)}")
    local = [u.shape[0], u.shape[1], A.shape[1], _code(u), _code(delta), _code(A), _code(B), _code(C), _code(D),
             _code(z), _code(delta_bias), int(bool(delta_softplus))]
    _agree("selective_scan_fn", group, u.device, "(B, D, N, dtypes/ranks of u, delta, A, B, C, D, z, "
           "delta_bias, delta_softplus)", local, u.shape[-1])
    return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, group)


# ---- causal conv1d ----------------------------------------------------------------------------

def _halo(x, W1, lengths, initial_states, group):
    """(B, D, W-1): the W-1 inputs before this rank's slice, from the earlier ranks' last
    columns (zeros or rank 0's initial_states before the sequence)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    Bsz, Dd, L = x.shape
    start = initial_states if initial_states is not None else x.new_zeros(Bsz, Dd, W1)
    # Each rank's last W-1 columns; rank 0's extended to the left by the sequence's start (its
    # initial_states reach later ranks when its slice is shorter than W-1), the others' by zeros.
    k = min(L, W1)
    lead = start[..., start.shape[-1] - (W1 - k):] if rank == 0 else x.new_zeros(Bsz, Dd, W1 - k)
    tails = _all_gather(torch.cat((lead, x[..., L - k:]), -1), group)        # (world, B, D, W-1)
    # The sequence's columns as far as they may matter: [this rank's start, rank 0's W-1, each
    # later rank's last <= W-1]. Every rank concatenates all of them (the same graph everywhere,
    # so the gather's backward runs on every rank), then takes the window ending at its slice.
    used = [W1] + [min(n, W1) for n in lengths[1:]]
    seq = torch.cat([start] + [tails[q][..., W1 - used[q]:] for q in range(world)], -1)
    end = W1 + sum(used[:rank])
    return seq[..., end - W1:end].contiguous()


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None, *, group=None):
    """Context-parallel ``ssmkit.torch.causal_conv1d_fn``: this rank's slice of L.

    x: (B, D, L_r), this rank's contiguous slice; weight (D, W); bias (D,); initial_states
    (B, D, W-1) before the whole sequence, on rank 0 only. Each rank receives the W-1 inputs
    before its slice (its halo) from the earlier ranks (one all_gather of B D (W-1) elements per
    rank) and runs the local conv with them as ``initial_states``; the halo's gradient goes back
    to its owners in the backward. Returns out (B, D, L_r) (and with ``return_final_states`` the
    W-1 inputs ending this rank's slice). seq_idx is not supported with a group.
    """
    if group_size(group) == 1:
        return sst.causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, return_final_states,
                                    final_states_out, activation)
    rank = dist.get_rank(group)
    if seq_idx is not None:
        raise NotImplementedError("ssmkit.distributed.causal_conv1d_fn: seq_idx is not supported with a group")
    _first_rank_only("causal_conv1d_fn", "initial_states", initial_states, rank)
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"ssmkit.distributed.causal_conv1d_fn: x must be (B, D, L) and weight (D, W), got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    local = [x.shape[0], x.shape[1], weight.shape[-1], _code(x), _code(weight), _code(bias),
             int(activation is not None)]
    lengths = _agree("causal_conv1d_fn", group, x.device, "(B, D, W, dtypes of x, weight, bias, activation)",
                     local, x.shape[-1])
    return _conv(x, weight, bias, initial_states, return_final_states, final_states_out, activation, lengths,
                 group)


def _conv(x, weight, bias, initial_states, return_final_states, final_states_out, activation, lengths, group):
    W1 = weight.shape[-1] - 1
    halo = _halo(x, W1, lengths, initial_states, group) if W1 > 0 else None
    return sst.causal_conv1d_fn(x, weight, bias, None, halo, return_final_states, final_states_out, activation)


# ---- mamba_inner_fn ---------------------------------------------------------------------------

def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None,
                   dt_rms_weight=None, b_c_dt_rms_eps=1e-6, *, group=None):
    """Context-parallel ``ssmkit.torch.mamba_inner_fn``: xz (B, 2D, L_r), this rank's slice,
    -> (B, L_r, out_dim), this rank's slice of the single call's output.

    Composed from the halo conv (:func:`causal_conv1d_fn`), the per-token projections (local:
    x_proj, dt_proj, out_proj, the optional B/C biases and RMS norms) and the distributed scan
    (:func:`selective_scan_fn`); only the conv's halo and the scan's carries cross ranks. The
    weights' gradients are this rank's share (sum over ranks = the single call's). Autograd
    keeps the conv output and delta (``checkpoint_lvl`` is accepted and has no effect here);
    B, C given (constant or variable, this slice's L) as in the single call.
    """
    if group_size(group) == 1:
        return sst.mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                  out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                                  delta_softplus, checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight,
                                  b_c_dt_rms_eps)
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"mamba_inner_fn: checkpoint_lvl must be 0 or 1, got {checkpoint_lvl}")
    if xz.dim() != 3 or A.dim() != 2:
        raise ValueError(f"ssmkit.distributed.mamba_inner_fn: xz must be (B, 2D, L) and A (D, N), got xz "
                         f"{tuple(xz.shape)}, A {tuple(A.shape)}")
    opt = (B, C, D, delta_bias, B_proj_bias, C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight, out_proj_bias,
           conv1d_bias)
    local = [xz.shape[0], xz.shape[1], A.shape[1], conv1d_weight.shape[-1], delta_proj_weight.shape[1],
             x_proj_weight.shape[0], out_proj_weight.shape[0], _code(xz), _code(A), int(bool(delta_softplus))]
    local += [_code(t) for t in opt]
    lengths = _agree("mamba_inner_fn", group, xz.device, "(B, 2D, N, W, R, x_proj rows, out_dim, dtypes, "
                     "which optional arguments are given)", local, xz.shape[-1])

    def conv(x, weight, bias):
        return _conv(x, weight, bias, None, False, None, "silu", lengths, group)

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, None, group)

    return sst._mamba_inner_composed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                     out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                                     C_proj_bias, delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight,
                                     b_c_dt_rms_eps, conv=conv, scan=scan)

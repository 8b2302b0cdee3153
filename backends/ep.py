"""Expert parallelism: slots sharded across ranks, rows moved by all-to-all custom ops inside the graph.

A rank stores only its slots: one ``[S, ...]`` tensor per expert weight kind (``moecc/slot_storage.py`` puts them
in place of the user's expert parameters after the rewrite is checked). Per block and step
(``dispatch.ExpertParallelDispatch`` emits it):

    rank of each routed row  = slot // slots_per_rank, slot chosen from the placement tensors (replicas by share)
    counts exchange          : moecc::all_to_all_counts(send_counts_R) -> recv_counts_R (split sizes for the rows)
    rows exchange            : moecc::all_to_all_rows(x_sorted, send, recv) with each row's slot on its rank
    local experts            : the received rows grouped by local slot, run on the slot tensors
    rows back                : moecc::all_to_all_rows(y, recv, send), then the usual weighted combine

Experts are sharded over the expert-parallel group and replicated over the expert-data-parallel group (the ranks
with the same expert-parallel index; DeepSpeed-MoE's and Megatron's EP x DP): rows never cross it, gradients are
reduced over it.

The exchanges are two small custom ops over ``torch.distributed.all_to_all_single`` (gloo and NCCL alike), with
fakes and a backward, so Dynamo, AOTAutograd and Inductor see them as single nodes. The placement lives in two
buffers, so switching placements within a pool changes data, never the graph.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moecc.costmodel.greedy import static_placement
from moecc.costmodel.placement import EMPTY, Placement, SlotLayout

GOLDEN = 0.6180339887498949  # spreads consecutive tokens evenly over [0, 1) to pick replicas by share


@dataclass(frozen=True, kw_only=True, slots=True)
class EPConfig:
    """Where a block's slots live: the process group and the placement (its layout included)."""

    group_name: str
    rank: int
    placement: Placement
    dp_group_name: str | None = None  # expert data parallelism: the same slots on every rank of this group

    @property
    def local_experts(self) -> list[int]:
        """The expert in each of this rank's slots (``-1``: empty)."""
        return [self.placement.expert_S[s] for s in self.layout.slots_of(self.rank)]

    @property
    def layout(self) -> SlotLayout:
        return self.placement.layout

    def describe(self) -> str:
        per_rank = self.placement.experts_per_rank()
        return "; ".join(f"rank {r}: {row}" for r, row in enumerate(per_rank))


def default_placement(num_experts: int, ranks: int, slots_per_rank: int | None = None) -> Placement:
    """Round-robin expert parallelism (expert e on rank e % R), what every framework does."""
    layout = SlotLayout(ranks=ranks, slots_per_rank=slots_per_rank or math.ceil(num_experts / ranks))
    return static_placement(layout, num_experts)


def placement_tensors(placement: Placement, device=None, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(replica slots [E, W], cumulative replica shares [E, W]) for :func:`choose_slots`.

    W defaults to the number of ranks, the most replicas an expert can have, so every placement of a layout fits
    the same buffers and a switch rewrites them in place.
    """
    per_expert: list[list[tuple[int, float]]] = [[] for _ in range(placement.num_experts)]
    for s, (e, share) in enumerate(zip(placement.expert_S, placement.share_S)):
        if e != EMPTY:
            per_expert[e].append((s, share))
    width = width or placement.layout.ranks
    slots = torch.zeros(placement.num_experts, width, dtype=torch.int64)
    cum = torch.full((placement.num_experts, width), 2.0, dtype=torch.float64)
    for e, reps in enumerate(per_expert):
        total = 0.0
        for j, (s, share) in enumerate(reps):
            total += share
            slots[e, j] = s
            cum[e, j] = total
        slots[e, len(reps):] = reps[-1][0]
        cum[e, len(reps) - 1:] = 2.0  # the last replica takes whatever rounding leaves
    return slots.to(device), cum.to(device)


def choose_slots(idx_N: Tensor, top_k: int, replica_slots: Tensor, replica_cum: Tensor) -> Tensor:
    """The slot each routed row goes to: its expert's replica picked by share, from the token's position."""
    token_N = torch.arange(idx_N.numel(), device=idx_N.device) // top_k
    u_N = torch.frac(token_N.to(torch.float64) * GOLDEN)
    j_N = (u_N.unsqueeze(-1) >= replica_cum[idx_N]).sum(-1).clamp(max=replica_slots.shape[1] - 1)
    return replica_slots[idx_N, j_N]


@torch.library.custom_op("moecc::all_to_all_rows", mutates_args=())
def all_to_all_rows(x: Tensor, send_counts_R: Tensor, recv_counts_R: Tensor, group_name: str,
                    out_rows: int) -> Tensor:
    """Rows to ranks (``send_counts_R[r]`` rows to rank r) and from them; ``out_rows < 0``: as many as arrive.

    A custom op rather than a traced functional collective: its output's row count is one fresh unbacked size,
    which Inductor binds from the tensor in the backward (``sum(counts.tolist())`` was an expression over several
    unbacked symbols that the compiled backward could not bind).
    """
    group = dist.distributed_c10d._resolve_process_group(group_name)
    recv, send = recv_counts_R.tolist(), send_counts_R.tolist()
    # Rows past the sent ones (dropped by a capacity) stay behind; rows past the received ones come back zero.
    out = x.new_zeros((out_rows, *x.shape[1:])) if out_rows >= 0 else x.new_empty((sum(recv), *x.shape[1:]))
    with exchange_errors("rows"):
        dist.all_to_all_single(out[:sum(recv)], x[:sum(send)].contiguous(), recv, send, group=group)
    return out


@contextlib.contextmanager
def exchange_errors(what: str):
    """A dead or stuck peer surfaces as a transport error deep in gloo or NCCL: say what failed and what to do."""
    try:
        yield
    except RuntimeError as exc:
        from moecc.backends.dispatch import collective_timeout

        raise RuntimeError(f"moecc: the expert-parallel exchange of {what} failed: a peer rank exited or did not "
                           f"answer within {collective_timeout().total_seconds():.0f} s (MOECC_COLLECTIVE_TIMEOUT_S)."
                           f" Check the other ranks' logs, then restart from the last checkpoint. ({exc})") from exc


@all_to_all_rows.register_fake
def _(x, send_counts_R, recv_counts_R, group_name, out_rows):
    rows = out_rows if out_rows >= 0 else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, *x.shape[1:]))


def _a2a_setup(ctx, inputs, output):
    x, send, recv, group_name, _ = inputs
    ctx.save_for_backward(send, recv)
    ctx.group_name, ctx.rows = group_name, x.shape[0]


def _a2a_backward(ctx, grad):
    send, recv = ctx.saved_tensors
    return all_to_all_rows(grad.contiguous(), recv, send, ctx.group_name, ctx.rows), None, None, None, None


all_to_all_rows.register_autograd(_a2a_backward, setup_context=_a2a_setup)


@torch.library.custom_op("moecc::all_to_all_counts", mutates_args=())
def all_to_all_counts(send_counts_R: Tensor, group_name: str) -> Tensor:
    """How many rows each rank will send me, from how many I send each."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    recv = torch.empty_like(send_counts_R)
    with exchange_errors("row counts"):
        dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv


@all_to_all_counts.register_fake
def _(send_counts_R, group_name):
    return torch.empty_like(send_counts_R)


@torch.library.custom_op("moecc::all_gather_counts", mutates_args=())
def all_gather_counts(send_counts_R: Tensor, group_name: str) -> Tensor:
    """``[R, R]``: every rank's rows to every rank (row: the sender), for the 2-D exchange's block orders."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    ranks = dist.get_world_size(group)
    out = send_counts_R.new_empty((ranks * send_counts_R.shape[0],))  # gloo gathers into a flat tensor
    with exchange_errors("row counts"):
        dist.all_gather_into_tensor(out, send_counts_R.contiguous(), group=group)
    return out.view(ranks, -1)


@all_gather_counts.register_fake
def _(send_counts_R, group_name):
    return send_counts_R.new_empty((send_counts_R.shape[0], send_counts_R.shape[0]))


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Ranks of an expert-parallel group as nodes of ``node_size`` ranks (group rank = node * node_size + local):
    the process groups of the 2-D exchange."""

    node_size: int
    intra_name: str  # this rank's node
    inter_name: str  # the ranks of this rank's local index, one per node


def block_order(sizes: list[int], order: list[int], device) -> Tensor:
    """The row index that lays out blocks of ``sizes`` (consecutive) in the block order ``order``."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    pieces = [torch.arange(starts[k], starts[k] + sizes[k], device=device) for k in order]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=device)


def _exchange_2d(x: Tensor, C: list[list[int]], me: int, L: int, intra, inter, out: Tensor) -> None:
    """Tutel's 2DH all-to-all: rows sorted by destination rank go first to the node-mate with the destination's
    local index, then across nodes to the destination; ``out`` gets exactly what a flat all-to-all gives (rows by
    source rank, each source's rows in their order). ``C[src][dst]``: rows from src to dst."""
    R = len(C)
    N, (n, j) = R // L, divmod(me, L)  # this rank: node n, local index j
    # Phase 1, within the node: to local index l2 every row bound for (any node, l2), by node.
    mine = [C[me][q] for q in range(R)]
    to_local = block_order(mine, [n2 * L + l2 for l2 in range(L) for n2 in range(N)], x.device)
    send1 = [sum(C[me][n2 * L + l2] for n2 in range(N)) for l2 in range(L)]
    recv1 = [sum(C[n * L + l2][n2 * L + j] for n2 in range(N)) for l2 in range(L)]
    mid = x.new_empty((sum(recv1), *x.shape[1:]))
    with exchange_errors("rows (within the node)"):
        dist.all_to_all_single(mid, x[:sum(send1)].index_select(0, to_local), recv1, send1, group=intra)
    # Phase 2, across nodes: what arrived is by (node-mate, destination node); regroup by destination node.
    arrived = [C[n * L + l2][n2 * L + j] for l2 in range(L) for n2 in range(N)]
    to_node = block_order(arrived, [l2 * N + n2 for n2 in range(N) for l2 in range(L)], x.device)
    send2 = [sum(C[n * L + l2][n2 * L + j] for l2 in range(L)) for n2 in range(N)]
    recv2 = [sum(C[n3 * L + l3][me] for l3 in range(L)) for n3 in range(N)]
    with exchange_errors("rows (across nodes)"):
        dist.all_to_all_single(out[:sum(recv2)], mid.index_select(0, to_node), recv2, send2, group=inter)


@torch.library.custom_op("moecc::all_to_all_rows_2d", mutates_args=())
def all_to_all_rows_2d(x: Tensor, counts_RR: Tensor, transpose: bool, group_name: str, intra_name: str,
                       inter_name: str, node_size: int, out_rows: int) -> Tensor:
    """:func:`all_to_all_rows` as two exchanges (:func:`_exchange_2d`); ``counts_RR[src, dst]`` from
    :func:`all_gather_counts`, read transposed for the way back."""
    resolve = dist.distributed_c10d._resolve_process_group
    group = resolve(group_name)
    C = (counts_RR.t() if transpose else counts_RR).tolist()
    me = dist.get_rank(group)
    received = sum(C[src][me] for src in range(len(C)))
    out = x.new_zeros((out_rows, *x.shape[1:])) if out_rows >= 0 else x.new_empty((received, *x.shape[1:]))
    _exchange_2d(x, C, me, node_size, resolve(intra_name), resolve(inter_name), out)
    return out


@all_to_all_rows_2d.register_fake
def _(x, counts_RR, transpose, group_name, intra_name, inter_name, node_size, out_rows):
    rows = out_rows if out_rows >= 0 else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, *x.shape[1:]))


def _a2a_2d_setup(ctx, inputs, output):
    x, counts, transpose, *names, node_size, _ = inputs
    ctx.save_for_backward(counts)
    ctx.args, ctx.rows = (not transpose, *names, node_size), x.shape[0]


def _a2a_2d_backward(ctx, grad):
    (counts,) = ctx.saved_tensors
    transpose, group_name, intra_name, inter_name, node_size = ctx.args
    return (all_to_all_rows_2d(grad.contiguous(), counts, transpose, group_name, intra_name, inter_name, node_size,
                               ctx.rows), None, None, None, None, None, None, None)


all_to_all_rows_2d.register_autograd(_a2a_2d_backward, setup_context=_a2a_2d_setup)


def exchange_rows_2d(x_ND: Tensor, expert_N: Tensor, send_counts_R: Tensor, group_name: str, intra_name: str,
                     inter_name: str, node_size: int):
    """:func:`exchange_rows` through the 2-D exchange; returns (rows, their expert ids, the counts matrix)."""
    counts_RR = torch.ops.moecc.all_gather_counts(send_counts_R, group_name)
    args = (group_name, intra_name, inter_name, node_size, -1)
    x_recv = torch.ops.moecc.all_to_all_rows_2d(x_ND, counts_RR, False, *args)
    expert_recv = torch.ops.moecc.all_to_all_rows_2d(expert_N, counts_RR, False, *args)
    torch._check(expert_recv.shape[0] == x_recv.shape[0])
    return x_recv, expert_recv, counts_RR


def return_rows_2d(y_MD: Tensor, counts_RR: Tensor, group_name: str, intra_name: str, inter_name: str,
                   node_size: int, rows: int) -> Tensor:
    """The inverse of :func:`exchange_rows_2d` for the expert outputs (differentiable)."""
    return torch.ops.moecc.all_to_all_rows_2d(y_MD, counts_RR, True, group_name, intra_name, inter_name, node_size,
                                              rows)


def exchange_rows(x_ND: Tensor, expert_N: Tensor, send_counts_R: Tensor, group_name: str):
    """Send each rank its rows (rows sorted by destination); returns (rows, their expert ids, recv counts)."""
    recv_counts_R = torch.ops.moecc.all_to_all_counts(send_counts_R, group_name)
    x_recv = torch.ops.moecc.all_to_all_rows(x_ND, send_counts_R, recv_counts_R, group_name, -1)
    expert_recv = torch.ops.moecc.all_to_all_rows(expert_N, send_counts_R, recv_counts_R, group_name, -1)
    torch._check(expert_recv.shape[0] == x_recv.shape[0])
    return x_recv, expert_recv, recv_counts_R


def return_rows(y_MD: Tensor, send_counts_R: Tensor, recv_counts_R: Tensor, group_name: str, rows: int) -> Tensor:
    """The inverse of :func:`exchange_rows` for the expert outputs (differentiable)."""
    return torch.ops.moecc.all_to_all_rows(y_MD, recv_counts_R, send_counts_R, group_name, rows)


def local_slot_of_rows(x_sorted: Tensor, offsets_S: Tensor, slots_per_rank: int) -> Tensor:
    """Each row's slot on its destination rank, for rows sorted by slot (``offsets_S``: end offset of each slot)."""
    rows = torch.arange(x_sorted.shape[0], device=offsets_S.device)
    return torch.searchsorted(offsets_S.to(torch.int64), rows, right=True) % slots_per_rank


def slot_weights(weights: list[Tensor], experts_S: list[int]) -> Tensor:
    """This rank's slots of one weight kind, ``[S, ...]``, read from the user's expert weights (stacked ``[E, ...]``
    or one tensor per expert). Only in the graph the rewrite is checked on: it keeps gradients flowing to the
    user's weights; the compiled graph reads the slot tensors themselves. An empty slot holds expert 0's weights
    and never receives a row."""
    ids = [max(e, 0) for e in experts_S]
    if len(weights) == 1:  # stacked [E, ...]; a ModuleList gives one tensor per expert, and E >= 2
        return weights[0][ids]
    return torch.stack([weights[e] for e in ids])


def rank_counts(offsets_S: Tensor, slots_per_rank: int) -> Tensor:
    """Rows per destination rank from per-slot end offsets."""
    counts_S = torch.diff(offsets_S.to(torch.int64), prepend=offsets_S.new_zeros(1, dtype=torch.int64))
    return counts_S.view(-1, slots_per_rank).sum(1)


def expert_parallel_config(group, num_experts: int, placement=None, slots_per_rank: int | None = None,
                           dp_group=None) -> EPConfig:
    """The layout of one block over ``group``: ``placement`` (a costmodel ``Placement`` or a list per rank of the
    expert in each slot), else round-robin with ``slots_per_rank`` (default ``ceil(E / ranks)``). ``dp_group``:
    the expert-data-parallel group (the same slots on each of its ranks)."""
    ranks = dist.get_world_size(group)
    if placement is None:
        placement = default_placement(num_experts, ranks, slots_per_rank)
    elif not isinstance(placement, Placement):
        placement = placement_from_lists(placement, num_experts)
    if placement.layout.ranks != ranks:
        raise ValueError(f"moecc: the placement is for {placement.layout.ranks} ranks but the group has {ranks}; "
                         "pass options={'moecc.placement': ...} laid out for this world size")
    if placement.num_experts != num_experts:
        raise ValueError(f"moecc: the placement has {placement.num_experts} experts, the block {num_experts}")
    dp_name = dp_group.group_name if dp_group is not None and dist.get_world_size(dp_group) > 1 else None
    return EPConfig(group_name=group.group_name, rank=dist.get_rank(group), placement=placement,
                    dp_group_name=dp_name)


def placement_from_lists(per_rank: list[list[int]], num_experts: int) -> Placement:
    """A placement from the expert in each slot, per rank; replicas split their expert's tokens evenly."""
    layout = SlotLayout(ranks=len(per_rank), slots_per_rank=max(len(r) for r in per_rank))
    counts = [0] * num_experts
    for row in per_rank:
        for e in row:
            if e != EMPTY:
                counts[e] += 1
    expert_S, share_S = [], []
    for row in per_rank:
        row = list(row) + [EMPTY] * (layout.slots_per_rank - len(row))
        expert_S += row
        share_S += [0.0 if e == EMPTY else 1.0 / counts[e] for e in row]
    return Placement(layout=layout, num_experts=num_experts, expert_S=tuple(expert_S), share_S=tuple(share_S))


def first_disagreeing_rank(mine, group=None):
    """(rank, its value) of the first rank of ``group`` whose ``mine`` differs from this rank's, or None: the
    compile-time and switch-time agreement checks that must refuse on every rank instead of hanging."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return next(((r, theirs) for r, theirs in enumerate(everyone) if theirs != mine), None)


def check_same_on_all_ranks(config: EPConfig, block_path: str) -> None:
    """Refuse, on every rank and before any all-to-all, a layout that differs between ranks (it would hang)."""
    group = dist.distributed_c10d._resolve_process_group(config.group_name)
    mine = (block_path, config.layout.ranks, config.layout.slots_per_rank, config.placement.expert_S,
            tuple(round(s, 6) for s in config.placement.share_S))
    differs = first_disagreeing_rank(mine, group)
    if differs is not None:
        r, theirs = differs
        raise ValueError(f"moecc: expert layout differs between ranks for block {block_path!r}: "
                         f"rank {config.rank} has {mine[1:]}, rank {r} has {theirs[1:]}; "
                         "every rank must compile the same model with the same moecc options")


def agree_on_outcome(config: EPConfig, reason: str | None) -> str | None:
    """Every rank keeps the rewrite only if every rank's check passed; the first failing rank's reason wins."""
    group = dist.distributed_c10d._resolve_process_group(config.group_name)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, reason, group=group)
    failed = [(r, why) for r, why in enumerate(everyone) if why is not None]
    return None if not failed else f"rank {failed[0][0]}: {failed[0][1]}"


def sum_over_ranks(config: EPConfig):
    """A function summing a tensor over the config's group (eager; used by the rewrite's gradient check)."""
    group = dist.distributed_c10d._resolve_process_group(config.group_name)

    def reduce(t: Tensor) -> Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=group)
        return t

    return reduce

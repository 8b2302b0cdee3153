"""Dispatch strategies: where a rewritten block's routed rows go between the sort by slot and the combine.

The slot rewrite (``passes/rewrite_slots.py``) emits three stages: route (slot of each routed row, sort by slot),
dispatch + experts, combine. A strategy owns the middle one and everything that differs with it: the placement
buffers the graph reads, how a row's slot is chosen, how rows reach the slots' experts and come back, and how
ranks agree at compile time. As torchtitan's token dispatchers, expert parallelism is the local strategy plus
two exchanges; capacity dropping and hierarchical all-to-all would be further strategies with the same interface.

Legend: N routed rows on this rank, M rows received, S slots, E experts, R ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import operator
import os
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, fx

from moecc.costmodel.placement import Placement

from . import ep as ep_ops
from .ep import EPConfig, default_placement


class ExpertStage(Protocol):
    """The experts of one block, as the rewrite emits them (``passes/rewrite_slots.ExpertStage``)."""

    def sorted_rows(self, graph: fx.Graph, x_sorted: fx.Node, offsets_S: fx.Node, expert_sorted: fx.Node) -> fx.Node:
        """Outputs of rows already grouped by slot, in that order."""

    def rows(self, graph: fx.Graph, rows_M: fx.Node, order_M: fx.Node, inverse_M: fx.Node, offsets_E: fx.Node,
             expert_M: fx.Node) -> fx.Node:
        """Outputs of rows in any order (``order_M`` groups them by expert), back in that order."""


def emit_getitem(graph: fx.Graph, node: fx.Node, i) -> fx.Node:
    """``node[i]`` as a graph node (an output of a multi-output op, or an index)."""
    return graph.call_function(operator.getitem, (node, i))


class LocalDispatch:
    """Every expert in its own slot on this process (slot = expert): rows never leave it.

    The fused expert op may then gather token rows and combine outputs itself (``fuses_gather_combine``).
    """

    fuses_gather_combine = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.placement: Placement = default_placement(num_experts, 1)

    @property
    def num_slots(self) -> int:
        return self.num_experts

    def buffers(self, device) -> dict[str, Tensor]:
        """The placement buffers the graph reads (data, so a switch rewrites them and never recompiles)."""
        return {"slot_of_expert": torch.arange(self.num_experts, device=device)}

    def emit_slots(self, graph: fx.Graph, idx_N: fx.Node, top_k: int, buffers: dict[str, fx.Node]) -> fx.Node:
        return emit_getitem(graph, buffers["slot_of_expert"], idx_N)

    def emit_experts(self, graph: fx.Graph, experts: ExpertStage, x_sorted: fx.Node, expert_sorted: fx.Node,
                     offsets_S: fx.Node) -> fx.Node:
        return experts.sorted_rows(graph, x_sorted, offsets_S, expert_sorted)

    def agree(self, reason: str | None) -> str | None:
        """The compile-time outcome every process keeps (one process: its own)."""
        return reason

    reduce_grads = None  # the check compares each process's gradients as they are

    def describe(self) -> str:
        return ""

    def send_rows(self, idx_N: Tensor, top_k: int, buffers: dict[str, Tensor]) -> list[int] | None:
        return None


class ExpertParallelDispatch(LocalDispatch):
    """Slots sharded over the ranks of a process group (``backends/ep.py``): rows sorted by slot are sorted by
    destination rank; counts then rows go out by all-to-all, are grouped by expert on arrival, and come back by
    the inverse all-to-all. Every compile-time decision is agreed across the group, or collectives would hang.
    """

    fuses_gather_combine = False

    def __init__(self, config: EPConfig):
        super().__init__(config.placement.num_experts)
        self.config = config
        self.placement = config.placement

    @property
    def num_slots(self) -> int:
        return self.config.layout.num_slots

    def buffers(self, device) -> dict[str, Tensor]:
        slots, cum = ep_ops.placement_tensors(self.config.placement, device)
        return {"replica_slots": slots, "replica_cum": cum}

    def emit_slots(self, graph, idx_N, top_k, buffers):
        return graph.call_function(ep_ops.choose_slots, (idx_N, top_k, buffers["replica_slots"],
                                                         buffers["replica_cum"]))

    def emit_experts(self, graph, experts, x_sorted, expert_sorted, offsets_S):
        group, per_rank = self.config.group_name, self.config.layout.slots_per_rank
        send_R = graph.call_function(ep_ops.rank_counts, (offsets_S, per_rank))
        slot_sorted = graph.call_function(ep_ops.local_slot_of_rows, (x_sorted, offsets_S, per_rank))
        exchanged = graph.call_function(ep_ops.exchange_rows, (x_sorted, slot_sorted, send_R, group))
        x_recv, slot_recv, recv_R = (emit_getitem(graph, exchanged, i) for i in range(3))
        local = graph.call_function(torch.ops.moecc.sort_by_slot.default, (slot_recv, per_rank))
        order_M, inverse_M, offsets_L = (emit_getitem(graph, local, i) for i in range(3))
        y_recv = self._slot_stage(graph, experts).rows(graph, x_recv, order_M, inverse_M, offsets_L, slot_recv)
        rows = graph.call_method("size", (x_sorted, 0))
        return graph.call_function(ep_ops.return_rows, (y_recv, send_R, recv_R, group, rows))

    def _slot_stage(self, graph: fx.Graph, experts):
        """The same experts over this rank's slots: every grouped weight becomes one ``[S, ...]`` node
        (``ep.slot_weights``, tagged ``SLOT_WEIGHTS`` so ``moecc/slot_storage.py`` can put the slot tensors in its
        place once the rewrite is checked), and rows are grouped by local slot instead of expert."""
        template, local = experts.block.template, self.config.local_experts
        env, new_refs = dict(experts.env), {}
        for ref in template.weights.values():  # keyed by the weights' nodes: the fused match holds copies of refs
            if tuple(ref.nodes) in new_refs:
                continue
            node = graph.call_function(ep_ops.slot_weights, ([env[n] for n in ref.nodes], local))
            node.meta["val"] = _slot_meta(ref.nodes, len(local))
            node.meta[SLOT_WEIGHTS] = (id(self), len(new_refs))
            env[node] = node
            new_refs[tuple(ref.nodes)] = dataclasses.replace(ref, nodes=[node])
        weights = {expr: new_refs[tuple(ref.nodes)] for expr, ref in template.weights.items()}
        block = dataclasses.replace(experts.block, template=dataclasses.replace(template, weights=weights))
        ffn = experts.ffn
        if ffn is not None:
            ffn = dataclasses.replace(ffn, **{part: new_refs[tuple(getattr(ffn, part).nodes)]
                                              for part in ("w1", "w3", "w2") if getattr(ffn, part) is not None})
        return type(experts)(block, env, ffn)

    def agree(self, reason):
        return ep_ops.agree_on_outcome(self.config, reason)

    @property
    def reduce_grads(self):
        return ep_ops.sum_over_ranks(self.config)

    def describe(self) -> str:
        return self.config.describe()

    def send_rows(self, idx_N, top_k, buffers):
        slots = ep_ops.choose_slots(idx_N.reshape(-1), top_k, buffers["replica_slots"], buffers["replica_cum"])
        layout = self.config.layout
        return torch.bincount(slots // layout.slots_per_rank, minlength=layout.ranks).tolist()


Dispatch = LocalDispatch  # the interface; ExpertParallelDispatch is the other strategy

_DEDICATED: dict = {}


def _dedicated(group):
    """A process group of the same ranks used by moecc alone: DDP all-reduces on the user's group asynchronously,
    from autograd hooks, and two streams of collectives on one group could pair up in a different order on
    different ranks."""
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _DEDICATED:
        _DEDICATED[ranks] = dist.new_group(list(ranks), use_local_synchronization=True,
                                           timeout=collective_timeout())
    return _DEDICATED[ranks]


def collective_timeout() -> datetime.timedelta:
    """How long an expert-parallel exchange waits for a peer before it fails (``MOECC_COLLECTIVE_TIMEOUT_S``,
    default 300 s): a rank that died mid-step makes the others raise, not hang."""
    return datetime.timedelta(seconds=float(os.environ.get("MOECC_COLLECTIVE_TIMEOUT_S", "300")))


SLOT_WEIGHTS = "moecc_slot_weights"  # node meta: (id of the strategy, weight kind) of an ``ep.slot_weights`` node


def _slot_meta(weight_nodes: list[fx.Node], slots: int) -> Tensor:
    """The fake value of a ``[S, ...]`` slot-weight node, from the user's weights' recorded values."""
    first = weight_nodes[0].meta.get("example_value", weight_nodes[0].meta.get("val"))
    shape = first.shape[1:] if len(weight_nodes) == 1 else first.shape
    return torch.empty((slots, *shape), dtype=first.dtype, device="meta")


def choose_dispatch(*, expert_parallel: bool = True, group=None, placement=None, slots_per_rank: int | None = None,
                    dp_group=None):
    """A function from a block's expert count to its strategy, for one compile.

    Expert parallelism when a process group with several ranks is initialised (and ``expert_parallel``);
    ``placement`` is a ``Placement`` or a list per rank of the expert in each slot; ``dp_group`` is the
    expert-data-parallel group. Every rank checks, before any all-to-all, that all ranks asked for the same layout
    (:func:`ep.check_same_on_all_ranks`).
    """
    if not expert_parallel or not dist.is_available() or not dist.is_initialized():
        return lambda path, num_experts: LocalDispatch(num_experts)
    group = group or dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return lambda path, num_experts: LocalDispatch(num_experts)
    group, dp_group = _dedicated(group), _dedicated(dp_group) if dp_group is not None else None

    def for_block(path: str, num_experts: int) -> ExpertParallelDispatch:
        config = ep_ops.expert_parallel_config(group, num_experts, placement, slots_per_rank, dp_group)
        ep_ops.check_same_on_all_ranks(config, path)  # raises on every rank, before any all-to-all
        return ExpertParallelDispatch(config)

    return for_block

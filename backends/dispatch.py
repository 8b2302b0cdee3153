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

    def __init__(self, config: EPConfig, chunks: int | str = 1, hierarchy: ep_ops.Hierarchy | None = None,
                 all_to_all: str = "flat"):
        super().__init__(config.placement.num_experts)
        self.config = config
        self.placement = config.placement
        self.chunks = chunks  # > 1: rows in pipelined chunks (``backends/ep_overlap.py``); "auto": the cost model's
        self.hierarchy = hierarchy  # the 2-D exchange's node groups, or None: flat
        self.all_to_all = all_to_all  # "auto": the cost model picks flat or 2-D (when ``hierarchy`` exists)
        self.overlapped = False  # set when the experts were emitted: whether the chunks were used
        self.chosen: str = ""  # what the cost model chose and predicted, when asked to choose

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
        stage = self._slot_stage(graph, experts)
        rows = graph.call_method("size", (x_sorted, 0))
        if self.all_to_all == "auto" and self.chunks not in ("auto", 1):
            self.hierarchy = None  # chunks overlap on the flat exchange only
        if self.chunks == "auto" or (self.all_to_all == "auto" and self.hierarchy is not None):
            self._choose(experts, stage, x_sorted)
        self.overlapped = self.chunks > 1 and self.hierarchy is None and stage.ffn is not None
        if self.overlapped:
            from moecc.passes.rewrite_slots import ffn_weights

            from . import ep_overlap

            recv_R = graph.call_function(torch.ops.moecc.all_to_all_counts.default, (send_R, group))
            return graph.call_function(ep_overlap.pipelined_ffn, (
                x_sorted, slot_sorted, send_R, recv_R, group, *ffn_weights(stage.ffn, stage.env),
                list(stage.ffn.flags), stage.ffn.activation, per_rank, self.chunks))
        if self.hierarchy is not None:
            h = self.hierarchy
            names = (group, h.intra_name, h.inter_name, h.node_size)
            exchanged = graph.call_function(ep_ops.exchange_rows_2d, (x_sorted, slot_sorted, send_R, *names))
        else:
            exchanged = graph.call_function(ep_ops.exchange_rows, (x_sorted, slot_sorted, send_R, group))
        x_recv, slot_recv, counts = (emit_getitem(graph, exchanged, i) for i in range(3))
        local = graph.call_function(torch.ops.moecc.sort_by_slot.default, (slot_recv, per_rank))
        order_M, inverse_M, offsets_L = (emit_getitem(graph, local, i) for i in range(3))
        y_recv = stage.rows(graph, x_recv, order_M, inverse_M, offsets_L, slot_recv)
        if self.hierarchy is not None:
            return graph.call_function(ep_ops.return_rows_2d, (y_recv, counts, *names, rows))
        return graph.call_function(ep_ops.return_rows, (y_recv, send_R, counts, group, rows))

    def _choose(self, experts, stage, x_sorted: fx.Node) -> None:
        """Resolve the "auto" options of this layer with the cost model (``costmodel/step.choose_exchange``), on
        the traced shapes; every rank keeps group rank 0's choice, as a differing one would hang."""
        from moecc.costmodel.profile import builtin_profile
        from moecc.costmodel.step import choose_exchange
        from moecc.passes.graph_utils import fake

        x = fake(experts.block.x)  # the block's input: tokens x d_model
        top_k = experts.block.spec.router.top_k
        tokens = 1
        for size in x.shape[:-1]:
            tokens *= _hint(size, 64)
        rows = tokens * top_k
        layout = self.config.layout
        d_ffn, matrices = _ffn_width(stage, int(x.shape[-1]))
        profile = builtin_profile("cpu" if x.device.type == "cpu" else "h100-sxm-8x")
        choice = choose_exchange(profile, tokens=max(1, rows // top_k), d_model=int(x.shape[-1]), d_ffn=d_ffn,
                                 top_k=top_k, num_experts=self.num_experts, ranks=layout.ranks,
                                 slots_per_rank=layout.slots_per_rank, act_bytes=x.element_size(),
                                 param_bytes=x.element_size(), matrices=matrices, placement=self.placement,
                                 node_size=self.hierarchy.node_size if self.hierarchy else layout.ranks,
                                 max_chunks=8 if self.chunks == "auto" else 1)
        decided = [(choice.chunks if self.chunks == "auto" else self.chunks,
                    choice.hierarchical if self.all_to_all == "auto" else self.all_to_all == "2d",
                    choice.predicted_s)]
        group = dist.distributed_c10d._resolve_process_group(self.config.group_name)
        dist.broadcast_object_list(decided, group_src=0, group=group)
        chunks, hierarchical, predicted_s = decided[0]
        self.chunks = chunks
        if not hierarchical:
            self.hierarchy = None
        self.chosen = f"cost model ({profile.name}): {predicted_s * 1e3:.3g} ms/step"

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
        return f"{self.config.describe()} ({self.exchange()})"

    def exchange(self) -> str:
        """How rows travel: flat or 2-D, the chunks, and what the cost model predicted when it chose them (the
        report's layout column says it)."""
        if self.hierarchy is not None:
            nodes = self.config.layout.ranks // self.hierarchy.node_size
            how = f"2-D all-to-all {nodes} nodes x {self.hierarchy.node_size}, 1 chunk"
        elif self.overlapped:
            how = f"flat all-to-all, {self.chunks} chunks overlapped"
        elif self.chunks not in ("auto", 1):
            how = f"flat all-to-all, 1 chunk ({self.chunks} asked: only the fused expert FFN overlaps)"
        else:
            how = "flat all-to-all, 1 chunk"
        return f"{how}; {self.chosen}" if self.chosen else how

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
    return _group_of(tuple(dist.get_process_group_ranks(group)))


def _group_of(ranks: tuple[int, ...]):
    """moecc's own process group of these global ranks (created once; only its members take part)."""
    if ranks not in _DEDICATED:
        _DEDICATED[ranks] = dist.new_group(list(ranks), use_local_synchronization=True,
                                           timeout=collective_timeout())
    return _DEDICATED[ranks]


def collective_timeout() -> datetime.timedelta:
    """How long an expert-parallel exchange waits for a peer before it fails (``MOECC_COLLECTIVE_TIMEOUT_S``,
    default 300 s): a rank that died mid-step makes the others raise, not hang."""
    return datetime.timedelta(seconds=float(os.environ.get("MOECC_COLLECTIVE_TIMEOUT_S", "300")))


def _hint(size, default: int) -> int:
    """A traced size as a number: its value when static, its hint when symbolic, else ``default``."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    return int(hint) if isinstance(hint, int) else default


def _ffn_width(stage, d_model: int) -> tuple[int, int]:
    """(hidden width, weight matrices) of a stage's experts for the cost model: the fused FFN's, else the
    template's weights as one matrix of the same size per expert."""
    from .kernels_cpu import weight_io

    if stage.ffn is not None:
        from moecc.passes.rewrite_slots import ffn_weights

        w1, w3, w2 = ([n.meta["val"] for n in nodes] for nodes in ffn_weights(stage.ffn, stage.env))
        _, ffn, _ = weight_io(w2, bool(stage.ffn.flags[2]))
        return int(ffn), 3 if (w3 or stage.ffn.flags[3]) else 2
    per_expert = sum(ref.nodes[0].meta["val"][0].numel() for ref in stage.block.template.weights.values())
    return max(1, int(per_expert) // max(1, d_model)), 1


SLOT_WEIGHTS = "moecc_slot_weights"  # node meta: (id of the strategy, weight kind) of an ``ep.slot_weights`` node


def _slot_meta(weight_nodes: list[fx.Node], slots: int) -> Tensor:
    """The fake value of a ``[S, ...]`` slot-weight node, from the user's weights' recorded values."""
    first = weight_nodes[0].meta.get("example_value", weight_nodes[0].meta.get("val"))
    shape = first.shape[1:] if len(weight_nodes) == 1 else first.shape
    return torch.empty((slots, *shape), dtype=first.dtype, device="meta")


def hierarchy_of(group, node_size: int | None) -> tuple[ep_ops.Hierarchy | None, str]:
    """The 2-D exchange's node groups of ``group`` with ``node_size`` ranks per node (global rank // node_size is
    the node), or (None, why it stays flat). Every rank of ``group`` must call it (it creates process groups)."""
    if not node_size:
        return None, "no node size (moecc.node_size, or LOCAL_WORLD_SIZE under torchrun)"
    ranks = dist.get_process_group_ranks(group)
    nodes: dict[int, list[int]] = {}
    for r in ranks:
        nodes.setdefault(r // node_size, []).append(r)
    per_node = {len(v) for v in nodes.values()}
    if len(nodes) < 2 or per_node == {1}:
        return None, f"the group's {len(ranks)} ranks span {len(nodes)} node(s) of {node_size}: nothing to split"
    if len(per_node) != 1 or ranks != sorted(ranks) or any(
            v != ranks[i * len(v):(i + 1) * len(v)] for i, v in enumerate(nodes.values())):
        return None, f"the group's ranks {ranks} are not whole nodes of {node_size} in order"
    local = per_node.pop()
    me = ranks.index(dist.get_rank())
    node, index = divmod(me, local)
    intra = _group_of(tuple(ranks[node * local:(node + 1) * local]))
    inter = _group_of(tuple(ranks[index::local]))
    return ep_ops.Hierarchy(local, intra.group_name, inter.group_name), ""


def _node_size(asked: int | None) -> int | None:
    if asked:
        return asked
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local and local.isdigit() else None


def choose_dispatch(*, expert_parallel: bool = True, group=None, placement=None, slots_per_rank: int | None = None,
                    dp_group=None, overlap_chunks=1, all_to_all: str = "flat", node_size: int | None = None):
    """A function from a block's expert count to its strategy, for one compile.

    Expert parallelism when a process group with several ranks is initialised (and ``expert_parallel``);
    ``placement`` is a ``Placement`` or a list per rank of the expert in each slot; ``dp_group`` is the
    expert-data-parallel group. Every rank checks, before any all-to-all, that all ranks asked for the same layout
    (:func:`ep.check_same_on_all_ranks`). ``overlap_chunks``: pipelined chunks per layer (``backends/ep_overlap``);
    ``all_to_all``: "flat", "2d" (nodes of ``node_size`` ranks, default ``LOCAL_WORLD_SIZE``) or "auto" (2-D
    where the cost model prices it faster and the group spans several nodes); "auto" chunks likewise.
    """
    if not expert_parallel or not dist.is_available() or not dist.is_initialized():
        return lambda path, num_experts: LocalDispatch(num_experts)
    group = group or dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return lambda path, num_experts: LocalDispatch(num_experts)
    group, dp_group = _dedicated(group), _dedicated(dp_group) if dp_group is not None else None
    hierarchy = None
    if all_to_all != "flat":
        hierarchy, why = hierarchy_of(group, _node_size(node_size))
        if hierarchy is None and all_to_all == "2d":
            raise ValueError(f"moecc: option moecc.all_to_all='2d' needs several nodes of several ranks, but {why}; "
                             "set moecc.node_size to the ranks per node, or use 'flat'")

    def for_block(path: str, num_experts: int) -> ExpertParallelDispatch:
        config = ep_ops.expert_parallel_config(group, num_experts, placement, slots_per_rank, dp_group)
        ep_ops.check_same_on_all_ranks(config, path)  # raises on every rank, before any all-to-all
        return ExpertParallelDispatch(config, overlap_chunks, hierarchy, all_to_all)

    return for_block

"""Rewrite one detected MoE block into expert-slot form.

The user's router stays as it is. From its top-k expert ids and weights we emit:

    slot_TK            = placement_E[experts_TK]               (the placement is a buffer: data, not code)
    order_N, inv_N, offsets_S = moecc::sort_by_slot(slot_TK.view(-1), S)
    x_sorted_ND        = x_TD[order_N // K]                     (gather, fused by Inductor)
    y_sorted_ND        = lifted expert template (moecc::grouped_mm + the user's elementwise ops)
    out_TD             = (y_sorted_ND[inv_N].view(T, K, D) * weights_TK[..., None]).sum(1)

and send ``out_TD`` to every later user of the block's routed output, then erase the old dispatch loop.
Between the sort and the combine, a dispatch strategy (``backends/dispatch.py``) moves the rows to the experts of
their slots: on this process, or across ranks under expert parallelism.

Which graph values are the routing weights and the routed output is decided numerically: the original graph is
run once on the real inputs, and the candidate nodes whose values the slot-form computation reproduces win.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from moecc.backends.dispatch import Dispatch, emit_getitem

from .detect import Block
from .expert_template import emit_grouped
from .ffn_match import FusedFFN
from .graph_utils import (
    ancestors,
    computes_in_low_precision,
    descendants,
    fake,
    is_call,
    is_inplace,
    module_path,
    numel_key,
    same_shape,
    source_path,
    target_name,
)

_LOCAL_ALLOCS = {"zeros", "zeros_like", "empty", "empty_like", "new_zeros", "new_empty", "full", "full_like",
                 "new_full", "ones_like"}


class RewriteError(Exception):
    """The block cannot be rewritten safely; the message is the report's reason."""


def _weight_candidates(block: Block, node_index) -> list[fx.Node]:
    """Float [.., K] tensors computed from the top-k by the router: the routing weights, latest first."""
    idx_fake = fake(block.indices)
    expert_nodes = descendants(block.template.sources)
    # Weights permuted into expert order (torchtitan's ``topk_scores_experts_sorted_N``) are not [tokens, k]: near
    # uniform router scores let them pass the numeric probe, and only the gradient check would catch it.
    after = descendants([block.topk])
    permuted = descendants([n for n in after if is_call(n, torch.argsort, "argsort", torch.sort, "sort")])
    found = []
    for n in after - permuted:
        value = fake(n)
        if value is None or n in expert_nodes or not value.is_floating_point():
            continue
        if same_shape(value, idx_fake) or (value.dim() == 1 and numel_key(value) == numel_key(idx_fake)):
            found.append(n)
    return sorted(found, key=node_index.__getitem__, reverse=True)


def _output_candidates(block: Block, node_index, tokens_numel) -> list[tuple[fx.Node, fx.Node]]:
    """Values that may hold the routed output, each with the node after which it holds it (itself, or the last
    in-place write into it), in graph order."""
    ends = block.template.per_expert_outputs
    fed = [descendants([e]) | {e} for e in ends]
    after_all = set.intersection(*fed)
    last_end = max(node_index[e] for e in ends)
    found: dict[fx.Node, fx.Node] = {n: n for n in after_all if node_index[n] > last_end and not is_inplace(n)}
    # An accumulator (``out.index_add_(...)`` once per expert) holds the output after its last mutation.
    mutations: dict[fx.Node, list[fx.Node]] = {}
    for n in set.union(*fed):
        if is_inplace(n) and isinstance(n.args[0], fx.Node):
            mutations.setdefault(n.args[0], []).append(n)
    for base, muts in mutations.items():
        if all(any(m in f for m in muts) for f in fed):
            found[base] = max(muts, key=node_index.__getitem__)
    out = []
    for n, holder in found.items():
        value = fake(n)
        if value is not None and value.is_floating_point() and numel_key(value) == tokens_numel:
            out.append((n, holder))
    return sorted(out, key=lambda nh: node_index[nh[1]])


def _record(gm: fx.GraphModule, inputs, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of ``wanted`` nodes in one eager run of ``gm``."""
    rec = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        rec.run(*_unmutated(gm, inputs))
    return {n: rec.env[n] for n in wanted if n in rec.env}


def _unmutated(gm: fx.GraphModule, inputs) -> list:
    """``inputs`` with a copy of each one the graph writes in place (torchtitan's ``tokens_per_expert_E.add_``),
    so that the recording run leaves the model's buffers as they were."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {n for n in placeholders if any(is_inplace(u) and u.args and u.args[0] is n for u in n.users)}
    return [t.clone() if n in written and isinstance(t, torch.Tensor) else t for n, t in zip(placeholders, inputs)]


@dataclass(slots=True)
class ExpertStage:
    """The experts of one block as graph code: the lifted template, or one fused ``moecc::expert_ffn``.

    A dispatch strategy calls it with the rows that reach this process's slots (``backends.dispatch``).
    """

    block: Block
    env: dict
    ffn: FusedFFN | None = None

    def sorted_rows(self, graph: fx.Graph, x_sorted: fx.Node, offsets_S: fx.Node, expert_sorted: fx.Node) -> fx.Node:
        """Outputs of rows grouped by slot, in that order (the lifted template: one grouped GEMM per weight)."""
        return emit_grouped(graph, self.block.template, self.env, x_sorted, offsets_S, expert_sorted)

    def rows(self, graph: fx.Graph, rows_M: fx.Node, order_M: fx.Node, inverse_M: fx.Node, offsets_E: fx.Node,
             expert_M: fx.Node) -> fx.Node:
        """Outputs of rows in any order that ``order_M`` groups by expert, returned in the rows' own order."""
        from moecc.backends import ops

        if self.ffn is not None:  # each row once, unweighted, back in its own order: one op
            ones = graph.call_method("new_ones", (rows_M, (graph.call_method("size", (rows_M, 0)),)))
            return graph.call_function(ops.routed_ffn, (rows_M, order_M, ones, offsets_E,
                                                        *ffn_weights(self.ffn, self.env), list(self.ffn.flags),
                                                        self.ffn.activation))
        y_sorted = self.sorted_rows(graph, _permute(graph, rows_M, order_M, inverse_M), offsets_E,
                                    emit_getitem(graph, expert_M, order_M))
        return _permute(graph, y_sorted, inverse_M, order_M)


def _permute(graph: fx.Graph, rows: fx.Node, index: fx.Node, inverse: fx.Node) -> fx.Node:
    return graph.call_function(torch.ops.moecc.permute_rows.default, (rows, index, inverse))


def emit_slot_moe(graph: fx.Graph, block: Block, env: dict, buffers: dict[str, fx.Node], dispatch: Dispatch,
                  ffn: FusedFFN | None = None) -> fx.Node:
    """Insert the slot-form computation; ``env`` maps x, indices, weights and expert weights to graph nodes.

    Three stages: route (load count, slot of each routed row, capacity, sort by slot), dispatch + experts (the
    strategy's), combine (weighted sum back to token order). ``buffers`` are the nodes of the strategy's placement
    buffers and of the load counter. With ``ffn`` the experts run as one ``moecc::expert_ffn``; where the strategy
    allows it, that op also gathers the token rows and combines. Returns out_TD (tokens flattened).
    """
    from moecc.backends import ops  # noqa: F401  (registers torch.ops.moecc)

    top_k = block.spec.router.top_k
    width = fake(block.rows_from).shape[-1]
    x_TD = graph.call_method("reshape", (env[block.rows_from], -1, width))
    idx_N = graph.call_method("reshape", (env[block.indices], -1))
    w_TK = graph.call_method("reshape", (env["weights"], -1, top_k))

    # Route. Tokens per expert, counted on the device every step; the runtime reads the sum every N steps.
    counts_E = graph.call_function(torch.histc, (graph.call_method("float", (idx_N,)),),
                                   {"bins": dispatch.num_experts, "min": 0, "max": dispatch.num_experts - 1})
    graph.call_method("add_", (buffers["load_counts"], counts_E))
    slot_N = dispatch.emit_slots(graph, idx_N, top_k, buffers)
    num_slots, dropped_slot = dispatch.num_slots, 0
    if "capacity_factor" in buffers:
        keep_N = graph.call_function(capacity_mask, (idx_N, top_k, dispatch.num_experts, buffers["capacity_factor"]))
        # Dropped rows go to one extra slot past the last: sorted to the end, never sent, never computed.
        slot_N = graph.call_function(torch.where, (keep_N, slot_N, num_slots))
        # where, not a product: a dropped row's weight may be NaN (NaN logits), and 0 * NaN is NaN in the combine
        w_TK = graph.call_function(torch.where, (graph.call_method("view", (keep_N, -1, top_k)), w_TK, 0.0))
        dropped_slot = 1
    sorted_ = graph.call_function(torch.ops.moecc.sort_by_slot.default, (slot_N, num_slots + dropped_slot))
    order_N, inverse_N, offsets_S = (emit_getitem(graph, sorted_, i) for i in range(3))
    if dropped_slot:
        offsets_S = emit_getitem(graph, offsets_S, slice(0, num_slots))
    if ffn is not None and dispatch.fuses_gather_combine:
        return _emit_fused_ffn(graph, ffn, env, x_TD, w_TK, order_N, inverse_N, offsets_S, top_k)

    # Dispatch and experts.
    x_sorted = graph.call_function(torch.ops.moecc.gather_tokens.default, (x_TD, order_N, inverse_N, top_k))
    y_sorted = dispatch.emit_experts(graph, ExpertStage(block, env, ffn), x_sorted, emit_getitem(graph, idx_N, order_N),
                                     offsets_S)

    # Combine.
    y_TKD = graph.call_method("view", (_permute(graph, y_sorted, inverse_N, order_N), -1, top_k,
                                       graph.call_method("size", (y_sorted, -1))))
    w_TK1 = graph.call_method("unsqueeze", (graph.call_method("type_as", (w_TK, y_sorted)), -1))
    return graph.call_method("sum", (graph.call_function(operator.mul, (y_TKD, w_TK1)), 1))


def _emit_fused_ffn(graph, ffn: FusedFFN, env, x_TD, w_TK, order_N, inverse_N, offsets_S, top_k):
    """``out_TD`` from one fused op: row n of the slot order is token ``order[n] // k`` with weight
    ``w.flatten()[order[n]]`` (a permutation, so its backward is a gather too)."""
    from moecc.backends import ops

    token_N = graph.call_function(torch.div, (order_N, top_k), {"rounding_mode": "floor"})
    weight_N = _permute(graph, graph.call_method("reshape", (graph.call_method("type_as", (w_TK, x_TD)), -1)),
                        order_N, inverse_N)
    return graph.call_function(ops.routed_ffn, (graph.call_method("contiguous", (x_TD,)), token_N, weight_N,
                                                offsets_S, *ffn_weights(ffn, env), list(ffn.flags), ffn.activation))


def ffn_weights(ffn: FusedFFN, env) -> list[list[fx.Node]]:
    """The (w1, w3, w2) weight nodes of a fused FFN, as ``moecc::expert_ffn`` takes them."""
    return [[env[n] for n in ref.nodes] if ref is not None else [] for ref in (ffn.w1, ffn.w3, ffn.w2)]


def capacity_mask(idx_N: torch.Tensor, top_k: int, num_experts: int, capacity_factor: torch.Tensor) -> torch.Tensor:
    """Which routed rows fit their expert's capacity, ``ceil(factor * rows / E)`` on this rank (GShard/Switch).

    Priority as in GShard: every token's first choice before any token's second; within a choice, token order.
    An infinite factor keeps every row (dropless).
    """
    idx_KT = idx_N.view(-1, top_k).t().reshape(-1)
    onehot_NE = torch.nn.functional.one_hot(idx_KT, num_experts)
    position_KT = (onehot_NE.cumsum(0) * onehot_NE).sum(1) - 1
    capacity = torch.ceil(capacity_factor * (idx_N.shape[0] / num_experts))
    return (position_KT < capacity).view(top_k, -1).t().reshape(-1)


def _standalone(block: Block, weight_node: fx.Node, ffn: FusedFFN | None = None
                ) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A small graph computing out_TD from (x, indices, weights, expert weights): for the numeric probe."""
    from moecc.backends.dispatch import LocalDispatch

    graph = fx.Graph()
    inputs = [block.rows_from, block.indices, weight_node] + sorted(
        {n for ref in block.template.weights.values() for n in ref.nodes} | block.template.constants,
        key=lambda n: n.name)
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    env["weights"] = env[weight_node]
    dispatch = LocalDispatch(block.spec.num_experts)
    root = torch.nn.Module()
    tensors = {**dispatch.buffers("cpu"), "load_counts": torch.zeros(block.spec.num_experts)}
    for key, value in tensors.items():
        root.register_buffer(key, value)
    out = emit_slot_moe(graph, block, env, {key: graph.get_attr(key) for key in tensors}, dispatch, ffn=ffn)
    graph.output(out)
    return fx.GraphModule(root, graph), inputs


def _matches(actual: torch.Tensor, expected: torch.Tensor, low_precision: bool = False) -> bool:
    if actual.numel() != expected.numel():
        return False
    a, e = actual.reshape(-1).double(), expected.reshape(-1).double()
    tol = 1e-3 if low_precision or expected.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scale = max(e.abs().max().item(), 1e-6)
    return bool(((a - e).abs().max() <= tol * 10 * scale + tol).item())


@dataclass(frozen=True, slots=True)
class Routing:
    """Which values of the original graph a block's rewrite reads and replaces, found numerically."""

    weights: fx.Node  # the routing weights [tokens, k]
    routed: fx.Node  # the routed output (sum of the experts' weighted outputs)
    holder: fx.Node  # the node after which ``routed`` holds that output (itself, or its last in-place write)
    indices_value: torch.Tensor  # the expert ids on the example inputs


def _routing_candidates(gm: fx.GraphModule, block: Block):
    """(routing-weight candidates, routed-output candidates with their holders, every node the probe reads)."""
    node_index = {n: i for i, n in enumerate(gm.graph.nodes)}
    weights = _weight_candidates(block, node_index)
    outputs = _output_candidates(block, node_index, numel_key(fake(block.rows_from)))
    wanted = {block.rows_from, block.indices, *weights, *(o for o, _ in outputs),
              *{n for ref in block.template.weights.values() for n in ref.nodes}, *block.template.constants}
    return weights, outputs, wanted


def record_routing_values(gm: fx.GraphModule, blocks: list[Block], inputs) -> dict[fx.Node, torch.Tensor]:
    """What :func:`find_routing` reads for every block of ``gm``, from one run of ``gm``."""
    wanted = set().union(*(_routing_candidates(gm, b)[2] for b in blocks if b.template is not None))
    return _record(gm, inputs, wanted)


def _check_routable(block: Block, weights: list[fx.Node], values: dict[fx.Node, torch.Tensor]) -> None:
    """Refuse, by name, example inputs on which the numeric probe cannot tell the candidates apart."""
    if block.rows_from in values and values[block.rows_from].numel() == 0:
        raise RewriteError("no tokens in this graph's inputs: nothing to route, the original graph runs")
    candidates = [values[w] for w in weights if w in values]
    # Only when every candidate is NaN: with k = E a candidate may legitimately hold -inf-masked entries.
    if candidates and all(v.isnan().any() for v in candidates):
        raise RewriteError("the router gives NaN routing weights on the example inputs (NaN or inf router logits): "
                           "the rewrite cannot be checked on them, the original graph runs")


def find_routing(gm: fx.GraphModule, block: Block, inputs, ffn: FusedFFN | None = None,
                 values: dict[fx.Node, torch.Tensor] | None = None) -> Routing:
    """The block's routing weights and routed output in ``gm``, found numerically: the candidates whose values the
    slot-form computation reproduces on ``inputs``. ``values`` (:func:`record_routing_values`) save a run of gm."""
    if block.template is None:
        raise RewriteError(block.error or "no expert template")
    weights, outputs, wanted = _routing_candidates(gm, block)
    if not weights:
        raise RewriteError("no routing-weight tensor of shape [tokens, k] found after top-k")
    if not outputs:
        raise RewriteError("no value of shape [tokens, dim] holds the sum of the experts' outputs")
    if values is None or any(n not in values for n in wanted):
        values = _record(gm, inputs, wanted)
    _check_routable(block, weights[:4], values)
    low = computes_in_low_precision(gm)
    for w in weights[:4]:
        probe, probe_inputs = _standalone(block, w, ffn)
        with torch.no_grad():
            expected = probe(*[values[n] for n in probe_inputs])
        for out, holder in outputs:
            if out in values and _matches(values[out], expected, low):
                return Routing(weights=w, routed=out, holder=holder, indices_value=values[block.indices])
    raise RewriteError(_joined_experts(block) or "the slot-form computation does not reproduce any value of the "
                       "block (routing or combine semantics moecc does not model, e.g. capacity dropping)")


def _joined_experts(block: Block) -> str | None:
    """Why no value was reproduced when every expert's output is joined by one ``torch.cat`` that the block computes
    on further (JetMoE's ParallelExperts: ``split`` -> per-expert linear -> ``cat``, then the activation and a second
    such product): the expert moecc took is only the first part of each expert, in words a user can act on."""
    outs = block.template.per_expert_outputs
    joins = {u for o in outs for u in o.users if is_call(u, torch.cat, torch.concat, "cat", "concat")}
    if len(outs) < 2 or len(joins) != 1 or not all(any(u in joins for u in o.users) for o in outs):
        return None
    path = block.spec.path
    own = [n for n in descendants(joins) if not path or module_path(n) == path or module_path(n).startswith(path + ".")]
    later = sorted({source_path(a.args[0]) or a.args[0].name for n in own for a in n.all_input_nodes
                    if is_call(a, operator.getitem) and isinstance(a.args[0], fx.Node)
                    and a.args[0].op == "placeholder" and isinstance(a.args[1], int)
                    and a not in block.template.sources})
    then = f"; later ops read more expert weights per expert ({', '.join(later)})" if later else ""
    return ("each expert's output is joined with the others' by one torch.cat and computed on further before the "
            f"routing weights are applied{then}: moecc lifts an expert only when its whole computation runs on its "
            "own rows, from its input rows to its weighted output (write each expert's weights as w[e] in one "
            "per-expert computation, or call torch._grouped_mm over the rows sorted by expert)")


def _view_like(graph: fx.Graph, out_TD: fx.Node, target: fx.Node, kept: list[fx.Node]) -> fx.Node:
    """``out_TD`` in the shape and dtype of the value it replaces."""
    t_fake = fake(target)
    for n in kept:
        f = fake(n)
        if f is not None and same_shape(f, t_fake):
            out = graph.call_method("view_as", (out_TD, n))
            break
    else:
        if t_fake.dim() == 2 and isinstance(t_fake.shape[-1], int):
            out = graph.call_method("reshape", (out_TD, -1, t_fake.shape[-1]))
        else:
            raise RewriteError(f"cannot restore the routed output's shape {tuple(t_fake.shape)}")
    return graph.call_method("to", (out, t_fake.dtype))


def rewrite_block(gm: fx.GraphModule, block: Block, routing: Routing, dispatch: Dispatch, buffer_name: str,
                  capacity: bool = False, ffn: FusedFFN | None = None) -> dict[str, torch.Tensor]:
    """Rewrite ``block`` in ``gm`` in place (call on a copy: a failure may leave the graph half-changed).

    ``routing`` (:func:`find_routing`) and ``block`` name nodes of ``gm``. ``dispatch`` is the block's strategy.
    With ``capacity``, rows past their expert's capacity are dropped (the factor is a buffer, see capacity_mask).
    With ``ffn`` (see ``ffn_match``) the experts run as one fused op instead of the lifted template.
    Returns the buffers it registered on ``gm`` (the placement tensors, ``load_counts``, ``capacity_factor``), by
    role; the runtime gets these tensors themselves.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    pos = position[routing.holder]
    live_users = [u for u in routing.routed.users if position[u] > pos]
    if not live_users:
        raise RewriteError("the routed output is not used after the experts run")
    first_use = min(live_users, key=position.__getitem__)

    device = routing.indices_value.device
    buffers = dispatch.buffers(device)
    buffers["load_counts"] = torch.zeros(block.spec.num_experts, device=device)
    if capacity:  # infinite while the rewrite is checked against the dropless original; the pass sets it after
        buffers["capacity_factor"] = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for key, value in buffers.items():
        gm.register_buffer(f"{buffer_name}_{key}", value)
    old_sources = block.template.sources
    with graph.inserting_before(first_use):
        placement = {key: graph.get_attr(f"{buffer_name}_{key}") for key in buffers}
        env = {n: n for ref in block.template.weights.values() for n in ref.nodes}
        env.update({n: n for n in block.template.constants})
        env.update({block.rows_from: block.rows_from, block.indices: block.indices, "weights": routing.weights})
        out_TD = emit_slot_moe(graph, block, env, placement, dispatch, ffn)
        kept = [block.rows_from] + sorted(ancestors([block.rows_from]), key=position.__getitem__, reverse=True)
        out = _view_like(graph, out_TD, routing.routed, kept)
    for u in live_users:
        u.replace_input_with(routing.routed, out)
    _erase_old_dispatch(graph, block, old_sources, set(nodes[: pos + 1]))
    graph.lint()
    gm.recompile()
    return buffers


def _erase_old_dispatch(graph: fx.Graph, block: Block, sources, before: set[fx.Node]) -> None:
    """Erase what only the old expert loop used: its index bookkeeping, the experts, their accumulators.

    Only nodes up to the old routed output (``before``) are candidates: later blocks also descend from this
    block's indices and must stay.
    """
    doomed = ((descendants([block.indices]) | descendants(sources) | set(sources)) & before) - {block.topk}
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.op in ("placeholder", "output", "get_attr") or n.users or n not in before:
                continue
            if is_inplace(n):
                base = n.args[0]
                # A mutation is dead only if nobody reads its (locally allocated) base any more.
                if n not in doomed or not (isinstance(base, fx.Node) and target_name(base) in _LOCAL_ALLOCS
                                           and all(is_inplace(u) and u in doomed for u in base.users)):
                    continue
                doomed.add(base)
            elif n not in doomed and target_name(n) not in _LOCAL_ALLOCS:
                continue
            graph.erase_node(n)
            changed = True

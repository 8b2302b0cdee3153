"""Rewrite one detected MoE block into expert-slot form.

The user's router stays as it is. From its top-k expert ids and weights we emit:

    slot_TK            = placement_E[experts_TK]               (the placement is a buffer: data, not code)
    order_N, inv_N, offsets_S = moecc::sort_by_slot(slot_TK.view(-1), S)
    x_sorted_ND        = x_TD[order_N // K]                     (gather, fused by Inductor)
    y_sorted_ND        = lifted expert template (moecc::grouped_mm + the user's elementwise ops)
    out_TD             = (y_sorted_ND[inv_N].view(T, K, D) * weights_TK[..., None]).sum(1)

and send ``out_TD`` to every later user of the block's routed output, then erase the old dispatch loop.

Which graph values are the routing weights and the routed output is decided numerically: the original graph is
run once on the real inputs, and the candidate nodes whose values the slot-form computation reproduces win.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .detect import Block
from .expert_template import emit_grouped
from .ffn_match import FusedFFN
from .graph_utils import ancestors, descendants, fake, is_inplace, numel_key, same_shape

_LOCAL_ALLOCS = {"zeros", "zeros_like", "empty", "empty_like", "new_zeros", "new_empty", "full", "full_like",
                 "new_full", "ones_like"}


class RewriteError(Exception):
    """The block cannot be rewritten safely; the message is the report's reason."""


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _weight_candidates(block: Block, node_index) -> list[fx.Node]:
    """Float [.., K] tensors computed from the top-k by the router: the routing weights, latest first."""
    idx_fake = fake(block.indices)
    expert_nodes = descendants(block.template.sources)
    found = []
    for n in descendants([block.topk]):
        value = fake(n)
        if value is None or n in expert_nodes or not value.is_floating_point():
            continue
        if same_shape(value, idx_fake) or (value.dim() == 1 and numel_key(value) == numel_key(idx_fake)):
            found.append(n)
    return sorted(found, key=node_index.__getitem__, reverse=True)


def _output_candidates(block: Block, node_index, tokens_numel) -> list[tuple[fx.Node, int]]:
    """Values that may hold the routed output, with the graph position from which they hold it."""
    ends = block.template.per_expert_outputs
    fed = [descendants([e]) | {e} for e in ends]
    after_all = set.intersection(*fed)
    last_end = max(node_index[e] for e in ends)
    found: dict[fx.Node, int] = {n: node_index[n] for n in after_all
                                 if node_index[n] > last_end and not is_inplace(n)}
    # An accumulator (``out.index_add_(...)`` once per expert) holds the output after its last mutation.
    mutations: dict[fx.Node, list[fx.Node]] = {}
    for n in set.union(*fed):
        if is_inplace(n) and isinstance(n.args[0], fx.Node):
            mutations.setdefault(n.args[0], []).append(n)
    for base, muts in mutations.items():
        if all(any(m in f for m in muts) for f in fed):
            found[base] = max(node_index[m] for m in muts)
    out = []
    for n, pos in found.items():
        value = fake(n)
        if value is not None and value.is_floating_point() and numel_key(value) == tokens_numel:
            out.append((n, pos))
    return sorted(out, key=lambda np: np[1])


def _record(gm: fx.GraphModule, inputs, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    rec = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        rec.run(*inputs)
    return {n: rec.env[n] for n in wanted if n in rec.env}


def emit_slot_moe(graph: fx.Graph, block: Block, env: dict, placement: dict[str, fx.Node], ep=None,
                  ffn: FusedFFN | None = None) -> fx.Node:
    """Insert the slot-form computation; ``env`` maps x, indices, weights and expert weights to graph nodes.

    ``placement`` holds the placement buffers' nodes: ``{"slot_of_expert": [E]}`` on one process, or
    ``{"replica_slots": [E, Rmax], "replica_cum": [E, Rmax]}`` with ``ep`` (a ``backends.ep.EPConfig``).
    With ``ffn``, the experts run as one ``moecc::expert_ffn`` (on one process it also gathers and combines).
    Returns out_TD (tokens flattened; the caller restores the original shape).
    """
    from moecc.backends import ep as ep_ops
    from moecc.backends import ops

    sort_by_slot = torch.ops.moecc.sort_by_slot.default
    num_experts, top_k = block.spec.num_experts, block.spec.router.top_k
    width = fake(block.x).shape[-1]
    x_TD = graph.call_method("reshape", (env[block.x], -1, width))
    idx_N = graph.call_method("reshape", (env[block.indices], -1))
    w_TK = graph.call_method("reshape", (env["weights"], -1, top_k))

    def get(node, i):
        return graph.call_function(operator.getitem, (node, i))

    def permute(rows, index, inverse):
        return graph.call_function(torch.ops.moecc.permute_rows.default, (rows, index, inverse))

    # Tokens per expert, counted on the device every step; the runtime reads the sum every N steps.
    counts_E = graph.call_function(torch.histc, (graph.call_method("float", (idx_N,)),),
                                   {"bins": num_experts, "min": 0, "max": num_experts - 1})
    graph.call_method("add_", (placement["load_counts"], counts_E))
    if ep is None:
        slot_N = get(placement["slot_of_expert"], idx_N)
        num_slots = num_experts
    else:
        slot_N = graph.call_function(ep_ops.choose_slots, (idx_N, top_k, placement["replica_slots"],
                                                           placement["replica_cum"]))
        num_slots = ep.layout.num_slots
    dropped_slot = 0
    if "capacity_factor" in placement:
        keep_N = graph.call_function(capacity_mask, (idx_N, top_k, num_experts, placement["capacity_factor"]))
        # Dropped rows go to one extra slot past the last: sorted to the end, never sent, never computed.
        slot_N = graph.call_function(torch.where, (keep_N, slot_N, num_slots))
        w_TK = graph.call_function(operator.mul, (w_TK, graph.call_method("view", (keep_N, -1, top_k))))
        dropped_slot = 1
    sorted_ = graph.call_function(sort_by_slot, (slot_N, num_slots + dropped_slot))
    order_N, inverse_N, offsets_S = get(sorted_, 0), get(sorted_, 1), get(sorted_, 2)
    if dropped_slot:
        offsets_S = get(offsets_S, slice(0, num_slots))
    if ffn is not None and ep is None:
        return _emit_fused_ffn(graph, ffn, env, x_TD, w_TK, order_N, inverse_N, offsets_S, top_k, permute)
    x_sorted = graph.call_function(torch.ops.moecc.gather_tokens.default, (x_TD, order_N, inverse_N, top_k))
    expert_sorted = get(idx_N, order_N)
    if ep is None:
        y_sorted = emit_grouped(graph, block.template, env, x_sorted, offsets_S, expert_sorted)
    else:
        # Rows leave sorted by slot, hence by destination rank; they arrive grouped by source rank.
        send_R = graph.call_function(ep_ops.rank_counts, (offsets_S, ep.layout.slots_per_rank))
        exchanged = graph.call_function(ep_ops.exchange_rows, (x_sorted, expert_sorted, send_R, ep.group_name))
        x_recv, expert_recv, recv_R = get(exchanged, 0), get(exchanged, 1), get(exchanged, 2)
        local = graph.call_function(sort_by_slot, (expert_recv, num_experts))
        local_order, local_inverse, local_offsets = get(local, 0), get(local, 1), get(local, 2)
        if ffn is not None:  # each received row once, unweighted, back in received order: one op
            ones = graph.call_method("new_ones", (x_recv, (graph.call_method("size", (x_recv, 0)),)))
            y_recv = graph.call_function(ops.routed_ffn, (x_recv, local_order, ones, local_offsets,
                                                          *_ffn_weights(ffn, env), list(ffn.flags), ffn.activation))
        else:
            y_local = emit_grouped(graph, block.template, env, permute(x_recv, local_order, local_inverse),
                                   local_offsets, get(expert_recv, local_order))
            y_recv = permute(y_local, local_inverse, local_order)
        rows = graph.call_method("size", (x_sorted, 0))
        y_sorted = graph.call_function(ep_ops.return_rows, (y_recv, send_R, recv_R, ep.group_name, rows))
    y_TKD = graph.call_method("view", (permute(y_sorted, inverse_N, order_N), -1, top_k,
                                       graph.call_method("size", (y_sorted, -1))))
    w_TK1 = graph.call_method("unsqueeze", (graph.call_method("type_as", (w_TK, y_sorted)), -1))
    return graph.call_method("sum", (graph.call_function(operator.mul, (y_TKD, w_TK1)), 1))


def _emit_fused_ffn(graph, ffn: FusedFFN, env, x_TD, w_TK, order_N, inverse_N, offsets_S, top_k, permute):
    """``out_TD`` from one fused op: row n of the slot order is token ``order[n] // k`` with weight
    ``w.flatten()[order[n]]`` (a permutation, so its backward is a gather too)."""
    from moecc.backends import ops

    token_N = graph.call_function(torch.div, (order_N, top_k), {"rounding_mode": "floor"})
    weight_N = permute(graph.call_method("reshape", (graph.call_method("type_as", (w_TK, x_TD)), -1)), order_N,
                       inverse_N)
    return graph.call_function(ops.routed_ffn, (graph.call_method("contiguous", (x_TD,)), token_N, weight_N,
                                                offsets_S, *_ffn_weights(ffn, env), list(ffn.flags), ffn.activation))


def _ffn_weights(ffn: FusedFFN, env) -> list[list[fx.Node]]:
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
    graph = fx.Graph()
    inputs = [block.x, block.indices, weight_node] + sorted(
        {n for ref in block.template.weights.values() for n in ref.nodes}, key=lambda n: n.name)
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    env["weights"] = env[weight_node]
    root = torch.nn.Module()
    root.register_buffer("placement", torch.arange(block.spec.num_experts))
    root.register_buffer("load_counts", torch.zeros(block.spec.num_experts))
    out = emit_slot_moe(graph, block, env, {"slot_of_expert": graph.get_attr("placement"),
                                            "load_counts": graph.get_attr("load_counts")}, ffn=ffn)
    graph.output(out)
    return fx.GraphModule(root, graph), inputs


def _matches(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    if actual.numel() != expected.numel():
        return False
    a, e = actual.reshape(-1).double(), expected.reshape(-1).double()
    tol = 1e-3 if expected.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scale = max(e.abs().max().item(), 1e-6)
    return bool(((a - e).abs().max() <= tol * 10 * scale + tol).item())


def _routing_candidates(gm: fx.GraphModule, block: Block):
    """(routing-weight candidates, routed-output candidates with positions, every node the probe reads)."""
    node_index = {n: i for i, n in enumerate(gm.graph.nodes)}
    weights = _weight_candidates(block, node_index)
    outputs = _output_candidates(block, node_index, numel_key(fake(block.x)))
    wanted = {block.x, block.indices, *weights, *(o for o, _ in outputs),
              *{n for ref in block.template.weights.values() for n in ref.nodes}}
    return weights, outputs, wanted


def record_routing_values(gm: fx.GraphModule, blocks: list[Block], inputs) -> dict[str, torch.Tensor]:
    """What :func:`find_routing` reads for every block, from one run of ``gm``, by node name (a deep copy of
    ``gm`` keeps the names, and rewriting one block leaves the others' nodes as they are)."""
    wanted = set().union(*(_routing_candidates(gm, b)[2] for b in blocks if b.template is not None))
    return {n.name: v for n, v in _record(gm, inputs, wanted).items()}


def find_routing(gm: fx.GraphModule, block: Block, inputs, ffn: FusedFFN | None = None,
                 values: dict[str, torch.Tensor] | None = None):
    """(routing weights node, routed output node, position it holds the output from, the expert ids' value on
    ``inputs``), found numerically. ``values`` (from :func:`record_routing_values`) saves running ``gm``."""
    weights, outputs, wanted = _routing_candidates(gm, block)
    if not weights:
        raise RewriteError("no routing-weight tensor of shape [tokens, k] found after top-k")
    if not outputs:
        raise RewriteError("no value of shape [tokens, dim] holds the sum of the experts' outputs")
    if values is None or any(n.name not in values for n in wanted):
        values = {n.name: v for n, v in _record(gm, inputs, wanted).items()}
    for w in weights[:4]:
        probe, probe_inputs = _standalone(block, w, ffn)
        with torch.no_grad():
            expected = probe(*[values[n.name] for n in probe_inputs])
        for out, pos in outputs:
            if out.name in values and _matches(values[out.name], expected):
                return w, out, pos, values[block.indices.name]
    raise RewriteError("the slot-form computation does not reproduce any value of the block "
                       "(routing or combine semantics moecc does not model, e.g. capacity dropping)")


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


def rewrite_block(gm: fx.GraphModule, block: Block, inputs, buffer_name: str, ep=None,
                  capacity: bool = False, ffn: FusedFFN | None = None, values=None) -> None:
    """Rewrite ``block`` in ``gm`` in place (call on a copy: a failure may leave the graph half-changed).

    With ``ep`` (a ``backends.ep.EPConfig``) the experts run where the placement puts them, across ranks.
    With ``capacity``, rows past their expert's capacity are dropped (the factor is a buffer, see capacity_mask).
    With ``ffn`` (see ``ffn_match``) the experts run as one fused op instead of the lifted template.
    ``values`` are :func:`record_routing_values` of a graph this one was copied from.
    """
    if block.template is None:
        raise RewriteError(block.error or "no expert template")
    weights, routed, pos, idx_value = find_routing(gm, block, inputs, ffn, values)
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    live_users = [u for u in routed.users if position[u] > pos]
    if not live_users:
        raise RewriteError("the routed output is not used after the experts run")
    first_use = min(live_users, key=position.__getitem__)

    device = _device_of(inputs)
    if ep is None:
        buffers = {"slot_of_expert": torch.arange(block.spec.num_experts, device=device)}
    else:
        from moecc.backends.ep import placement_tensors

        slots, cum = placement_tensors(ep.placement, device)
        buffers = {"replica_slots": slots, "replica_cum": cum}
    buffers["load_counts"] = torch.zeros(block.spec.num_experts, device=device)
    if capacity:  # infinite while the rewrite is checked against the dropless original; the pass sets it after
        buffers["capacity_factor"] = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for key, value in buffers.items():
        gm.register_buffer(f"{buffer_name}_{key}", value)
    old_sources = block.template.sources
    with graph.inserting_before(first_use):
        placement = {key: graph.get_attr(f"{buffer_name}_{key}") for key in buffers}
        env = {n: n for ref in block.template.weights.values() for n in ref.nodes}
        env.update({block.x: block.x, block.indices: block.indices, "weights": weights})
        out_TD = emit_slot_moe(graph, block, env, placement, ep, ffn)
        kept = [block.x] + sorted(ancestors([block.x]), key=position.__getitem__, reverse=True)
        out = _view_like(graph, out_TD, routed, kept)
    for u in live_users:
        u.replace_input_with(routed, out)
    _erase_old_dispatch(graph, block, old_sources, set(nodes[: pos + 1]))
    graph.lint()
    gm.recompile()
    return _send_rows(idx_value, block, buffers, ep)


def _send_rows(idx_value: torch.Tensor, block: Block, buffers: dict, ep) -> list[int] | None:
    """Rows this rank sends to each rank for the example step (the report's all-to-all volume)."""
    if ep is None:
        return None
    from moecc.backends.ep import choose_slots

    slots = choose_slots(idx_value.reshape(-1), block.spec.router.top_k, buffers["replica_slots"],
                         buffers["replica_cum"])
    return torch.bincount(slots // ep.layout.slots_per_rank, minlength=ep.layout.ranks).tolist()


def _device_of(inputs) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


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
                if n not in doomed or not (isinstance(base, fx.Node) and _name(base) in _LOCAL_ALLOCS
                                           and all(is_inplace(u) and u in doomed for u in base.users)):
                    continue
                doomed.add(base)
            elif n not in doomed and _name(n) not in _LOCAL_ALLOCS:
                continue
            graph.erase_node(n)
            changed = True

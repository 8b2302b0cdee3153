"""The expert FFN of one MoE block as a row-wise template, and its lifting to grouped GEMMs over slots.

Every form moecc handles computes, per routed row, the same FFN with the weights of the row's expert. For a
per-expert loop (ModuleList or stacked weights indexed ``w[e]``) the graph holds E copies of that computation;
for HF's ``grouped_mm`` form it holds one copy over all experts. We take one copy (expert 0's, or the only one),
check that the others are the same op for op, and lift it: each matmul with an expert weight becomes one
``moecc::grouped_mm`` over the rows sorted by slot, each per-expert bias becomes a gather by the row's expert,
and every other op (activations, chunk, clamp, mul) is copied as it is, for Inductor to fuse.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .graph_utils import (
    LINEAR,
    MATMUL,
    ancestors,
    descendants,
    fake,
    is_call,
    is_inplace,
    source_path,
    target_name,
)

# Ops that only view or re-lay out a weight (``w[e].t()``), folded into the weight reference.
_WEIGHT_VIEWS = {"t", "T", "mT", "transpose", "contiguous", "to", "float", "bfloat16", "half", torch.transpose,
                 torch.t}
_ROW_PRELUDE = {"to", "float", "bfloat16", "half", "type", "contiguous", "unsqueeze"}
_ROW_POSTLUDE = {"squeeze"}
# Casts of the expert's output (torchtitan's ``.type_as(x)`` after a bf16 grouped GEMM) belong to the expert too.
_CAST_POSTLUDE = {"to", "float", "bfloat16", "half", "type", "type_as"}
GROUPED_CALLS = {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"}


class TemplateError(Exception):
    """The expert computation is not a row-wise FFN moecc can lift; the message is the report's reason."""


@dataclass(slots=True)
class WeightRef:
    """One grouped weight of the template: E tensors (ModuleList) or one stacked tensor, and its layout."""

    role: str  # "w1.weight" for ModuleList experts, the parameter path for stacked ones
    nodes: list[fx.Node]  # in expert order; one node if stacked
    transposed: bool = False  # the graph applied an odd number of transposes to the stored weight
    cast: torch.dtype | None = None  # the dtype the computation reads it in, when not the stored one (``.bfloat16()``)

    @property
    def stacked(self) -> bool:
        return len(self.nodes) == 1


@dataclass(slots=True)
class ExpertTemplate:
    rows: fx.Node  # the template's input: expert 0's rows (or all rows for a grouped form)
    nodes: list[fx.Node]  # expert 0's computation, in graph order; nodes[-1] is its output
    weights: dict[fx.Node, WeightRef]  # weight-expression node (expert 0) -> grouped weight
    per_expert_outputs: list[fx.Node]  # last node of each expert's computation
    per_expert_rows: list[fx.Node]
    sources: set[fx.Node] = field(default_factory=set)  # every weight-expression node of every expert
    # Token-independent values the computation reads besides its expert weights: parameters shared by every
    # expert and what is computed from them alone (MuseSpark's ``post_expert_norm`` weight, ``1 + w``).
    constants: set[fx.Node] = field(default_factory=set)


def _strip_views(node: fx.Node) -> tuple[fx.Node, int]:
    """Follow weight views back to the source; return it and the number of transposes on the way."""
    transposes = 0
    while True:
        if node.op in ("call_method", "call_function") and node.target in _WEIGHT_VIEWS:
            name = node.target if isinstance(node.target, str) else node.target.__name__
            if name in ("t", "T", "mT", "transpose"):
                if name == "transpose":
                    dims = sorted(int(d) % 2 for d in node.args[1:3]) if len(node.args) >= 3 else None
                    if dims is None:
                        raise TemplateError("weight transpose with unknown dims")
                transposes += 1
            node = node.args[0]
            continue
        return node, transposes


def _expert_weight_exprs(sources: list[fx.Node]) -> dict[fx.Node, tuple[fx.Node, int]]:
    """Weight-expression nodes reachable from ``sources`` through views: node -> (source, transposes)."""
    exprs: dict[fx.Node, tuple[fx.Node, int]] = {}
    todo = list(sources)
    for s in sources:
        exprs[s] = (s, 0)
    while todo:
        n = todo.pop()
        for user in n.users:
            is_view = (user.op in ("call_method", "call_function") and user.target in _WEIGHT_VIEWS
                       and user.args and user.args[0] is n and len(user.all_input_nodes) == 1)
            if is_view and user not in exprs:
                exprs[user] = _strip_views(user)
                todo.append(user)
            elif _is_row_gather(user, n) and user not in exprs:
                exprs[user] = exprs[n]  # ``w[expert_ids]``: one weight per row (HF batched_mm)
                todo.append(user)
    return exprs


def _computation(sources: list[fx.Node], node_index: dict[fx.Node, int]):
    """One expert's computation: nodes fed by its weights up to the last one consuming them."""
    exprs = _expert_weight_exprs(sources)
    consumers = {u for e in exprs for u in e.users if u not in exprs}
    if not consumers:
        raise TemplateError("expert weights are not used")
    last = max(consumers, key=node_index.__getitem__)
    reach = descendants(exprs)
    body = (ancestors([last]) | {last}) & reach
    # In-place ops on the computation's values (HF's ``out.add_(bias)``) feed later ops through their base, not
    # through an FX edge: take them, and what they read from the weights, into the computation too.
    while mutators := {u for n in body for u in n.users if u not in body and is_inplace(u) and u.args[0] is n
                       and node_index[u] < node_index[last]}:
        body |= mutators | (ancestors(mutators) & reach)
    body -= set(exprs)
    nodes = sorted(body, key=node_index.__getitem__)
    external = {a for n in nodes for a in _data_inputs(n) if a not in body and a not in exprs}
    if len(external) > 1 and len(bases := {_prelude_base(a) for a in external}) == 1:
        # The rows cast once per GEMM (torchtitan: ``x.bfloat16()`` for w1 and again for w3): one input.
        nodes = sorted(set(nodes) | {c for a in external for c in _prelude_chain(a)}, key=node_index.__getitem__)
        external = bases
    if len(external) != 1:
        names = ", ".join(sorted(a.name for a in external))
        raise TemplateError(f"an expert's computation reads {len(external)} values besides its weights ({names}); "
                            "expected exactly its input rows")
    rows = external.pop()
    # Row-wise casts and unsqueezes on the way in belong to the expert (x.to(dtype), x.unsqueeze(-1) for bmm).
    while rows.op == "call_method" and rows.target in _ROW_PRELUDE and len(rows.all_input_nodes) == 1:
        nodes.insert(0, rows)
        rows = rows.all_input_nodes[0]
    # ... and so does the squeeze after a per-row bmm.
    while len(nodes[-1].users) == 1 and (tail := next(iter(nodes[-1].users))).op == "call_method" \
            and tail.target in _ROW_POSTLUDE and len(tail.all_input_nodes) == 1:
        nodes.append(tail)
    while len(nodes[-1].users) == 1 and _is_output_cast(tail := next(iter(nodes[-1].users)), nodes[-1]):
        nodes.append(tail)
    nodes, constants = _shared_epilogue(nodes, reach, node_index)
    return nodes, rows, exprs, constants


def _shared_epilogue(nodes: list[fx.Node], reach: set[fx.Node], node_index: dict[fx.Node, int]):
    """``nodes`` extended by the row-wise ops after the expert's last weight product that read only the expert's
    values and token-independent parameters (a norm with one weight for every expert: MuseSpark's
    ``post_expert_norm`` before the routing weights), with those parameters' values; ``nodes`` unchanged, and no
    constants, when the ops found do not end in one value that alone leaves the expert."""
    rows_count = str(fake(nodes[-1]).shape[0]) if fake(nodes[-1]) is not None and fake(nodes[-1]).dim() else None
    if rows_count is None:
        return nodes, set()
    body, added, constants, memo = set(nodes), [], set(), {}
    todo = sorted({u for n in nodes for u in n.users}, key=node_index.__getitem__)
    while todo:
        u = todo.pop(0)
        if u in body or u.op not in ("call_function", "call_method") or is_inplace(u):
            continue
        value = fake(u)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or str(value.shape[0]) != rows_count:
            continue
        outside = [a for a in u.all_input_nodes if a not in body]
        if not all(a not in reach and _token_independent(a, memo) for a in outside):
            continue
        body.add(u)
        added.append(u)
        constants.update(outside)
        todo = sorted(set(todo) | set(u.users), key=node_index.__getitem__)
    if not added:
        return nodes, set()
    escaping = [n for n in body if any(user not in body for user in n.users)]
    last = max(added, key=node_index.__getitem__)
    if escaping != [last]:
        return nodes, set()
    return sorted(body, key=node_index.__getitem__), constants


def _token_independent(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """``node`` is computed from module parameters and buffers alone (no graph input, no token)."""
    if node in memo:
        return memo[node]
    seen, todo, result = {node}, [node], True
    while todo and result:
        n = todo.pop()
        if n in memo:
            result = memo[n]
        elif n.op == "placeholder":
            result = source_path(n) is not None
        elif n.op != "get_attr":
            if not n.all_input_nodes:  # a factory (arange, zeros): fine only as part of a parameter's expression
                result = n is not node
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
    memo[node] = result
    return result


def _prelude_chain(node: fx.Node) -> list[fx.Node]:
    """The row-wise casts leading to ``node`` from its base, ``node`` included (empty if it is no cast)."""
    chain = []
    while node.op == "call_method" and node.target in _ROW_PRELUDE and len(node.all_input_nodes) == 1:
        chain.append(node)
        node = node.all_input_nodes[0]
    return chain


def _prelude_base(node: fx.Node) -> fx.Node:
    chain = _prelude_chain(node)
    return chain[-1].all_input_nodes[0] if chain else node


def _is_output_cast(node: fx.Node, value: fx.Node) -> bool:
    """``value.to(dtype)``, ``value.float()``, ``value.type_as(other)``: a cast of ``value`` and nothing else."""
    if node.op != "call_method" or node.target not in _CAST_POSTLUDE or node.args[0] is not value:
        return False
    others = [a for a in node.all_input_nodes if a is not value]
    return not others or (node.target == "type_as" and fake(node.args[1]) is not None)


def _is_row_gather(node: fx.Node, weight: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and node.args[0] is weight
            and isinstance(node.args[1], fx.Node))


def is_grouped_call(node: fx.Node) -> bool:
    return node.op == "call_function" and str(getattr(node.target, "__name__", node.target)).split(".")[-1] \
        in GROUPED_CALLS


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry data; a grouped GEMM's own offsets are replaced by ours, so they do not count."""
    if is_grouped_call(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return node.all_input_nodes


def _signature(nodes, rows, exprs, role_of, constants=frozenset()) -> list:
    pos = {n: i for i, n in enumerate(nodes)}

    def norm(a):
        if isinstance(a, fx.Node):
            if a is rows:
                return ("rows",)
            if a in pos:
                return ("node", pos[a])
            if a in exprs:
                src, transposes = exprs[a]
                return ("w", role_of(src), transposes % 2)
            if a in constants:  # recomputed per expert in a loop (``1 + norm.weight``): the same expression
                return ("const", _expression(a))
            return ("ext", a.name)
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        return repr(a)

    return [(n.op, str(n.target), norm(n.args), tuple(sorted((k, norm(v)) for k, v in n.kwargs.items())))
            for n in nodes]


def _expression(node: fx.Node):
    """A token-independent value as the expression that computes it, down to the placeholders (by name)."""
    if node.op in ("placeholder", "get_attr"):
        return (node.op, node.name)

    def arg(a):
        if isinstance(a, fx.Node):
            return _expression(a)
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        return repr(a)

    return (node.op, str(node.target), arg(node.args), tuple(sorted((k, arg(v)) for k, v in node.kwargs.items())))


def extract_template(per_expert_sources: list[list[fx.Node]], role_of, stacked_nodes: dict[str, fx.Node] | None,
                     graph: fx.Graph) -> ExpertTemplate:
    """Build the template from expert 0 and check every other expert computes the same thing.

    ``per_expert_sources[e]`` are expert e's weight nodes (its parameter placeholders, or the ``w[e]`` getitems of
    stacked weights); ``role_of(source)`` names the weight a source stands for, the same name for every expert.
    ``stacked_nodes`` maps a role to its stacked parameter node (None for ModuleList experts).
    """
    node_index = {n: i for i, n in enumerate(graph.nodes)}
    computations = [_computation(srcs, node_index) for srcs in per_expert_sources]
    signatures = [_signature(nodes, rows, exprs, role_of, constants) for nodes, rows, exprs, constants in computations]
    for e, sig in enumerate(signatures[1:], start=1):
        if sig != signatures[0]:
            raise TemplateError(f"expert {e} computes something different from expert 0")
    _check_independent(computations, node_index)
    nodes, rows, exprs, constants = computations[0]

    weights: dict[fx.Node, WeightRef] = {}
    for expr, (src, transposes) in exprs.items():
        role = role_of(src)
        if stacked_nodes is not None:
            ref_nodes = [stacked_nodes[role]]
        else:
            ref_nodes = []
            for _, _, other_exprs, _ in computations:
                match = [s for s, _ in other_exprs.values() if role_of(s) == role]
                ref_nodes.append(match[0])
        weights[expr] = WeightRef(role=role, nodes=ref_nodes, transposed=bool(transposes % 2),
                                  cast=_cast_of(expr, stacked_nodes[role] if stacked_nodes is not None else src))
    all_sources = {n for _, _, ex, _ in computations for n in ex}
    return ExpertTemplate(rows=rows, nodes=nodes, weights=weights,
                          per_expert_outputs=[_value_of(c[0][-1]) for c in computations],
                          per_expert_rows=[c[1] for c in computations], sources=all_sources,
                          constants=constants)


def _check_independent(computations, node_index: dict[fx.Node, int]) -> None:
    """Each expert reads only its own rows: one whose input depends on another expert's computation (a chain of
    experts, a running statistic) is not a set of E experts that can run side by side."""
    owner = {n: e for e, (nodes, _, _, _) in enumerate(computations) for n in nodes}
    first = min((node_index[n] for n in owner), default=0)
    for e, (_, rows, _, _) in enumerate(computations):
        todo, seen = [rows], set()
        while todo:  # ancestors of the rows, down to where the first expert starts
            n = todo.pop()
            for a in n.all_input_nodes:
                if a in seen or node_index[a] < first:
                    continue
                seen.add(a)
                if owner.get(a, e) != e:
                    raise TemplateError(f"expert {e}'s input rows depend on expert {owner[a]}'s output: experts "
                                        "that read each other's results are not E independent experts")
                todo.append(a)


def _cast_of(expr: fx.Node, source: fx.Node) -> torch.dtype | None:
    expr_fake, source_fake = fake(expr), fake(source)
    if expr_fake is None or source_fake is None or expr_fake.dtype == source_fake.dtype:
        return None
    return expr_fake.dtype


def _value_of(node: fx.Node) -> fx.Node:
    """The node later code reads an expert's output from: for a last op in place (HF's ``out.add_(bias)``), its
    base, since the graph's users read the mutated base, not the ``add_`` node."""
    while is_inplace(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def ffn_kind(template: ExpertTemplate) -> str:
    names = {target_name(n) for n in template.nodes}
    act = next((a for a in ("silu", "gelu", "relu", "sigmoid", "tanh") if a in names), None)
    gated = any(is_call(n, operator.mul, torch.mul, "mul") and sum(
        1 for a in n.all_input_nodes if a in set(template.nodes)) == 2 for n in template.nodes)
    if act is None:
        return "custom"
    return {("silu", True): "swiglu", ("gelu", True): "geglu"}.get((act, gated), f"{'glu-' if gated else 'mlp-'}{act}")


def emit_grouped(graph: fx.Graph, template: ExpertTemplate, env: dict[fx.Node, fx.Node], x_sorted: fx.Node,
                 offsets: fx.Node, expert_of_row: fx.Node) -> fx.Node:
    """Insert the lifted template at the graph's insertion point; return its output node ([N, D] rows).

    ``env`` maps every weight node the template references (parameter placeholders, stacked tensors) to the node
    that holds it in ``graph``.
    """
    from moecc.backends import ops  # noqa: F401  (registers torch.ops.moecc)

    local: dict[fx.Node, fx.Node] = {template.rows: x_sorted}

    def weight_list(ref: WeightRef) -> list[fx.Node]:
        if ref.cast is not None:  # as the user's code reads it (a bf16 copy per step, as in eager)
            return [graph.call_method("to", (env[n], ref.cast)) for n in ref.nodes]
        return [env[n] for n in ref.nodes]

    def row_bias(ref: WeightRef) -> fx.Node:
        if ref.stacked:
            stacked = env[ref.nodes[0]]
        else:
            stacked = graph.call_function(torch.stack, (weight_list(ref),))
        return graph.call_function(operator.getitem, (stacked, expert_of_row))

    def arg(a):
        if isinstance(a, fx.Node):
            if a in local:
                return local[a]
            if a in template.weights:
                ref = template.weights[a]
                if weight_dims(ref) == 1:
                    return row_bias(ref)
                raise TemplateError(f"expert weight {ref.role} used by an op moecc cannot group")
            if a in template.constants and a in env:
                return env[a]
            raise TemplateError(f"expert computation reads {a.name}")
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for node in template.nodes:
        weight_args = [a for a in node.args[:3] if isinstance(a, fx.Node) and a in template.weights]
        if is_call(node, *LINEAR) and len(node.args) >= 2 and node.args[1] in template.weights:
            ref = template.weights[node.args[1]]
            out = graph.call_function(torch.ops.moecc.grouped_mm.default, (arg(node.args[0]), weight_list(ref), offsets,
                                                       not ref.transposed))
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None:
                out = graph.call_function(operator.add, (out, arg(bias)))
        elif is_grouped_call(node) and node.args[1] in template.weights:
            ref = template.weights[node.args[1]]
            out = graph.call_function(torch.ops.moecc.grouped_mm.default, (arg(node.args[0]), weight_list(ref),
                                                                           offsets, ref.transposed))
        elif is_call(node, torch.bmm, "bmm") and any(_is_row_gather(a, a.args[0]) for a in node.args[:2]
                                                      if isinstance(a, fx.Node) and a in template.weights):
            out = _emit_row_bmm(graph, node, template, arg, weight_list, offsets)
        elif is_call(node, *MATMUL) and len(node.args) == 2 and node.args[1] in template.weights and \
                weight_dims(template.weights[node.args[1]]) == 2:
            ref = template.weights[node.args[1]]
            out = graph.call_function(torch.ops.moecc.grouped_mm.default,
                                      (arg(node.args[0]), weight_list(ref), offsets, ref.transposed))
        elif node.op == "call_method" and node.target == "type_as" and node.args[1] not in local:
            out = graph.call_method("to", (arg(node.args[0]), fake(node.args[1]).dtype))
        elif weight_args and any(weight_dims(template.weights[a]) == 2 for a in weight_args):
            raise TemplateError(f"expert weight used by {node.target}, which moecc cannot group")
        else:
            create = graph.call_function if node.op == "call_function" else graph.call_method
            out = create(node.target, arg(node.args), arg(dict(node.kwargs)))
        local[node] = out
    return local[template.nodes[-1]]


def _emit_row_bmm(graph, node, template, arg, weight_list, offsets):
    """``bmm(w[ids], x.unsqueeze(-1))`` or ``bmm(x.unsqueeze(1), w[ids])``: a per-row weight product."""
    a, b = node.args[:2]
    if a in template.weights:  # [N, O, I] @ [N, I, 1] -> [N, O, 1]
        vec, ref, transpose_w, dim = b, template.weights[a], True, -1
    else:  # [N, 1, I] @ [N, I, O] -> [N, 1, O]
        vec, ref, transpose_w, dim = a, template.weights[b], False, 1
    if not (is_call(vec, "unsqueeze") and vec.args[1] in (dim, 2 if dim == -1 else dim)):
        raise TemplateError("per-row bmm over expert weights without an unsqueezed row vector")
    rows = graph.call_function(torch.ops.moecc.grouped_mm.default,
                               (arg(vec.args[0]), weight_list(ref), offsets, transpose_w != ref.transposed))
    return graph.call_method("unsqueeze", (rows, dim))


def weight_dims(ref: WeightRef) -> int:
    """Dimensions of one expert's slice of the weight: 2 for a matrix, 1 for a bias."""
    value = fake(ref.nodes[0])
    if value is None:
        return 2
    return value.dim() - (1 if ref.stacked else 0)

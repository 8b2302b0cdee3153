"""Find the MoE blocks of a Dynamo graph: their router, their experts, and the spec that describes them.

A block is anchored on a ``topk`` over E scores whose E matches an experts container: a ModuleList of E
identical modules, or parameters stacked ``[E, ...]`` read per expert (``w[e]``) or by a grouped GEMM. The block's
module path is the closest common module of the router and the experts. Nothing here changes the graph.
"""
from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from .expert_template import GROUPED_CALLS, ExpertTemplate, TemplateError, extract_template, ffn_kind
from .graph_utils import (
    LINEAR,
    MATMUL,
    TOPK,
    ancestors,
    common_prefix,
    descendants,
    fake,
    is_call,
    is_inplace,
    module_path,
    source_path,
    target_name,
)
from .spec import ExpertsSpec, MoESpec, RouterSpec


@dataclass(slots=True)
class Block:
    """One MoE block: its spec for the report plus the graph nodes the rewrite needs."""

    spec: MoESpec
    topk: fx.Node
    indices: fx.Node  # [..., K] expert ids
    x: fx.Node  # the router's input
    template: ExpertTemplate | None = None
    error: str | None = None  # why this block will not be rewritten
    param_nodes: dict[str, fx.Node] = field(default_factory=dict)
    near_miss: bool = False  # a selection over E scores whose experts (or router) were not recognised
    expert_x: fx.Node | None = None  # the tokens the experts read rows of, when not the router's input

    @property
    def rows_from(self) -> fx.Node:
        """The [tokens, d] value every expert gathers its rows from: the router's input, or (MuseSpark's wider
        projection, Gemma 4's separately normalised tokens) the other value the experts index by token."""
        return self.expert_x if self.expert_x is not None else self.x


def _params(graph: fx.Graph) -> dict[str, fx.Node]:
    out = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            path = source_path(node)
            if path is not None:
                out[path] = node
    return out


def _modulelist_containers(params: dict[str, fx.Node]) -> dict[str, dict[int, dict[str, fx.Node]]]:
    """prefix -> {index -> {rest -> node}} for every ``prefix.<i>.rest`` split with identical rests."""
    found: dict[str, dict[int, dict[str, fx.Node]]] = defaultdict(lambda: defaultdict(dict))
    for path, node in params.items():
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            # ``experts.3`` (ModuleList) or ``experts.expert_3`` (ModuleDict keyed by name, Switch Transformers)
            if (index := _member_index(part)) is not None:
                found[".".join(parts[:i])][index][".".join(parts[i + 1:])] = node
    good = {}
    for prefix, members in found.items():
        rests = {frozenset(m) for m in members.values()}
        if len(members) >= 2 and len(rests) == 1 and sorted(members) == list(range(len(members))):
            good[prefix] = members
    return good


def _member_index(part: str) -> int | None:
    match = re.fullmatch(r"(?:[A-Za-z]+_)?(\d+)", part)
    return int(match.group(1)) if match else None


_ROUTER_WEIGHT_VIEWS = {"type", "to", "float", "t", "T", "transpose", "contiguous"}


def _router_weight(gate: fx.Node) -> fx.Node | None:
    """The parameter the router's linear reads, through casts (DeepSeek's ``weight.type(torch.float32)``)."""
    node = gate.args[1] if len(gate.args) > 1 else gate.kwargs.get("weight")
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") \
            and target_name(node) in _ROUTER_WEIGHT_VIEWS and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node if isinstance(node, fx.Node) else None


def _anchor(node: fx.Node) -> tuple[int, int, fx.Node] | None:
    """(E, k, expert-ids node) if ``node`` picks experts: ``topk`` over E scores, or ``argmax`` or ``max(dim)``
    over E (top-1, Switch Transformers). None otherwise."""
    if is_call(node, *TOPK):
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
        indices = next((u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 1), None)
    elif is_call(node, torch.max, "max") and _last_dim(node):  # ``values, ids = scores.max(dim=-1)``
        k = 1
        indices = next((u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 1), None)
    elif is_call(node, torch.argmax, "argmax"):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        scores = fake(node.args[0])
        if scores is None or dim not in (-1, scores.dim() - 1):
            return None
        k, indices = 1, node
    else:
        return None
    scores = fake(node.args[0])
    if scores is None or not isinstance(scores.shape[-1], int) or not isinstance(k, int) or indices is None:
        return None
    return scores.shape[-1], k, indices


def _joined_selections(indices: fx.Node, k: int, num_experts: int) -> tuple[fx.Node, int]:
    """(expert ids, k) of the selection ``indices`` belongs to: the ids themselves, or, when successive top-1
    selections over the same E scores are concatenated into the ids the experts read (PhiMoE's sparsemixer:
    ``max``, mask that expert, ``max`` again, ``cat``), the concatenation and its width."""
    users = [u for u in indices.users if is_call(u, torch.cat, torch.concat, "cat", "concat")]
    for cat in users:
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        value = fake(cat)
        if value is None or value.dim() < 2 or dim not in (-1, value.dim() - 1) or value.is_floating_point():
            continue
        if all(isinstance(p, fx.Node) and _selection_ids(p, num_experts) for p in parts) \
                and isinstance(value.shape[-1], int):
            return cat, value.shape[-1]
    return indices, k


def _selection_ids(node: fx.Node, num_experts: int) -> bool:
    """``node`` is the ids output of a selection over ``num_experts`` scores (topk, max, argmax)."""
    if is_call(node, torch.argmax, "argmax"):
        anchor = _anchor(node)
    elif is_call(node, operator.getitem) and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
        anchor = _anchor(node.args[0])
    else:
        return False
    return anchor is not None and anchor[0] == num_experts and anchor[2] is node


def _last_dim(node: fx.Node) -> bool:
    """The reduction of ``max``/``argmax`` runs over the last dimension (the E scores of each token)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    scores = fake(node.args[0])
    return isinstance(dim, int) and scores is not None and dim in (-1, scores.dim() - 1)


def _gate_linear(topk: fx.Node, num_experts: int) -> fx.Node | None:
    """The linear (or matmul) producing the router logits that feed ``topk``."""
    todo, seen = [topk.args[0]], set()
    while todo:
        n = todo.pop(0)
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if is_call(n, *LINEAR, *MATMUL):
            out = fake(n)
            if out is not None and out.shape[-1] == num_experts:
                return n
        todo.extend(n.all_input_nodes)
    return None


def _router_spec(topk: fx.Node, gate: fx.Node, k: int, block_nodes: set[fx.Node]) -> RouterSpec:
    between = ancestors([topk]) - ancestors([gate]) - {gate}
    # A group mask filled in place (``group_mask.scatter_(1, group_idx, 1)``, DeepSeek-V2) reaches the top-k
    # through its base, not through an FX edge: follow in-place writes into the values on the way.
    writes = {u for n in between for u in n.users if is_inplace(u) and u.args[0] is n}
    between |= writes | (ancestors(writes) - ancestors([gate]) - {gate})
    names = {target_name(n) for n in between}
    # The router's weights: the top-k values, or scores gathered at the top-k ids (DeepSeek-V3), and what the
    # router module computes from them (renormalisation, scaling).
    values = [u for u in topk.users if is_call(u, operator.getitem) and u.args[1] == 0]
    values += [n for n in block_nodes if is_call(n, torch.gather, "gather") and topk in ancestors([n])]
    router_path = module_path(topk)
    after = descendants(values) & {n for n in block_nodes if _inside(module_path(n), router_path)}
    after_names = {target_name(n) for n in after}
    score = "softmax" if "softmax" in names else "sigmoid" if "sigmoid" in names else "logits"
    gathers = [n for n in block_nodes if is_call(n, torch.gather, "gather") and topk in ancestors([n])]
    return RouterSpec(
        score=score, top_k=k,
        score_after_topk=score == "logits" and "softmax" in after_names,
        renormalize=any(is_call(n, "sum", torch.sum) for n in after)
        and bool(after_names & {"truediv", "itruediv", "div", "div_"}),
        selection_bias=bool(gathers) and any(is_call(n, operator.add, torch.add, "add") for n in between),
        router_bias=len(gate.args) > 2 and gate.args[2] is not None,
        grouped=sum(1 for n in between if is_call(n, *TOPK)) > 0,
        scale=any(is_call(n, operator.mul, torch.mul, "mul") and any(isinstance(a, (int, float)) for a in n.args)
                  for n in after),
    )


def _nearest_params(params: dict[str, fx.Node], router_path: str, num_experts: int) -> dict[str, fx.Node]:
    """The ``[E, ...]`` parameters of the module closest to the router (another layer's experts are not ours)."""
    stacked = {p: n for p, n in params.items()
               if (v := fake(n)) is not None and v.dim() >= 2 and v.shape[0] == num_experts}
    parents = {stacked_path_parent(p) for p in stacked}
    if not parents:
        return {}
    best = max(parents, key=lambda p: (len(common_prefix([p, router_path]).split(".")), -len(p)))
    return {p: n for p, n in stacked.items() if stacked_path_parent(p) == best}


def _stacked_sources(params: dict[str, fx.Node], num_experts: int, exclude: set[fx.Node]):
    """Stacked expert parameters read per expert as ``w[e]``: (role -> node, per-expert getitem sources)."""
    stacked, per_expert = {}, [[] for _ in range(num_experts)]
    for path, node in params.items():
        value = fake(node)
        if node in exclude or value is None or value.dim() < 2 or value.shape[0] != num_experts:
            continue
        reads = [u for u in node.users if is_call(u, operator.getitem) and isinstance(u.args[1], int)]
        if reads:
            stacked[path] = node
            for u in reads:
                per_expert[u.args[1] % num_experts].append(u)
    return stacked, per_expert


def _grouped_sources(params: dict[str, fx.Node], num_experts: int, exclude: set[fx.Node]):
    """Stacked expert parameters consumed whole by a grouped GEMM (HF ``grouped_mm`` experts)."""
    stacked = {}
    for path, node in params.items():
        value = fake(node)
        if node in exclude or value is None or value.dim() < 2 or value.shape[0] != num_experts:
            continue
        users = list(node.users)
        while users:
            u = users.pop()
            name = target_name(u).split(".")[-1]
            if name in GROUPED_CALLS or (u.target is operator.getitem and isinstance(u.args[1], fx.Node)):
                stacked[path] = node
                break
            if u.op == "call_method" and u.target in _GROUPED_WEIGHT_VIEWS:
                users.extend(u.users)
    return stacked


# Views and casts between a stacked weight and the grouped GEMM reading it (torchtitan: ``w.bfloat16().mT``).
_GROUPED_WEIGHT_VIEWS = {"transpose", "t", "mT", "contiguous", "to", "float", "bfloat16", "half", "type"}


def detect_moe_blocks(gm: fx.GraphModule) -> list[Block]:
    """Every MoE block of ``gm``, each with a spec, and either a template for the rewrite or an error."""
    graph = gm.graph
    params = _params(graph)
    lists = _modulelist_containers(params)
    blocks: dict[str, Block] = {}
    near: dict[str, Block] = {}  # router path -> a selection whose experts were not recognised
    for topk in graph.nodes:
        anchor = _anchor(topk)
        if anchor is None:
            continue
        num_experts, k, indices = anchor
        indices, k = _joined_selections(indices, k, num_experts)
        gate = _gate_linear(topk, num_experts)
        router_path = module_path(topk)
        if gate is None:
            if num_experts >= 2 and _expert_sized(params, lists, router_path, num_experts):
                near[router_path] = _near_miss(topk, indices, None, num_experts, k, graph, _no_router(topk))
            continue
        exclude = {w for w in (gate.args[1] if len(gate.args) > 1 else None, _router_weight(gate)) if w is not None}

        containers = [(p, m) for p, m in lists.items() if len(m) == num_experts and not _holds(p, m, router_path)]
        near_params = _nearest_params({p: n for p, n in params.items() if n not in exclude}, router_path,
                                      num_experts)
        stacked_loop = _stacked_sources(near_params, num_experts, exclude)
        grouped = _grouped_sources(near_params, num_experts, exclude)
        best = max(containers, key=lambda pm: (len(common_prefix([pm[0], router_path])), len(pm[0])), default=None)
        try:
            if best is not None:
                prefix, members = best
                sources = [list(members[e].values()) for e in range(num_experts)]
                role = {node: rest for e in members for rest, node in members[e].items()}
                template = extract_template(sources, role.__getitem__, None, graph)
                experts_path, weights, form, pnames = prefix, "modulelist", None, tuple(sorted(members[0]))
            elif stacked_loop[0]:
                stacked, sources = stacked_loop
                template = extract_template(sources, lambda s: source_path(s.args[0]), stacked, graph)
                experts_path = common_prefix(stacked) if len(stacked) > 1 else stacked_path_parent(next(iter(stacked)))
                weights, form, pnames = "stacked", "stacked-loop", tuple(p.split(".")[-1] for p in stacked)
            elif grouped:
                template = extract_template([list(grouped.values())], source_path, grouped, graph)
                experts_path = stacked_path_parent(next(iter(grouped)))
                # Gathering a weight matrix per row is batched_mm; gathering a bias per row happens in both forms.
                batched = any(u.target is operator.getitem for n in grouped.values() if fake(n).dim() >= 3
                              for u in n.users)
                weights, form = "stacked", "batched_mm" if batched else "grouped_mm"
                pnames = tuple(p.split(".")[-1] for p in grouped)
            else:
                if not (_expert_sized(params, lists, router_path, num_experts) or _router_named(gate, topk)):
                    continue  # a top-k over a linear's outputs with nothing MoE about it (sampling over a vocab)
                near[router_path] = _near_miss(topk, indices, gate, num_experts, k, graph,
                                               _why_no_experts(near_params, lists, num_experts))
                continue
            error = None
        except TemplateError as exc:
            template, error = None, str(exc)
            experts_path = best[0] if best else ""
            weights, form, pnames = ("modulelist" if best else "stacked"), None, ()

        block_path = common_prefix([router_path, experts_path])
        if form is None and template is not None:
            form = _loop_form(template, indices)
        # Only the block's own nodes describe its router (a later layer's ``* scaling`` is not a routed scale).
        own = {n for n in graph.nodes if _inside(module_path(n), block_path)}
        spec = MoESpec(path=block_path, form=form or "unknown", num_experts=num_experts,
                       router=_router_spec(topk, gate, k, own),
                       experts=ExpertsSpec(ffn=ffn_kind(template) if template else "unknown", weights=weights,
                                           path=experts_path, params=pnames,
                                           layouts=_layouts(template) if template else (),
                                           biases=any(p.endswith("bias") for p in pnames)))
        if error is None and (random := _random_op(own)):
            error = (f"the block draws random numbers ({random}: router jitter or dropout in training), so its "
                     "result cannot be reproduced to check a rewrite")
        # Capacity: the router itself counts each expert's tokens in order (Switch's cumsum over the one-hot ids).
        # (A cumsum of the [E] counts is a grouped GEMM's offsets, not positions within an expert.)
        if any(is_call(n, torch.cumsum, "cumsum") and _inside(module_path(n), router_path)
               and (v := fake(n.args[0])) is not None and v.dim() >= 2 for n in descendants([topk]) & own):
            spec.notes.append("capacity: a token past its expert's capacity is dropped")
        spec.shared_experts = tuple(sorted({_shared_path(module_path(n), block_path) for n in graph.nodes
                                            if "shared" in module_path(n) and module_path(n).startswith(block_path)}))
        # A later topk of the same block (the final selection after a group-limited one) replaces the earlier.
        blocks[block_path] = Block(spec=spec, topk=topk, indices=indices, x=gate.args[0], template=template,
                                   error=error, param_nodes=params,
                                   expert_x=_expert_input(template, gate.args[0], topk) if template else None)
    # A near miss inside (or around) a recognised block is one of its own selections (a group-limited top-k).
    misses = [b for path, b in near.items() if not any(_inside(path, p) or _inside(p, path) for p in blocks)]
    return list(blocks.values()) + misses


def _expert_input(template: ExpertTemplate, x: fx.Node, topk: fx.Node) -> fx.Node | None:
    """The value the experts gather their rows from by token index (``h[token_idx]``, ``h[perm // k]``), when it is
    another [tokens, d] value than the router's input ``x``; None when the experts read ``x`` (or its casts and
    views: the same values) or their rows are not gathered by index.

    MuseSpark routes on the hidden states and runs the experts on ``pre_expert_norm(pre_expert_proj(h))`` (a wider
    width); Gemma 4 normalises the router's input and the experts' input separately.
    """
    bases = set()
    for rows in template.per_expert_rows:
        if not (is_call(rows, operator.getitem) and isinstance(rows.args[0], fx.Node)
                and isinstance(rows.args[1], fx.Node)):
            return None  # rows split from a sorted copy, or every row (dense): nothing gathered by index here
        bases.add(rows.args[0])
    if len(bases) != 1:
        return None
    base = bases.pop()
    base_fake, x_fake = fake(base), fake(x)
    if base is x or base_fake is None or x_fake is None or base_fake.dim() != 2:
        return None
    tokens = str(x_fake.numel() // x_fake.shape[-1]) if isinstance(x_fake.shape[-1], int) and x_fake.shape[-1] else None
    if tokens is None or str(base_fake.shape[0]) != tokens:
        return None  # not one row per token of the router's input
    if base in _views_of(x) or x in _views_of(base):
        return None
    if topk in ancestors([base]):
        return None  # a copy arranged by the routing (rows sorted by expert), not the tokens themselves
    return base


_SAME_VALUES = {"view", "reshape", "contiguous", "to", "float", "type", "type_as", "flatten"}


def _views_of(node: fx.Node) -> set[fx.Node]:
    """``node`` and what it is a view or cast of (the chain of single-input reshapes and casts below it)."""
    chain = {node}
    while node.op in ("call_method", "call_function") and target_name(node) in _SAME_VALUES and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.add(node)
    return chain


def _expert_sized(params: dict[str, fx.Node], lists: dict, router_path: str, num_experts: int) -> bool:
    """Whether the graph holds E-sized expert candidates near ``router_path``: a ModuleList of E modules or a
    parameter stacked ``[E, ...]``, in the router's module or an enclosing one's."""
    owner = stacked_path_parent(router_path)
    near = [p for p, m in lists.items() if len(m) == num_experts and not _holds(p, m, router_path)]
    near += [stacked_path_parent(p) for p, n in params.items()
             if (v := fake(n)) is not None and v.dim() >= 2 and v.shape[0] == num_experts]
    return any(_inside(p, owner) or _inside(owner, p) for p in near)


def _holds(prefix: str, members: dict, router_path: str) -> bool:
    """The router runs inside one member of the ModuleList ``prefix``: those are the model's layers (two decoder
    layers and a top-1 over 2 scores in one of them), not the router's experts."""
    return any(_inside(router_path, f"{prefix}.{i}" if prefix else str(i)) for i in members)


_ROUTER_WORDS = re.compile(r"gate|gating|router|routing|moe|expert", re.IGNORECASE)


def _router_named(gate: fx.Node, topk: fx.Node) -> bool:
    """The selection lives in a module named like an MoE router (``mlp.gate``, ``moe.router``)."""
    weight = _router_weight(gate)
    names = [module_path(topk), module_path(gate), source_path(weight) if weight is not None else None]
    return any(name and _ROUTER_WORDS.search(name) for name in names)


def _no_router(topk: fx.Node) -> str:
    return (f"selection over the scores at {module_path(topk) or '<root>'} found, but no router: no linear or "
            "matmul producing one score per expert feeds it")


def _why_no_experts(near_params: dict[str, fx.Node], lists: dict, num_experts: int) -> str:
    """Which step of recognising the experts failed, in words a user can act on."""
    if not near_params:
        sizes = sorted({len(m) for m in lists.values()})
        lists_note = f" (ModuleLists here have {', '.join(map(str, sizes))} members)" if sizes else ""
        return (f"experts not recognised: no ModuleList of {num_experts} modules and no parameter stacked "
                f"[{num_experts}, ...] in this graph{lists_note}; the experts may run in another graph "
                "(a graph break between router and experts?)")
    uses = {path: _first_use(node) for path, node in sorted(near_params.items())}
    said = "; ".join(f"{path} {list(fake(near_params[path]).shape)} is read by {use}" for path, use in uses.items())
    why = ("experts not recognised: moecc reads stacked expert weights per expert (w[e]), whole by a grouped "
           f"GEMM (torch._grouped_mm) or gathered per row (w[ids]), but {said}")
    if any("einsum" in use for use in uses.values()):
        why += (". Einsum experts over [E, C, ...] capacity slots (GShard/Switch dispatch masks) are not rewritten: "
                "write the experts as w[e] or torch._grouped_mm over the routed rows, and ask for the drops with "
                "options={'moecc.capacity_factor': f}")
    return why


def _first_use(node: fx.Node) -> str:
    """The ops a stacked weight goes through before it is used for real: ``bfloat16 -> transpose -> einsum``."""
    chain = []
    while True:
        users = list(node.users)
        if not users:
            return " -> ".join(chain) or "nothing"
        names = sorted({f"`{target_name(u)}`" for u in users})
        chain.append(" / ".join(names))
        if len(users) != 1 or users[0].op != "call_method" or users[0].target not in _GROUPED_WEIGHT_VIEWS:
            return " -> ".join(chain)
        node = users[0]


def _near_miss(topk: fx.Node, indices: fx.Node, gate: fx.Node | None, num_experts: int, k: int, graph: fx.Graph,
               why: str) -> Block:
    """A selection over E scores beside E-sized parameters that is not a block moecc can rewrite: a report row
    with what was found and the step that failed."""
    router_path = module_path(topk)
    own = {n for n in graph.nodes if _inside(module_path(n), router_path)}
    router = _router_spec(topk, gate, k, own) if gate is not None else RouterSpec(score="unknown", top_k=k)
    if gate is not None:
        where = f"router found at {router_path or '<root>'} ({router.score}, top-{k} of {num_experts}); "
        why = where + why
    spec = MoESpec(path=router_path, form="unknown", num_experts=num_experts, router=router)
    x = gate.args[0] if gate is not None else topk.args[0]
    return Block(spec=spec, topk=topk, indices=indices, x=x, error=why, near_miss=True)


def _layouts(template: ExpertTemplate) -> tuple[str, ...]:
    """Each grouped weight as ``role [shape]`` of one expert's slice, in the order the template uses them."""
    seen = {}
    for ref in template.weights.values():
        value = fake(ref.nodes[0])
        shape = list(value.shape[1:] if ref.stacked else value.shape) if value is not None else []
        name = ref.role.rsplit(".", 1)[-1] if ref.stacked else ref.role
        seen.setdefault(ref.role, f"{name} {shape}{' (transposed)' if ref.transposed else ''}")
    return tuple(seen.values())


_RANDOM = {"uniform_", "normal_", "bernoulli", "bernoulli_", "exponential_", "rand", "randn", "rand_like",
           "randn_like", "randint", "multinomial"}


def _random_op(nodes) -> str | None:
    """The name of a random op among ``nodes`` (dropout counts only when it is on), or None."""
    for n in nodes:
        name = target_name(n) if n.op in ("call_function", "call_method") else ""
        if name in _RANDOM:
            return name
        if name in ("dropout", "dropout_") and n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True) \
                and (n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5) or 0) > 0:
            return name
    return None


def _inside(path: str, block_path: str) -> bool:
    return not block_path or path == block_path or path.startswith(block_path + ".")


def stacked_path_parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _shared_path(path: str, block_path: str) -> str:
    rest = path[len(block_path):].lstrip(".")
    head = re.match(r"([^.]*shared[^.]*)", rest)
    return head.group(1) if head else rest


def _loop_form(template: ExpertTemplate, indices: fx.Node) -> str:
    """How a ModuleList block hands rows to its experts: a loop over where/index, dense, or sorted split."""
    rows = template.per_expert_rows[0]
    if all(r is rows for r in template.per_expert_rows):
        return "dense-masked"
    if is_call(rows, operator.getitem) and is_call(rows.args[0], "split", torch.split):
        return "sorted"
    return "loop"

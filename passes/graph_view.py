"""What the MoE pass did to one block's part of the graph, as plain data for the report.

:func:`block_view` reads the original graph, the :class:`~.detect.Block` detection found on it and the graph the
pass returned, and lists the block's nodes stage by stage (router, dispatch, experts, combine, shared experts):
each node's op, target, shapes and dtypes, and whether the rewrite kept, removed or added it. For a fallback it
lists the original region and marks the nodes the reason names (where matching stopped). It changes nothing.

How nodes are told apart, without a node map from the pass:

* an original node survives when the returned graph has a node of its name sharing its recorded value and module
  stack (a graph copy keeps names and shares the meta's objects; a node the rewrite made shares neither);
* a block's inserted nodes are one contiguous run (``rewrite_block`` emits them before one node), starting at the
  ``get_attr`` of one of the block's buffers;
* stages of the original region come from data flow around the block's top-k, its expert ids, its experts'
  template and module paths; stages of the inserted run from where the expert ops sit in it.

Inserted nodes mostly carry no recorded value, so their shapes are propagated under a fresh fake mode of their own
(concrete sizes, deterministic names for data-dependent ones: ``u0``, ``u1``, ...).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

from .detect import Block
from .graph_utils import ancestors, descendants, fake, is_call, is_inplace, module_path, numel_key, target_name

STAGES = ("router", "dispatch", "experts", "combine", "shared")

KEPT, REMOVED, ADDED = "kept", "removed", "added"

# moecc ops that are Python functions in the graph, by the op they run.
_FUNCTION_OPS = {"routed_ffn": "moecc::expert_ffn"}
# Where a node of the inserted run starts the experts stage, and what ends it (rows going back to token order).
_EXPERT_OPS = ("moecc::grouped_mm", "moecc::expert_ffn")
_RETURN_OPS = ("moecc::permute_rows", "ep.return_rows")

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "bool"}


@dataclass(frozen=True, slots=True)
class NodeView:
    """One graph node as the report shows it."""

    name: str
    op: str  # the FX op: call_function, call_method, call_module, get_attr
    target: str  # what it calls: "softmax", "index_add_", "moecc::sort_by_slot"
    value: str  # shapes and dtypes of what it produces: "[8, 2] f32", "([8, 2] f32, [8, 2] i64)"; "" if none
    status: str  # KEPT, REMOVED (original nodes) or ADDED (inserted by the rewrite)
    stopped: bool = False  # a fallback's reason names this node: where matching stopped


@dataclass(frozen=True, slots=True)
class StageView:
    """One stage of a block: its nodes in the original graph and in the rewritten one, each in graph order."""

    name: str  # one of STAGES
    before: tuple[NodeView, ...]
    after: tuple[NodeView, ...]


@dataclass(frozen=True, slots=True)
class BlockView:
    """A block's region before and after the MoE pass (``after`` is empty for a fallback: nothing changed)."""

    path: str
    rewritten: bool
    reason: str  # why a fallback fell back; "" when rewritten
    stages: tuple[StageView, ...]
    error: str = ""  # the view itself could not be built (a moecc bug): why; the stages may then be empty

    @property
    def nodes_before(self) -> int:
        return sum(len(s.before) for s in self.stages)

    @property
    def nodes_after(self) -> int:
        return sum(len(s.after) for s in self.stages) if self.rewritten else self.nodes_before

    @property
    def stopped(self) -> tuple[str, ...]:
        """Names of the nodes a fallback's reason names."""
        return tuple(n.name for s in self.stages for n in s.before if n.stopped)

    def stage(self, name: str) -> StageView:
        return next(s for s in self.stages if s.name == name)


def block_view(original: fx.GraphModule, block: Block, rewritten: fx.GraphModule, outcome: str,
               buffers: dict[str, torch.Tensor] | None = None) -> BlockView:
    """The view of ``block`` (found on ``original``) in ``rewritten``; ``outcome`` and ``buffers`` are the
    block's result. Never raises: a failure is reported in ``BlockView.error``, so the report cannot break a
    compile."""
    is_rewritten = outcome == "rewritten"
    reason = "" if is_rewritten else outcome.split(": ", 1)[-1]  # "fallback: why", "not rewritten: why"
    try:
        stages = _stages(original, block, rewritten if is_rewritten else None, buffers or {}, reason)
        return BlockView(path=block.spec.path, rewritten=is_rewritten, reason=reason, stages=stages)
    except Exception as exc:  # a report must never cost a compile
        return BlockView(path=block.spec.path, rewritten=is_rewritten, reason=reason, stages=(),
                         error=f"{type(exc).__name__}: {exc}")


def _stages(original: fx.GraphModule, block: Block, rewritten: fx.GraphModule | None, buffers: dict,
            reason: str) -> tuple[StageView, ...]:
    stage_of = original_stages(original, block)
    stopped = set()
    if rewritten is None:  # a fallback: the original region, unchanged, with the nodes its reason names
        stopped = _named_nodes(reason, _block_nodes(original, block), block)
        stage_of = _with_named(original, stage_of, stopped)
        return tuple(StageView(name, tuple(_node_view(n, KEPT, n in stopped) for n in _in(stage_of, name)), ())
                     for name in STAGES)
    survivors = _survivors(original, rewritten)
    removed = [n for n in _block_nodes(original, block) if n.name not in survivors]
    stage_of = _with_leftovers(original, stage_of, [n for n in removed if n not in stage_of])
    added = inserted_run(rewritten, buffers, {id(n) for n in survivors.values()})
    added_stage = _run_stages(added)
    values = _propagate(rewritten, added)
    kept = {survivors[n.name]: stage for n, stage in stage_of.items() if n.name in survivors}  # copy -> its stage
    return tuple(StageView(
        name,
        before=tuple(_node_view(n, KEPT if n.name in survivors else REMOVED) for n in _in(stage_of, name)),
        after=tuple(_node_view(n, KEPT if n in kept else ADDED, value=values.get(n)) for n in rewritten.graph.nodes
                    if (n in kept and kept[n] == name) or added_stage.get(n) == name),
    ) for name in STAGES)


def _in(stage_of: dict[fx.Node, str], name: str) -> list[fx.Node]:
    return [n for n, s in stage_of.items() if s == name]  # (stage_of is in graph order)


# --- the original region -------------------------------------------------------------------------------------

def original_stages(gm: fx.GraphModule, block: Block) -> dict[fx.Node, str]:
    """The nodes of ``block``'s region in ``gm``, in graph order, each with its stage.

    Experts: the template's nodes of every expert (or, without a template, the experts module's nodes). Router:
    what computes the top-k from the router's input, and the routing weights derived from the top-k values.
    Dispatch: what derives the experts' input rows from the expert ids. Shared: the shared experts' modules.
    Combine: what follows the experts' outputs inside the block, and the accumulators they write into.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    spec = block.spec
    own = {n for n in nodes if _inside(module_path(n), spec.path) and _computes(n)}
    shared = {n for n in own if any(_inside(module_path(n), _join(spec.path, s)) for s in spec.shared_experts)}
    experts, outputs, rows = _expert_nodes(block, own)
    router = _router_nodes(block, own, experts)
    dispatch = _dispatch_nodes(block, own, experts, rows) - router - shared
    taken = experts | router | dispatch | shared
    combine = (descendants(outputs) & own) - taken
    # The accumulators the experts write into (``out.index_add_(...)``) and the per-row gathers they multiply by.
    combine |= {n.args[0] for n in combine if is_inplace(n) and isinstance(n.args[0], fx.Node)} & own
    combine |= (ancestors(combine) & own & descendants([block.topk])) - taken
    combine -= taken
    stage = {**{n: "combine" for n in combine}, **{n: "dispatch" for n in dispatch},
             **{n: "experts" for n in experts}, **{n: "router" for n in router}, **{n: "shared" for n in shared}}
    return {n: stage[n] for n in sorted(stage, key=position.__getitem__)}


def _computes(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def _inside(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _expert_nodes(block: Block, own: set[fx.Node]) -> tuple[set[fx.Node], list[fx.Node], list[fx.Node]]:
    """(every expert's computation, the experts' outputs, their input rows)."""
    template = block.template
    if template is None:  # detection failed before a template: the experts module's own nodes, if it has one
        path = block.spec.experts.path if block.spec.experts else ""
        if not path or path == block.spec.path:
            return set(), [], []
        found = {n for n in own if _inside(module_path(n), path)}
        return found, [], []
    outputs, rows = list(template.per_expert_outputs), list(template.per_expert_rows)
    sources = {s for s in template.sources if _computes(s)}
    body = (descendants(template.sources) | sources) & (ancestors(outputs) | set(outputs))
    for r, out in zip(rows, outputs):  # each expert's ops from its rows, also those no weight feeds (casts)
        body |= descendants([r]) & ancestors([out])
        body.add(out)
    return {n for n in body if _computes(n)} - set(rows), outputs, rows


def _router_nodes(block: Block, own: set[fx.Node], experts: set[fx.Node]) -> set[fx.Node]:
    """The top-k and what computes it from the router's input; the routing weights made from its values."""
    topk = block.topk
    tokens = ancestors([block.x]) | {block.x} if block.x is not None else set()
    found = ((ancestors([topk]) | {topk}) - tokens) & own
    found |= {u for u in topk.users if is_call(u, operator.getitem)}
    found |= {block.indices} if block.indices is not None else set()
    # Routing weights: float [tokens, k] values made from the top-k values (renormalised, cast), or gathered from
    # the scores at the ids (DeepSeek-V3); not what the experts or the dispatch make (weights permuted by a sort).
    after_ids = descendants([block.indices]) if block.indices is not None else set()
    after_experts = descendants(experts) | experts
    ids = fake(block.indices)
    weights = {n for n in descendants([topk]) & own if n not in after_experts and _routing_weight(n, ids)
               and (n not in after_ids or (is_call(n, torch.gather, "gather") and block.indices in n.args))}
    found |= weights | (ancestors(weights) & descendants([topk]) & own)
    return {n for n in found if _computes(n)}


def _routing_weight(node: fx.Node, ids: torch.Tensor | None) -> bool:
    value = fake(node)
    return ids is not None and value is not None and value.is_floating_point() \
        and numel_key(value) == numel_key(ids) and value.dim() <= ids.dim()


def _dispatch_nodes(block: Block, own: set[fx.Node], experts: set[fx.Node], rows: list[fx.Node]) -> set[fx.Node]:
    """What derives the experts' inputs from the expert ids (masks, ``where``, row gathers, sorts, counts)."""
    from_ids = descendants([block.indices]) & own if block.indices is not None else set()
    if not experts:
        return from_ids
    feeds_experts = ancestors(experts | set(rows)) | set(rows)
    return (from_ids & feeds_experts) - experts


def _block_nodes(gm: fx.GraphModule, block: Block) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _inside(module_path(n), block.spec.path) and _computes(n)]


def _with_named(gm: fx.GraphModule, stage_of: dict[fx.Node, str], named: set[fx.Node]) -> dict[fx.Node, str]:
    """``stage_of`` with the named nodes it lacks (a value an expert reads from outside, say), each in the stage
    of its first user that has one (the experts otherwise), in graph order."""
    stage = dict(stage_of)
    for n in named - set(stage_of):
        stage[n] = next((stage_of[u] for u in n.users if u in stage_of), "experts")
    return {n: stage[n] for n in gm.graph.nodes if n in stage}


_IDENTIFIER = r"[A-Za-z_]\w*"


def _with_leftovers(gm: fx.GraphModule, stage_of: dict[fx.Node, str], leftovers: list[fx.Node]
                    ) -> dict[fx.Node, str]:
    """``stage_of`` with the removed nodes the data flow rules did not place (checks on the sizes ``where``
    returned, an in-place un-permute, an accumulator's allocation): each in the stage of a user, else of an input,
    else dispatch (the old loop's bookkeeping), in graph order."""
    stage = dict(stage_of)
    todo = list(leftovers)
    while todo:
        placed = []
        for n in todo:
            near = [u for u in n.users if u in stage] or [a for a in n.all_input_nodes if a in stage]
            if near:
                stage[n] = stage[near[0]]
                placed.append(n)
        if not placed:
            stage.update({n: "dispatch" for n in todo})
            break
        todo = [n for n in todo if n not in stage]
    return {n: stage[n] for n in gm.graph.nodes if n in stage}


def _named_nodes(reason: str, candidates: list[fx.Node], block: Block) -> set[fx.Node]:
    """The region's nodes a fallback reason names, the most precise way it names them: nodes by name (a list of
    names in parentheses, "reads X", `X`), ops by name (`op`, "used by op", "(op: why)"), or expert ``e``
    ("expert e computes ...", "expert e's ...": its module's nodes). Descriptions in parentheses ("(softmax,
    top-2 of 4)") name nothing."""
    quoted = set(re.findall(r"`(" + _IDENTIFIER + r")`", reason))
    names = set(quoted) | set(re.findall(r"reads (" + _IDENTIFIER + ")", reason))
    for group in re.findall(r"\(([^)]*)\)", reason):
        items = [item.strip() for item in group.split(",")]
        if all(re.fullmatch(_IDENTIFIER, item) for item in items):
            names |= set(items)
    by_name = {n for n in candidates if n.name in names}
    if by_name:
        return by_name
    ops = quoted | set(re.findall(r"used by (" + _IDENTIFIER + ")", reason)) \
        | set(re.findall(r"\((" + _IDENTIFIER + "):", reason))
    by_target = {n for n in candidates if target_name(n) in ops}
    if by_target:
        return by_target
    expert = re.search(r"expert (\d+)(?: computes|'s )", reason)
    if expert and block.spec.experts and block.spec.experts.weights == "modulelist":
        path = _join(block.spec.experts.path, expert.group(1))
        return {n for n in candidates if _inside(module_path(n), path)}
    return set()


# --- the rewritten graph -------------------------------------------------------------------------------------

def _recorded(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _same_node(copy: fx.Node, node: fx.Node) -> bool:
    """``copy`` is a copy of ``node`` (graph copies keep the name and share the meta's objects), not a node the
    rewrite made that happens to reuse an erased node's name."""
    stack = node.meta.get("nn_module_stack")
    return copy.name == node.name and _recorded(copy) is _recorded(node) \
        and copy.meta.get("nn_module_stack") is stack and (_recorded(node) is not None or stack is not None)


def _survivors(original: fx.GraphModule, rewritten: fx.GraphModule) -> dict[str, fx.Node]:
    """Original node name -> its copy in ``rewritten``, for the original nodes still there."""
    there = {n.name: n for n in rewritten.graph.nodes}
    return {n.name: there[n.name] for n in original.graph.nodes if n.name in there and _same_node(there[n.name], n)}


def inserted_run(rewritten: fx.GraphModule, buffers: dict[str, torch.Tensor], originals: set[int]) -> list[fx.Node]:
    """The nodes the rewrite inserted for the block whose buffers are ``buffers``, in graph order: the run of nodes
    that are no copy of an original node (``originals``: their ids) from the first ``get_attr`` of a buffer."""
    mine = {id(t) for t in buffers.values()}
    nodes = list(rewritten.graph.nodes)
    start = next((i for i, n in enumerate(nodes) if n.op == "get_attr" and id(n) not in originals
                  and id(_attr(rewritten, n.target)) in mine), None)
    if start is None:
        return []
    run = []
    for n in nodes[start:]:
        if id(n) in originals or n.op in ("placeholder", "output"):
            break
        run.append(n)
    return run


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _run_stages(run: list[fx.Node]) -> dict[fx.Node, str]:
    """Stages of the inserted run, in the order ``emit_slot_moe`` emits them: dispatch until the first expert op,
    experts up to the last one and the template ops after it, combine from the rows going back to token order."""
    targets = [_target(n) for n in run]
    expert_at = [i for i, t in enumerate(targets) if t in _EXPERT_OPS]
    if not expert_at:
        return {n: "dispatch" for n in run}
    first, last = expert_at[0], expert_at[-1]
    back = next((i for i in range(last + 1, len(run)) if targets[i] in _RETURN_OPS), last + 1)
    return {n: "dispatch" if i < first else "experts" if i < back else "combine" for i, n in enumerate(run)}


def _propagate(gm: fx.GraphModule, run: list[fx.Node]) -> dict[fx.Node, str]:
    """Shapes and dtypes of the inserted nodes, run under a fake mode of our own from the recorded values of the
    nodes they read (so the compile's shape environment is never touched). Dynamo's size symbols (``s0``) become
    symbols of our own and print under Dynamo's names again, so both columns of the report speak of the same
    sizes; sizes only the rewrite's ops know (rows received under expert parallelism) print as ``r0``, ``r1``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    sizes = _Sizes(mode.shape_env)
    env: dict[fx.Node, object] = {}
    unknown = object()

    def value(n: fx.Node):
        if n not in env:
            env[n] = _fresh(_recorded(n), sizes, unknown)
        return env[n]

    out = {}
    with mode:
        for n in run:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), value)
            if any(a is unknown for a in _leaves((args, kwargs))):
                env[n] = unknown
                continue
            try:
                env[n] = _evaluate(gm, n, args, kwargs)
            except Exception:  # a value we cannot fake: the one the rewrite recorded, if any, else no shape
                env[n] = _fresh(_recorded(n), sizes, unknown)
            out[n] = "" if env[n] is unknown else describe_value(env[n], sizes.name)
    return out


class _Sizes:
    """Dynamo's size symbols as symbols of our own shape environment, and the way back for printing."""

    def __init__(self, shape_env):
        self.shape_env = shape_env
        self.ours: dict = {}  # Dynamo's symbol -> ours
        self.theirs: dict = {}  # ours -> Dynamo's, and our unbacked symbols -> r0, r1, ...

    def of(self, size):
        """``size`` (an int or Dynamo's SymInt) in our environment, or None when it has no value to start from."""
        if isinstance(size, int):
            return size
        if not isinstance(size, torch.SymInt) or size.node.hint is None:
            return None
        try:
            return self.shape_env.create_symintnode(size.node.expr.xreplace(
                {s: self._ours(s, size.node.shape_env) for s in size.node.expr.free_symbols}), hint=size.node.hint)
        except Exception:  # a symbol we cannot recreate: its value at this compile
            return size.node.hint

    def _ours(self, symbol, their_env):
        if symbol not in self.ours:
            from torch._dynamo.source import ConstantSource
            from torch.fx.experimental.symbolic_shapes import DimDynamic

            ours = self.shape_env.create_symbol(int(their_env.var_to_val[symbol]), ConstantSource(f"view_{symbol}"),
                                                dynamic_dim=DimDynamic.DYNAMIC, do_not_specialize_zero_one=True)
            self.ours[symbol], self.theirs[ours] = ours, symbol
        return self.ours[symbol]

    def name(self, size) -> str:
        if not isinstance(size, torch.SymInt):
            return str(size)
        import sympy

        for s in sorted(size.node.expr.free_symbols, key=str):
            if s not in self.theirs:  # a size only our fake ops made (``new_dynamic_size``)
                self.theirs[s] = sympy.Symbol(f"r{sum(1 for t in self.theirs.values() if str(t).startswith('r'))}")
        return str(size.node.expr.xreplace(self.theirs))


def _leaves(value) -> list:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _fresh(recorded, sizes: _Sizes, unknown):
    """A tensor of the current fake mode shaped like a recorded value; ints and None as they are."""
    if isinstance(recorded, torch.Tensor):
        shape = [sizes.of(d) for d in recorded.shape]
        if any(d is None for d in shape):
            return unknown
        return torch.empty(shape, dtype=recorded.dtype, device=recorded.device)
    if isinstance(recorded, (tuple, list)):
        items = [_fresh(r, sizes, unknown) for r in recorded]
        return unknown if any(i is unknown for i in items) else type(recorded)(items)
    if isinstance(recorded, torch.SymInt):
        return sizes.of(recorded) if sizes.of(recorded) is not None else unknown
    return recorded if isinstance(recorded, (int, float, bool)) or recorded is None else unknown


def _evaluate(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "get_attr":
        real = _attr(gm, node.target)  # a fresh fake of the buffer's shape: the buffer itself stays untouched
        return torch.empty(real.shape, dtype=real.dtype, device=real.device)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    raise ValueError(f"cannot evaluate a {node.op} node")


# --- how a node reads ----------------------------------------------------------------------------------------

def _node_view(node: fx.Node, status: str, stopped: bool = False, value: str | None = None) -> NodeView:
    shown = describe_value(_recorded(node)) if value is None else value
    return NodeView(name=node.name, op=node.op, target=_target(node), value=shown, status=status, stopped=stopped)


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):  # "moecc::sort_by_slot"; torch's own without "aten::"
        return target._schema.name.removeprefix("aten::")
    if node.op == "get_attr":
        return "buffer"  # its name says which one
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", "") or ""
    if name in _FUNCTION_OPS and module.startswith("moecc"):
        return _FUNCTION_OPS[name]
    if module.startswith("moecc"):  # moecc's Python-level graph functions: "ep.exchange_rows"
        return f"{module.rsplit('.', 1)[-1]}.{name}"
    return name


def describe_value(value, size_name=str) -> str:
    """``[8, 2] f32`` for a tensor, a tuple of those for several outputs, ``int`` for a size; "" for nothing.
    ``size_name`` prints one size (an int, or a symbol such as ``s0``)."""
    if isinstance(value, torch.Tensor):
        dims = ", ".join(size_name(d) for d in value.shape)
        return f"[{dims}] {_DTYPES.get(value.dtype, str(value.dtype).removeprefix('torch.'))}"
    if isinstance(value, (tuple, list)):
        parts = [describe_value(v, size_name) for v in value]
        return f"({', '.join(p or '-' for p in parts)})" if any(parts) else ""
    if isinstance(value, (bool, torch.SymBool)):  # (before int: a bool is an int)
        return "bool"
    if isinstance(value, (int, torch.SymInt)):
        return "int"
    if isinstance(value, (float, torch.SymFloat)):
        return "float"
    return ""

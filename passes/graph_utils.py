"""Small queries over a Dynamo FX graph shared by the passes: where a node lives, what it computes, who feeds it."""
from __future__ import annotations

import copy
import dataclasses
import operator
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx

_KEY_RE = re.compile(r"\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")
_CONTAINER_ATTRS = {"_modules", "_parameters", "_buffers"}


def source_path(node: fx.Node) -> str | None:
    """Dotted module path of a placeholder's source (``experts.0.w1.weight``), or None for a plain input."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return None
    name = grapharg.source.name() if callable(grapharg.source.name) else grapharg.source.name
    if not name.startswith("L['self']"):
        return None
    parts = [key or attr for key, attr in _KEY_RE.findall(name[len("L['self']") :])]
    return ".".join(p for p in parts if p not in _CONTAINER_ATTRS)


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module whose forward produced ``node`` ("" for the root module)."""
    cached = node.meta.get("moecc_module_path")
    if cached is not None:  # detection asks for every node once per block: keep it per node
        return cached
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("_modules['", "").replace("']", "")
    node.meta["moecc_module_path"] = path
    return path


def fake(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, if it produced one tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return len(a.shape) == len(b.shape) and all(str(x) == str(y) for x, y in zip(a.shape, b.shape))


def numel_key(t: torch.Tensor) -> str:
    """The element count as a comparable string: an int, or a symbolic expression over the graph's sizes."""
    return str(t.numel())


LOW_PRECISION = (torch.float16, torch.bfloat16)


def computes_in_low_precision(gm: fx.GraphModule) -> bool:
    """Whether any value of ``gm`` is half precision (torchtitan's bf16 grouped GEMMs inside an fp32 model): its
    outputs are then only as exact as bf16, whatever their dtype."""
    return any((v := fake(n)) is not None and v.dtype in LOW_PRECISION for n in gm.graph.nodes)


def target_name(node: fx.Node) -> str:
    """What a node calls, as a name: the method name, or the function's ``__name__``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def is_call(node: fx.Node, *targets) -> bool:
    """True if node calls one of ``targets`` (functions, or method names as strings)."""
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


LINEAR = (F.linear, torch._C._nn.linear)
MATMUL = (torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__")
TOPK = (torch.topk, "topk")
INPLACE_SETITEM = (operator.setitem,)


def is_inplace(node: fx.Node) -> bool:
    """A call that mutates its first argument (``x.index_add_(...)``, ``x[i] = v``, ``torch.add(..., out=)``)."""
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in INPLACE_SETITEM or "out" in node.kwargs:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


def descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        for user in n.users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def ancestors(roots: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        for arg in n.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") if p else [] for p in paths]
    prefix: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph over the same parameters and buffers, and the map from its nodes to the copy's.

    A rewrite works on the copy, so a rejected one leaves ``gm`` as it was; the node map carries what detection
    found on ``gm`` over to the copy (:func:`remap`).
    """
    node_map: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    value, old_output = graph.graph_copy(gm.graph, node_map, return_output_node=True)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    output = graph.output(value, type_expr=getattr(old_output, "type", None))
    output.meta = copy.copy(old_output.meta)
    node_map[old_output] = output
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    return new, node_map


def remap(value, node_map: dict[fx.Node, fx.Node]):
    """``value`` with every fx.Node in it replaced through ``node_map``, through lists, tuples, sets, dicts and
    dataclasses; an object with no node in it is returned as it is (so specs keep their identity)."""
    if isinstance(value, fx.Node):
        return node_map[value]
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [remap(v, node_map) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        items = {remap(k, node_map): remap(v, node_map) for k, v in value.items()}
        if all(a is b and items[a] is value[b] for a, b in zip(items, value)):
            return value
        return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: remap(getattr(value, f.name), node_map) for f in dataclasses.fields(value) if f.init}
        if all(changes[k] is getattr(value, k) for k in changes):
            return value
        return dataclasses.replace(value, **changes)
    return value

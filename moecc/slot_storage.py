"""Slot storage: under expert parallelism a rank stores only its slots, one ``[S, ...]`` tensor per weight kind.

The MoE pass checks an expert-parallel rewrite on a graph whose experts read their slots from the user's weights
(``backends.ep.slot_weights``: gradients still flow to the user's parameters, so the check compares like with
like). Once the rewrite is accepted, :func:`install` puts a real parameter in place of each of those nodes: the
slot tensor, holding this rank's copy of each hosted expert. The compiled graph then reads only the slots; the
user's expert parameters are inputs it never touches, and :func:`free` releases their storage the way FSDP frees
an unsharded parameter (``untyped_storage().resize_(0)``): the tensor keeps its shape, so Dynamo's guards still
hold and nothing recompiles, but it holds no bytes, no gradient and no optimizer state.

Legend: S slots on this rank, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from moecc.backends import ep as ep_ops
from moecc.backends.dispatch import SLOT_WEIGHTS


@dataclass(eq=False, slots=True)
class SlotKind:
    """One expert weight kind of a block as this rank stores it."""

    slots: torch.nn.Parameter  # [S, ...]: the expert of local slot s is the layer's ``local_experts[s]``
    originals: list[torch.Tensor]  # the user's parameters: one stacked [E, ...], or one per expert
    names: list[str] = field(default_factory=list)  # their names in the user's model (filled by the session)

    @property
    def stacked(self) -> bool:
        return len(self.originals) == 1

    @property
    def expert_shape(self) -> tuple[int, ...]:
        return tuple(self.slots.shape[1:])


def install(gm: fx.GraphModule, example_inputs, reuse: dict[int, list[SlotKind]] | None = None
            ) -> tuple[dict[int, list[SlotKind]], dict[int, list[list[int]]]]:
    """Replace each ``slot_weights`` node of ``gm`` by a parameter of ``gm`` holding its value.

    Returns, per strategy (``id`` of the block's dispatch strategy, from the node's tag), its kinds in kind order
    and, per kind, the graph-input positions of the user's weights it was read from. ``reuse`` gives, for a
    strategy, kinds already stored (a recompiled block reads the slots its layer holds). A node whose weights are
    not graph inputs stays as it is (the block then reads through the user's weights: right, but not sharded).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = dict(zip(placeholders, example_inputs))
    index = {n: i for i, n in enumerate(placeholders)}
    found: dict[int, dict[int, tuple[SlotKind, list[int]]]] = {}
    for node in list(gm.graph.nodes):
        tag = node.meta.get(SLOT_WEIGHTS)
        if tag is None or node.op != "call_function":
            continue
        strategy, kind = tag
        weight_nodes, experts_S = node.args
        if not all(n in real for n in weight_nodes):
            continue
        if reuse and strategy in reuse:
            entry = reuse[strategy][kind]
        else:
            originals = [real[n] for n in weight_nodes]
            with torch.no_grad():
                value = ep_ops.slot_weights([t.detach() for t in originals], experts_S).clone()
            entry = SlotKind(slots=torch.nn.Parameter(value, requires_grad=originals[0].requires_grad),
                             originals=originals)
        name = f"moecc_slots_{len(list(gm.named_parameters()))}"
        gm.register_parameter(name, entry.slots)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        found.setdefault(strategy, {})[kind] = (entry, [index[n] for n in weight_nodes])
    gm.graph.lint()
    gm.recompile()
    kinds = {strategy: [by_kind[k][0] for k in sorted(by_kind)] for strategy, by_kind in found.items()}
    positions = {strategy: [by_kind[k][1] for k in sorted(by_kind)] for strategy, by_kind in found.items()}
    return kinds, positions


def exclusively_owned(t: torch.Tensor) -> bool:
    """Whether freeing ``t``'s storage frees nothing else (it is the whole storage, not a view into a bigger one)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def free(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Release the storage of ``tensors`` (shape kept, bytes gone); returns those that could not be freed."""
    kept = []
    for t in tensors:
        if t.untyped_storage().nbytes() == 0:
            continue
        if exclusively_owned(t):
            t.grad = None
            t.untyped_storage().resize_(0)
        else:
            kept.append(t)
    return kept


def is_freed(t: torch.Tensor) -> bool:
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def stand_in(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Values for a freed expert weight while a later graph is checked (a recompile, an eval graph): the same on
    every rank without communication, so the ranks' checks agree. The check compares two graphs on the same
    weights; which weights does not matter."""
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.05
    return torch.nn.Parameter(value.to(device=t.device, dtype=t.dtype), requires_grad=t.requires_grad)


@dataclass(eq=False, slots=True)
class Binding:
    """How one compiled graph reaches one block's slots and placement buffers: as trailing graph inputs, picked
    at each call by the user's expert tensors the call passes. Dynamo reuses a graph for every instance of a
    module class (parameters are graph inputs), so slots and buffers baked into the graph would serve a second
    instance the first one's experts."""

    positions: list[list[int]]  # per weight kind, the graph-input position of each of the user's expert tensors
    buffer_keys: list[str]  # the block's buffers, in input order after its slot tensors
    template: object  # the runtime.SlotLayer compiled with this graph (another instance copies its layout)
    config: object  # its expert-parallel layout as compiled
    initial_buffers: dict = field(default_factory=dict)  # its buffers as compiled (before any switch)


def lift(gm: fx.GraphModule, layers: dict[int, object], positions: dict[int, list[list[int]]]) -> list[Binding]:
    """Turn every get_attr of a sharded layer's slot tensors and buffers in ``gm`` into a trailing placeholder;
    returns one :class:`Binding` per sharded block (``layers``: strategy id -> layer), in placeholder order."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    attrs = {id(t): name for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    bindings = []
    for strategy, layer in layers.items():
        if not layer.kinds or strategy not in positions:
            continue
        keys = sorted(k for k in layer.buffers if id(layer.buffers[k]) in attrs)
        for target in [attrs[id(k.slots)] for k in layer.kinds] + [attrs[id(layer.buffers[k])] for k in keys]:
            with gm.graph.inserting_after(last):
                last = gm.graph.placeholder(f"moecc_{target}")
            for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]:
                last.meta = dict(node.meta)
                node.replace_all_uses_with(last)
                gm.graph.erase_node(node)
            delattr(gm, target)  # AOTAutograd would lift it as an input of its own
        bindings.append(Binding(positions=positions[strategy], buffer_keys=keys, template=layer,
                                config=layer.config,
                                initial_buffers={k: v.detach().clone() for k, v in layer.buffers.items()}))
    gm.graph.lint()
    gm.recompile()
    return bindings

"""The MoE pass: detect every block, rewrite each into expert-slot form, keep only the rewrites that check out.

A pass is a function from graph to graph plus a record of what it did; the records feed ``moecc.report()``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import fx

from .detect import detect_moe_blocks
from .expert_template import TemplateError
from .ffn_match import FusedFFN, match_fused_ffn
from .graph_utils import fake
from .rewrite_slots import RewriteError, record_routing_values, rewrite_block
from .spec import MoESpec
from .validate import check_equivalent


def concrete_inputs(example_inputs) -> list:
    """Dynamo hands dynamic sizes as SymInts; the numeric probe and the checks run eagerly on their values."""
    return [a.node.hint if isinstance(a, torch.SymInt) and a.node.hint is not None else a for a in example_inputs]


@dataclass(kw_only=True, slots=True)
class BlockRecord:
    """What happened to one MoE block."""

    spec: MoESpec
    outcome: str  # "rewritten" or "fallback: <reason>"
    graph: str  # the Dynamo graph it was found in
    check_s: float = 0.0
    kernel: str = ""  # how the experts run: "fused glu-silu" (one moecc::expert_ffn) or "grouped GEMM"
    layout: str = ""  # expert parallelism: the expert in each slot, per rank
    send_rows: list[int] | None = None  # rows this rank sent to each rank on the example step

    @property
    def rewritten(self) -> bool:
        return self.outcome == "rewritten"


def moe_pass(gm: fx.GraphModule, example_inputs, graph_name: str = "",
             options: dict | None = None) -> tuple[fx.GraphModule, list[BlockRecord]]:
    """Rewrite the MoE blocks of ``gm``; a block that fails detection, rewrite or validation stays as it was.

    ``options`` are the ``moecc.*`` compile options without their prefix (see ``backends.ep.resolve``).
    """
    from moecc.backends import ep as ep_mod

    options = options or {}
    records = []
    layers = []  # (runtime layer, its buffers' name prefix)
    current = gm
    example_inputs = concrete_inputs(example_inputs)
    blocks = detect_moe_blocks(gm)
    plans = []  # (index, block, ep config, fused FFN or None) of each block worth rewriting
    for i, block in enumerate(blocks):
        if block.error is not None:
            records.append(BlockRecord(spec=block.spec, outcome=f"fallback: {block.error}", graph=graph_name))
            continue
        ep = ep_mod.resolve(options, block.spec.num_experts)
        if ep is not None:
            ep_mod.check_same_on_all_ranks(ep, block.spec.path)  # raises on every rank, before any all-to-all
        ffn = None
        if options.get("fused_ffn", True) and block.template is not None:
            ffn = match_fused_ffn(block.template)
        plans.append((i, block, ep, ffn))
    together = _rewrite_all_and_check(gm, plans, example_inputs, options) if len(plans) > 1 else None
    if together is not None:  # the common case: one check for the whole graph instead of one per block
        current, send_rows, elapsed = together
        for (i, block, ep, ffn), rows in zip(plans, send_rows):
            layers.append((_runtime_layer(block, ep, gm, example_inputs, options.get("pool")),
                           f"moecc_placement_{i}_"))
            records.append(_accepted(block, graph_name, elapsed / len(plans), ffn, ep, rows))
        plans = []
    for i, block, ep, ffn in plans:  # one block at a time, each checked on its own and kept only if it agrees
        start = time.perf_counter()
        candidate, reason, send_rows = _rewrite_and_check(current, block, example_inputs, i, ep, options, ffn)
        if reason is not None and ffn is not None:  # the fused op is an optimisation: retry on the lifted template
            candidate, reason, send_rows = _rewrite_and_check(current, block, example_inputs, i, ep, options, None)
            ffn = None
        elapsed = time.perf_counter() - start
        if reason is None:
            layers.append((_runtime_layer(block, ep, current, example_inputs, options.get("pool")),
                           f"moecc_placement_{i}_"))
            current = candidate
            records.append(_accepted(block, graph_name, elapsed, ffn, ep, send_rows))
        else:
            records.append(BlockRecord(spec=block.spec, outcome=f"fallback: {reason}", graph=graph_name,
                                       check_s=elapsed))
    records.sort(key=lambda r: next(j for j, b in enumerate(blocks) if b.spec is r.spec))
    for name, buf in current.named_buffers():
        if name.endswith("_load_counts"):
            buf.zero_()  # the checks above ran the graph; the monitor counts training steps only
        if name.endswith("_capacity_factor"):
            buf.fill_(float(options["capacity_factor"]))  # checked dropless; now drop as asked
    _register_layers(layers, current)
    return current, records


def _accepted(block, graph_name: str, elapsed: float, ffn, ep, send_rows) -> BlockRecord:
    return BlockRecord(spec=block.spec, outcome="rewritten", graph=graph_name, check_s=elapsed,
                       kernel=ffn.kind if ffn is not None else "grouped GEMM",
                       layout=ep.describe() if ep else "", send_rows=send_rows)


def _rewrite_all_and_check(gm: fx.GraphModule, plans, example_inputs, options: dict):
    """Every planned block rewritten in one copy of ``gm`` and checked once: (copy, rows sent per block,
    seconds), or None if any rewrite or the check fails (the caller then goes block by block, which finds the
    culprit and keeps the rest). Under expert parallelism every step's outcome is agreed across ranks, so all
    ranks leave this path together."""
    from moecc.backends import ep as ep_mod

    start = time.perf_counter()
    candidate = copy.deepcopy(gm)
    eps = [ep for _, _, ep, _ in plans if ep is not None]
    send_rows = []
    try:  # one detection and one recording run serve every block (twins keep their nodes' names)
        twins = {b.spec.path: b for b in detect_moe_blocks(candidate)}
        values = record_routing_values(gm, [block for _, block, _, _ in plans], example_inputs)
        reason = None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if eps:
        reason = ep_mod.agree_on_outcome(eps[0], reason)
    if reason is not None:
        return None
    for i, block, ep, ffn in plans:
        try:
            twin = twins[block.spec.path]
            send_rows.append(rewrite_block(candidate, twin, example_inputs, buffer_name=f"moecc_placement_{i}",
                                           ep=ep, capacity=options.get("capacity_factor") is not None,
                                           ffn=_same_ffn(ffn, block, twin) if ffn is not None else None,
                                           values=values))
            reason = None
        except Exception as exc:  # any failure sends every block down the one-at-a-time path
            reason = f"{type(exc).__name__}: {exc}"
        if eps:
            reason = ep_mod.agree_on_outcome(eps[0], reason)
        if reason is not None:
            return None
    try:
        reason = check_equivalent(gm, candidate, example_inputs,
                                  reduce_grads=ep_mod.sum_over_ranks(eps[0]) if eps else None)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if eps:
        reason = ep_mod.agree_on_outcome(eps[0], reason)
    return None if reason is not None else (candidate, send_rows, time.perf_counter() - start)


def _rewrite_and_check(current: fx.GraphModule, block, example_inputs, i: int, ep, options: dict, ffn):
    """(rewritten copy of ``current``, None or the reason it was rejected, rows sent per rank)."""
    from moecc.backends import ep as ep_mod

    candidate = copy.deepcopy(current)
    # The copy has its own nodes: find this block again there (detection is deterministic).
    twin = next(b for b in detect_moe_blocks(candidate) if b.spec.path == block.spec.path)
    twin_ffn = _same_ffn(ffn, block, twin) if ffn is not None else None
    send_rows = None
    try:
        send_rows = rewrite_block(candidate, twin, example_inputs, buffer_name=f"moecc_placement_{i}", ep=ep,
                                  capacity=options.get("capacity_factor") is not None, ffn=twin_ffn)
        reason = check_equivalent(current, candidate, example_inputs,
                                  reduce_grads=ep_mod.sum_over_ranks(ep) if ep is not None else None)
    except (RewriteError, TemplateError) as exc:
        reason = str(exc)
    except Exception as exc:  # an unexpected failure must cost a fallback, never a wrong model
        reason = f"internal error: {type(exc).__name__}: {exc}"
    if ep is not None:
        reason = ep_mod.agree_on_outcome(ep, reason)  # ranks must keep the same graph, or collectives hang
    return candidate, reason, send_rows


def _same_ffn(ffn: FusedFFN, block, twin) -> FusedFFN:
    """``ffn`` with its weight references moved to the twin block's template (matched by role)."""
    by_role = {ref.role: ref for ref in twin.template.weights.values()}
    moved = {name: by_role[getattr(ffn, name).role] if getattr(ffn, name) is not None else None
             for name in ("w1", "w3", "w2")}
    return FusedFFN(activation=ffn.activation, flags=ffn.flags, **moved)


def _register_layers(layers, final: fx.GraphModule) -> None:
    """Hand the runtime each layer with the buffers of the module that will be compiled.

    Each later rewrite worked on a deep copy, so buffers seen while rewriting an earlier block are orphans; look
    them up by name in the final module.
    """
    from moecc import runtime

    buffers = dict(final.named_buffers())
    for layer, prefix in layers:
        layer.buffers = {name[len(prefix):]: buf for name, buf in buffers.items() if name.startswith(prefix)}
        runtime.register(layer)


def _runtime_layer(block, ep, original: fx.GraphModule, example_inputs, pool=None):
    """The runtime's view of a rewritten block: which real parameters are its experts (buffers come later)."""
    from moecc import runtime
    from moecc.backends import ep as ep_mod

    # By name: ``block`` was detected on the first graph, ``original`` may be a copy made by an earlier rewrite.
    real = {n.name: v for n, v in zip((n for n in original.graph.nodes if n.op == "placeholder"), example_inputs)}
    expert_params: list[list] = [[] for _ in range(block.spec.num_experts)]
    stacked = []
    for ref in {id(r): r for r in block.template.weights.values()}.values():
        if ref.stacked:
            stacked.append(real[ref.nodes[0].name])
        else:
            for e, node in enumerate(ref.nodes):
                expert_params[e].append(real[node.name])
    stacked = list({id(p): p for p in stacked}.values())
    d_model = int(fake(block.x).shape[-1])
    per_expert = sum(p.numel() for p in expert_params[0]) if not stacked else \
        sum(p[0].numel() for p in stacked if p.dim() >= 3)
    return runtime.SlotLayer(path=block.spec.path, num_experts=block.spec.num_experts, d_model=d_model,
                             d_ffn=max(1, per_expert // (3 * d_model)), config=ep,
                             expert_params=expert_params if not stacked else [], stacked_params=stacked,
                             pool=pool if ep is not None and pool is not None and pool.layout == ep.layout else None,
                             local_placement=None if ep else ep_mod.default_placement(block.spec.num_experts, 1))

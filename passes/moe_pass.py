"""The MoE pass: detect every block, rewrite each into expert-slot form, keep only the rewrites that check out.

A pure function from a graph to a graph plus what it did: :func:`moe_pass` returns the rewritten graph module and
one :class:`BlockResult` per block (its spec, outcome, the buffers it added and the expert parameters it reads).
It registers nothing anywhere; ``moecc/backend.py`` hands the results to the session, runtime and report.

Rewrites are made on copies (``graph_utils.copy_graph_module``) and the nodes found by detection are carried over
through the copy's node map, so a rejected rewrite costs nothing but the copy.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from .detect import Block, detect_moe_blocks
from .expert_template import TemplateError
from .ffn_match import FusedFFN, match_fused_ffn
from .graph_utils import copy_graph_module, fake, remap
from .graph_view import block_view
from .rewrite_slots import RewriteError, Routing, find_routing, record_routing_values, rewrite_block
from .spec import MoESpec
from .validate import check_equivalent


@dataclass(frozen=True, kw_only=True, slots=True)
class PassConfig:
    """What the MoE pass needs of a compile's options."""

    dispatch: Callable  # (block path, num_experts) -> a dispatch strategy (``backends.dispatch.choose_dispatch``)
    fused_ffn: bool = True  # try the fused expert op before the lifted template
    capacity_factor: float | None = None  # drop rows past capacity (checked dropless, then set); None: dropless


@dataclass(kw_only=True, slots=True)
class ExpertWeights:
    """The real expert parameters a rewritten block reads: per expert (ModuleList) or stacked ``[E, ...]``."""

    per_expert: list[list[torch.Tensor]] = field(default_factory=list)
    stacked: list[torch.Tensor] = field(default_factory=list)

    def of_expert(self, e: int) -> list[torch.Tensor]:
        """Expert e's tensors (views into stacked ones)."""
        return list(self.per_expert[e]) if self.per_expert else [p[e] for p in self.stacked]

    def all(self) -> list[torch.Tensor]:
        return [p for ps in self.per_expert for p in ps] + list(self.stacked)


@dataclass(kw_only=True, slots=True)
class BlockResult:
    """What happened to one MoE block, and what a rewritten one hands the runtime."""

    spec: MoESpec
    outcome: str  # "rewritten", "fallback: <reason>", or "not rewritten: <the detection step that failed>"
    graph: str  # the Dynamo graph it was found in
    check_s: float = 0.0
    kernel: str = ""  # how the experts run: "fused glu-silu" (one moecc::expert_ffn) or "grouped GEMM"
    dispatch: object | None = None  # the block's strategy (``backends.dispatch``), rewritten blocks only
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # placement tensors, load_counts, capacity
    experts: ExpertWeights | None = None
    d_model: int = 0
    send_rows: list[int] | None = None  # rows this rank sent to each rank on the example step
    view: object | None = None  # passes.graph_view.BlockView: the block's nodes before and after, for the report

    @property
    def rewritten(self) -> bool:
        return self.outcome == "rewritten"

    @property
    def layout(self) -> str:
        """Expert parallelism: the expert in each slot, per rank ("" on one process)."""
        return self.dispatch.describe() if self.dispatch is not None else ""


@dataclass(slots=True)
class _Plan:
    index: int
    block: Block
    dispatch: object
    ffn: FusedFFN | None
    routing: Routing | None = None


def moe_pass(gm: fx.GraphModule, example_inputs, config: PassConfig,
             graph_name: str = "") -> tuple[fx.GraphModule, list[BlockResult]]:
    """Rewrite the MoE blocks of ``gm``; a block that fails detection, rewrite or validation stays as it was."""
    example_inputs = concrete_inputs(example_inputs)
    blocks = detect_moe_blocks(gm)
    results: dict[int, BlockResult] = {}
    plans = []
    for i, block in enumerate(blocks):
        if block.error is not None:  # a near miss was never a block: nothing to fall back from
            outcome = f"{'not rewritten' if block.near_miss else 'fallback'}: {block.error}"
            results[i] = BlockResult(spec=block.spec, outcome=outcome, graph=graph_name)
            continue
        ffn = match_fused_ffn(block.template) if config.fused_ffn and block.template is not None else None
        plans.append(_Plan(i, block, config.dispatch(block.spec.path, block.spec.num_experts), ffn))
    if not plans:
        return gm, _viewed(gm, blocks, gm, results)
    agree = plans[0].dispatch.agree  # every strategy of a compile shares one group: one place to agree

    # One recording run of the original graph finds every block's routing values.
    values, reason = _agreed(agree, lambda: record_routing_values(gm, [p.block for p in plans], example_inputs))
    if reason is None:
        for plan in plans:
            plan.routing, why = _agreed(agree, lambda plan=plan: find_routing(gm, plan.block, example_inputs,
                                                                               plan.ffn, values))
            if why is not None and plan.ffn is not None:  # the fused op's probe failed: the lifted template may not
                plan.ffn = None
                plan.routing, why = _agreed(agree, lambda plan=plan: find_routing(gm, plan.block, example_inputs,
                                                                                   None, values))
            if why is not None:
                results[plan.index] = BlockResult(spec=plan.block.spec, outcome=f"fallback: {why}", graph=graph_name)
        plans = [p for p in plans if p.routing is not None]

    real = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))
    current = gm
    together = _rewrite_and_check(gm, gm, {}, plans, example_inputs, config, agree) if len(plans) > 1 else None
    if isinstance(together, tuple):  # the common case: one check for the whole graph instead of one per block
        current, accepted, elapsed, _ = together
        for plan, (buffers, rows) in zip(plans, accepted):
            results[plan.index] = _accepted(plan, real, graph_name, elapsed / len(plans), buffers, rows)
        plans = []
    to_current: dict[fx.Node, fx.Node] = {n: n for n in gm.graph.nodes}
    for plan in plans:  # one block at a time, each checked on its own and kept only if it agrees
        start = time.perf_counter()
        outcome = _rewrite_and_check(gm, current, to_current, [plan], example_inputs, config, agree)
        if not isinstance(outcome, tuple) and plan.ffn is not None:  # fused is an optimisation: retry it lifted
            plan.ffn = None
            outcome = _rewrite_and_check(gm, current, to_current, [plan], example_inputs, config, agree)
        elapsed = time.perf_counter() - start
        if isinstance(outcome, tuple):
            current, [(buffers, rows)], _, to_current = outcome
            results[plan.index] = _accepted(plan, real, graph_name, elapsed, buffers, rows)
        else:
            results[plan.index] = BlockResult(spec=plan.block.spec, outcome=f"fallback: {outcome}",
                                              graph=graph_name, check_s=elapsed)
    for result in results.values():
        if "load_counts" in result.buffers:
            result.buffers["load_counts"].zero_()  # the checks ran the graph; the monitor counts training steps only
        if "capacity_factor" in result.buffers:
            result.buffers["capacity_factor"].fill_(config.capacity_factor)  # checked dropless; now drop as asked
    return current, _viewed(gm, blocks, current, results)


def _viewed(original: fx.GraphModule, blocks: list[Block], rewritten: fx.GraphModule,
            results: dict[int, BlockResult]) -> list[BlockResult]:
    """The results in block order, each with its graph view (what the report shows of the block's nodes)."""
    for i, result in results.items():
        result.view = block_view(original, blocks[i], rewritten, result.outcome, result.buffers)
    return [results[i] for i in sorted(results)]


def concrete_inputs(example_inputs) -> list:
    """Dynamo hands dynamic sizes as SymInts; the numeric probe and the checks run eagerly on their values."""
    return [a.node.hint if isinstance(a, torch.SymInt) and a.node.hint is not None else a for a in example_inputs]


def _agreed(agree, step):
    """(``step()``'s value or None, None or why it failed), the outcome agreed by every rank.

    The one place where the pass meets expert parallelism's rule: every rank keeps the same graph, or collectives
    hang. An unexpected failure costs a fallback, never a wrong model.
    """
    try:
        value, reason = step(), None
    except (RewriteError, TemplateError) as exc:
        value, reason = None, str(exc)
    except Exception as exc:
        value, reason = None, f"internal error: {type(exc).__name__}: {exc}"
    reason = agree(reason)
    return (value if reason is None else None), reason


def _rewrite_and_check(original: fx.GraphModule, current: fx.GraphModule, to_current: dict, plans: list[_Plan],
                       example_inputs, config: PassConfig, agree):
    """Rewrite ``plans``' blocks (found on ``original``) in one copy of ``current`` and check the copy against
    ``current``: (copy, [(buffers, rows sent)] per plan, seconds, node map original -> copy), or the reason."""
    start = time.perf_counter()
    candidate, node_map = copy_graph_module(current)
    if to_current:  # the blocks' nodes, through the copies made by earlier accepted rewrites
        node_map = {o: node_map[c] for o, c in to_current.items() if c in node_map}
    accepted = []
    for plan in plans:
        dispatch = plan.dispatch

        def rewrite(plan=plan, dispatch=dispatch):
            try:
                block, routing, ffn = remap((plan.block, plan.routing, plan.ffn), node_map)
            except KeyError:
                raise RewriteError("an earlier rewrite removed a node this block reads") from None
            buffers = rewrite_block(candidate, block, routing, dispatch, buffer_name=f"moecc_block_{plan.index}",
                                    capacity=config.capacity_factor is not None, ffn=ffn)
            return buffers, dispatch.send_rows(routing.indices_value, block.spec.router.top_k, buffers)

        done, reason = _agreed(agree, rewrite)
        if reason is not None:
            return reason
        accepted.append(done)
    _, reason = _agreed(agree, lambda: _raise_if(check_equivalent(current, candidate, example_inputs,
                                                                  reduce_grads=plans[0].dispatch.reduce_grads)))
    if reason is not None:
        return reason
    return candidate, accepted, time.perf_counter() - start, node_map


def _raise_if(reason: str | None) -> None:
    if reason is not None:
        raise RewriteError(reason)


def _accepted(plan: _Plan, real: dict, graph_name: str, elapsed: float, buffers: dict, send_rows) -> BlockResult:
    return BlockResult(spec=plan.block.spec, outcome="rewritten", graph=graph_name, check_s=elapsed,
                       kernel=plan.ffn.kind if plan.ffn is not None else "grouped GEMM", dispatch=plan.dispatch,
                       buffers=buffers, experts=_expert_weights(plan.block, real),
                       d_model=int(fake(plan.block.rows_from).shape[-1]), send_rows=send_rows)


def _expert_weights(block: Block, real: dict) -> ExpertWeights:
    """The real tensors behind the template's weight placeholders (``real``: the original graph's placeholders to
    the example inputs)."""
    weights = ExpertWeights(per_expert=[[] for _ in range(block.spec.num_experts)])
    for ref in {id(r): r for r in block.template.weights.values()}.values():
        if ref.stacked:
            if not any(real[ref.nodes[0]] is p for p in weights.stacked):
                weights.stacked.append(real[ref.nodes[0]])
        else:
            for e, node in enumerate(ref.nodes):
                weights.per_expert[e].append(real[node])
    if weights.stacked:
        weights.per_expert = []
    return weights

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
from .rewrite_slots import RewriteError, rewrite_block
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

    @property
    def rewritten(self) -> bool:
        return self.outcome == "rewritten"


def moe_pass(gm: fx.GraphModule, example_inputs, graph_name: str = "") -> tuple[fx.GraphModule, list[BlockRecord]]:
    """Rewrite the MoE blocks of ``gm``; a block that fails detection, rewrite or validation stays as it was."""
    records = []
    current = gm
    example_inputs = concrete_inputs(example_inputs)
    blocks = detect_moe_blocks(gm)
    for i, block in enumerate(blocks):
        start = time.perf_counter()
        if block.error is not None:
            records.append(BlockRecord(spec=block.spec, outcome=f"fallback: {block.error}", graph=graph_name))
            continue
        candidate = copy.deepcopy(current)
        # The copy has its own nodes: find this block again there (detection is deterministic).
        twin = next(b for b in detect_moe_blocks(candidate) if b.spec.path == block.spec.path)
        try:
            rewrite_block(candidate, twin, example_inputs, buffer_name=f"moecc_placement_{i}")
            reason = check_equivalent(current, candidate, example_inputs)
        except (RewriteError, TemplateError) as exc:
            reason = str(exc)
        except Exception as exc:  # an unexpected failure must cost a fallback, never a wrong model
            reason = f"internal error: {type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        if reason is None:
            current = candidate
            records.append(BlockRecord(spec=block.spec, outcome="rewritten", graph=graph_name, check_s=elapsed))
        else:
            records.append(BlockRecord(spec=block.spec, outcome=f"fallback: {reason}", graph=graph_name,
                                       check_s=elapsed))
    return current, records

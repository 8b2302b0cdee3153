"""Recognise an expert template that ``moecc::expert_ffn`` computes whole: ``act(x W1) [* x W3] W2``.

The lifted template (``expert_template.emit_grouped``) runs any row-wise expert as grouped GEMMs plus the user's
elementwise ops, which Inductor fuses over whole ``[rows, ffn]`` tensors. The common FFNs (SwiGLU, GeGLU, plain
two-layer MLPs with silu, gelu or relu, without biases) can instead run as one fused op, tile by tile
(``backends/expert_ffn_cpu.py``). This pass decides which weights play which part, and proves it numerically:
the lifted template and the fused op must agree on random rows and weights for the chosen activation and
layout. Anything else keeps the lifted template.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import fx

from .expert_template import (
    ExpertTemplate,
    WeightRef,
    emit_grouped,
    is_grouped_call,
    weight_dims,
)
from .graph_utils import LINEAR, MATMUL, fake, is_call, target_name

# Ops an FFN template may contain besides its matmuls: activations, the gating product, splitting a
# concatenated gate/up projection, and row-wise views and casts. Anything else (clamps, biases, scalings)
# keeps the lifted template, even if random probes could not tell the difference.
_ALLOWED = {"silu", "gelu", "relu", "mul", "__mul__", "chunk", "split", "getitem", "to", "float", "type",
            "contiguous", "view", "reshape", "unsqueeze", "squeeze"}


@dataclass(frozen=True, slots=True)
class FusedFFN:
    """How a template maps onto ``moecc::expert_ffn``: the weights by part, their layouts, the activation."""

    activation: str
    w1: WeightRef  # the gate (or the whole first layer; or [gate | up] concatenated)
    w3: WeightRef | None  # the up projection when it is a weight of its own
    w2: WeightRef  # the down projection
    flags: tuple[int, int, int, int]  # transpose_w of w1, w3, w2, then the GLU mode (see expert_ffn_cpu)

    @property
    def kind(self) -> str:
        gated = self.flags[3] != 0
        return f"fused {'glu' if gated else 'mlp'}-{self.activation}"


def _matmuls(template: ExpertTemplate) -> list[tuple[fx.Node, WeightRef, bool]] | None:
    """The template's weight products with their ``transpose_w``, as ``emit_grouped`` lowers them; None if
    any weight is used another way (biases, per-row bmm)."""
    found = []
    for node in template.nodes:
        weight_args = [a for a in node.args[:3] if isinstance(a, fx.Node) and a in template.weights]
        if not weight_args:
            continue
        ref = template.weights[node.args[1]] if len(node.args) > 1 and node.args[1] in template.weights else None
        if ref is None or weight_dims(ref) != 2 or len(weight_args) != 1:
            return None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if is_call(node, *LINEAR) and bias is None:
            found.append((node, ref, not ref.transposed))
        elif is_grouped_call(node) or is_call(node, *MATMUL) and len(node.args) == 2 and \
                not is_call(node, torch.bmm, "bmm"):
            found.append((node, ref, ref.transposed))
        else:
            return None
    return found


def _candidates(mms) -> list[tuple[WeightRef, WeightRef | None, WeightRef, tuple[int, int, int, int]]]:
    *first, (_, w2, t2) = mms
    if len(first) == 2:
        (_, a, ta), (_, b, tb) = first
        return [(a, b, w2, (ta, tb, t2, 1)), (b, a, w2, (tb, ta, t2, 1))]
    (_, w1, t1), = first
    return [(w1, None, w2, (t1, 0, t2, glu)) for glu in (0, 2, 3)]


def _identity_dropout(node: fx.Node) -> bool:
    """``F.dropout`` that changes nothing: probability 0 (Switch's expert in tests), or not training."""
    if target_name(node) != "dropout":
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return p == 0 or training is False


def match_fused_ffn(template: ExpertTemplate) -> FusedFFN | None:
    """The fused form of ``template``, or None when the fused op does not compute exactly what it does."""
    if any(target_name(n) not in _ALLOWED and not _identity_dropout(n) for n in template.nodes
           if not (is_call(n, *LINEAR) or is_call(n, *MATMUL) or is_grouped_call(n))):
        return None
    if any(ref.cast is not None for ref in template.weights.values()):  # the fused op reads weights as stored
        return None
    if template.constants:  # shared parameters after the FFN (a post-expert norm): not the fused op's FFN
        return None
    rows_fake = fake(template.rows)
    if rows_fake is None or rows_fake.dtype != torch.float32 or rows_fake.device.type != "cpu":
        return None
    mms = _matmuls(template)
    if mms is None or len(mms) not in (2, 3):
        return None
    try:
        reference, weights = _reference(template)
    except Exception:  # a template the probe cannot run stays on the lifted path
        return None
    from moecc.backends.expert_ffn_cpu import ACTIVATIONS

    for (w1, w3, w2, flags), activation in itertools.product(_candidates(mms), ACTIVATIONS):
        candidate = FusedFFN(activation=activation, w1=w1, w3=w3, w2=w2, flags=flags)
        if _agrees(candidate, reference, weights):
            return candidate
    return None


def _probe_weight(ref: WeightRef, gen: torch.Generator) -> list[torch.Tensor]:
    """Random weights in the reference's form; stacked ones as a broadcast view, so a big E costs nothing."""
    shape = fake(ref.nodes[0]).shape
    if ref.stacked:
        one = torch.randn((1, *shape[1:]), generator=gen) / shape[-1] ** 0.5
        return [one.expand(shape)]
    one = torch.randn(tuple(shape), generator=gen) / shape[-1] ** 0.5
    return [one] * len(ref.nodes)


def _reference(template: ExpertTemplate):
    """The lifted template as a function of (rows, group offsets), on random weights; and those weights."""
    gen = torch.Generator().manual_seed(0)
    graph = fx.Graph()
    rows = graph.placeholder("rows")
    offsets = graph.placeholder("offsets")
    expert_of_row = graph.placeholder("expert_of_row")
    env, weights, values = {}, {}, []
    for ref in {id(r): r for r in template.weights.values()}.values():
        weights[id(ref)] = _probe_weight(ref, gen)
        for node, value in zip(ref.nodes, weights[id(ref)]):
            env[node] = graph.placeholder(f"w{len(values)}")
            values.append(value)
    graph.output(emit_grouped(graph, template, env, rows, offsets, expert_of_row))
    module = fx.GraphModule(torch.nn.Module(), graph)
    ref = next(iter(template.weights.values()))
    groups = fake(ref.nodes[0]).shape[0] if ref.stacked else len(ref.nodes)
    width = fake(template.rows).shape[-1]
    x = torch.randn((13, width), generator=gen) * 3.0
    offs = torch.full((groups,), x.shape[0], dtype=torch.int32)
    with torch.no_grad():
        expected = module(x, offs, torch.zeros(x.shape[0], dtype=torch.long), *values)
    return (x, offs, expected), weights


def _agrees(candidate: FusedFFN, reference, weights) -> bool:
    from moecc.backends import ops

    x, offs, expected = reference
    w3 = weights[id(candidate.w3)] if candidate.w3 is not None else []
    try:
        with torch.no_grad():
            out, _ = ops.expert_ffn(x, torch.arange(x.shape[0]), torch.ones(x.shape[0]), offs,
                                    weights[id(candidate.w1)], w3, weights[id(candidate.w2)],
                                    list(candidate.flags), candidate.activation, False)
    except Exception:  # shapes that do not fit this assignment
        return False
    if out.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    return bool(((out - expected).abs().max() <= 1e-5 * scale).item())

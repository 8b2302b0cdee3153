"""``moecc.explain(model, *inputs)``: what moecc would find and rewrite in ``model``, without compiling it.

Dynamo captures the model's graphs as ``torch.compile(model, backend="moecc")`` would (the same capture flags and
HF eager-loop substitutions, ``moecc/capture.py``); each graph goes through the MoE pass (detect, rewrite, check),
and then runs as captured: no Inductor, no runtime layers, nothing filed in the model's session. The result is the
report ``moecc.report()`` would show after a real compile, near misses included, plus how many graphs Dynamo made
(more than one means a graph break, which splits an MoE block from its experts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moecc.report import Report

# No torch at import: ``moecc/__init__.py`` binds :func:`explain` eagerly (as it does ``report``), so that the
# package attribute is the function and not this module, and ``import moecc.costmodel`` stays torch-free.


@dataclass(slots=True)
class Explanation:
    """The MoE pass's results for every graph of one run of the model."""

    blocks: list = field(default_factory=list)  # passes.moe_pass.BlockResult, in graph order
    graphs: int = 0
    graph_breaks: list[str] = field(default_factory=list)  # Dynamo's reasons, when it says

    @property
    def report(self) -> Report:
        return Report(list(self.blocks))

    def __str__(self) -> str:
        lines = [f"moecc.explain: {self.graphs} graph{'s' if self.graphs != 1 else ''}, "
                 f"{len(self.graph_breaks)} graph break{'s' if len(self.graph_breaks) != 1 else ''}"]
        lines += [f"  graph break: {reason}" for reason in self.graph_breaks]
        if not self.blocks:
            lines.append("  no selection over expert scores found: no MoE block in these graphs")
        return "\n".join(lines) + "\n" + str(self.report)


def explain(model, *inputs, options: dict | None = None, quiet: bool = False, **kwargs) -> Explanation:
    """Run ``model(*inputs, **kwargs)`` once under Dynamo with the MoE pass and no Inductor; print and return what
    moecc found (``quiet=True``: return only). ``options`` are the ``moecc.*`` compile options."""
    import torch

    from moecc.backend import moecc_backend  # noqa: F401  (installs moecc's capture wrapper, moecc/capture.py)
    from moecc.backends.dispatch import choose_dispatch
    from moecc.options import Options
    from moecc.passes.moe_pass import PassConfig, moe_pass

    parsed = Options.parse(options)
    config = PassConfig(dispatch=choose_dispatch(expert_parallel=False), fused_ffn=parsed.fused_ffn,
                        capacity_factor=parsed.capacity_factor)
    found = Explanation()

    def backend(gm, example_inputs):
        found.graphs += 1
        _, results = moe_pass(gm, example_inputs, config, graph_name=f"graph {found.graphs - 1}")
        found.blocks.extend(results)
        return gm.forward  # the graph as captured: explain changes nothing the model computes

    backend._moecc_capture = True  # traced with moecc's capture flags (moecc/capture.py)
    # A fresh Dynamo cache: a graph cached for another backend would not reach this one.
    torch._dynamo.reset()
    before = _graph_breaks()
    try:
        torch.compile(model, backend=backend)(*inputs, **kwargs)
        found.graph_breaks = [reason for reason, n in _graph_breaks().items() if n > before.get(reason, 0)]
    finally:
        torch._dynamo.reset()
    if not quiet:
        print(found)
    return found


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph-break count per reason so far in this process, each reason by its first line
    (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    out: dict[str, int] = {}
    for reason, n in counters.get("graph_break", {}).items():
        key = reason.strip().splitlines()[0] if reason.strip() else reason
        out[key] = out.get(key, 0) + n
    return out

"""``moecc.report()``: what the backend did, rendered with rich, at two levels of detail.

* ``moecc.report()``: the one-screen summary, one row per MoE block (graph, path, form, spec, weights, outcome,
  node counts before and after the rewrite; under expert parallelism the experts per rank and the rows sent, and
  once the runtime's monitor has checked a window, the rows this rank sent to and received from each rank on the
  step that check read).
* ``moecc.report(detail="graph")`` or ``Report.block(path)``: each block's part of the graph before and after,
  stage by stage (router, dispatch, experts, combine, shared experts), every node with its op, target, shapes and
  dtypes (``passes/graph_view.py`` makes this data at compile time); a fallback's region with the node where
  matching stopped marked, and the reason.

The output is deterministic: no addresses and no timings unless asked (``timings=True`` adds the rewrite check
times, the measured times of switches, and the cost model's predicted layer time beside the measured one where the
runtime recorded them: ``moecc.attach(optimizer, time_layers=True)``), so two runs can be diffed. Row counts are
deterministic for a fixed input and show always. ``save_html`` writes every section, each folded in a ``<details>``.

The rows come from the sessions (``moecc/sessions.py``): one model's with ``moecc.report(model)``, every model's
of the process without an argument.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DETAILS = ("summary", "graph")

_STATUS_STYLE = {"kept": "dim", "removed": "red", "added": "green"}


@dataclass(slots=True)
class LayerTiming:
    """One block's time on one step (forward and backward): the cost model's prediction beside a measurement.

    Filled by the runtime when asked (``moecc.attach(optimizer, time_layers=True)``: the profiler's times of the
    layer's moecc ops, see ``runtime.measure_step``); the report shows the ones it is given and never measures
    anything itself.
    """

    block: str  # the block's module path
    predicted_s: float | None = None
    measured_s: float | None = None
    source: str = ""  # how it was measured: "profiler", "timer"
    step: int | None = None


@dataclass(slots=True)
class RowCounts:
    """Under expert parallelism, the routed rows one layer on this rank exchanged with each rank on one step.

    Filled by the runtime at each monitor check (``runtime.measure_step``) for the step the check reads; includes
    the rows a rank keeps for itself (``sent_R[rank]``), as ``BlockResult.send_rows`` does.
    """

    block: str  # the block's module path
    rank: int  # this rank in the layer's expert-parallel group
    step: int  # the optimizer step whose forward routed these rows
    sent_R: list[int]  # rows this rank sent to each rank
    received_R: list[int]  # rows this rank received from each rank
    experts_R: list[list[int]] = field(default_factory=list)  # the expert in each slot of every rank (-1: empty)


@dataclass(frozen=True, slots=True)
class Printable:
    """A part of the report: rich renders it, ``str`` gives it as plain text."""

    renderable: object

    def __rich__(self):
        return self.renderable

    def __str__(self) -> str:
        return render_text(self.renderable)


@dataclass(slots=True)
class Report:
    """Every MoE block the backend saw, in the order it compiled them."""

    blocks: list = field(default_factory=list)  # passes.moe_pass.BlockResult
    switches: list = field(default_factory=list)  # moecc.runtime.SwitchRecord, oldest first
    timings: list = field(default_factory=list)  # LayerTiming, when the runtime recorded them
    memory: list = field(default_factory=list)  # per sharded layer on this rank: Session.memory() rows
    exchanges: list = field(default_factory=list)  # RowCounts, the latest per expert-parallel layer
    detail: str = "summary"  # or "graph": each block's graph view after the summary
    show_timings: bool = False  # check times and measured switch times (they change from run to run)

    def __post_init__(self) -> None:
        if self.detail not in DETAILS:
            raise ValueError(f"moecc: report detail must be one of {', '.join(DETAILS)}, got {self.detail!r}")

    @property
    def rewritten(self) -> list:
        return [b for b in self.blocks if b.rewritten]

    @property
    def fallbacks(self) -> list:
        return [b for b in self.blocks if not b.rewritten]

    # --- the summary ---------------------------------------------------------------------------------------

    def table(self, hint: bool = False) -> Table:
        """The block table; ``hint``: with a caption saying where the graph views are."""
        caption = "each block's nodes before and after: moecc.report(detail=\"graph\"), moecc report --graph"
        table = Table(title="moecc: MoE blocks", caption=caption if hint and self.blocks else None)
        parallel = any(b.layout for b in self.blocks)
        columns = ["graph", "block", "form", "spec", "weights", "outcome", "nodes"]
        columns += ["experts per rank (slots)", "rows sent per rank"] if parallel else []
        columns += ["check"] if self.show_timings else []
        for col in columns:
            table.add_column(col, overflow="fold")
        for b in self.blocks:
            s = b.spec
            weights = "; ".join(s.experts.layouts) if s.experts else ""
            style = "green" if b.rewritten else "yellow"
            spec = "; ".join([s.summary(), *s.notes])
            outcome = f"{b.outcome} ({b.kernel})" if b.kernel else b.outcome
            row = [b.graph, s.path or "<root>", s.form, spec, weights, f"[{style}]{outcome}[/]", _node_counts(b)]
            if parallel:
                row += [b.layout, str(b.send_rows or "")]
            if self.show_timings:
                row.append(f"{b.check_s:.2f} s")
            table.add_row(*row)
        return table

    def switch_table(self) -> Table:
        table = Table(title="moecc: placement switches")
        columns = ["step", "block", "from (experts per rank)", "to", "moved experts", "predicted gain/step",
                   "predicted cost"]
        columns += ["switch took", "measured gain/step"] if self.show_timings else []
        for col in columns:
            table.add_column(col, overflow="fold")
        for r in self.switches:
            row = [str(r.step), r.layer or "<root>", str(r.placement_from), str(r.placement_to), str(r.moved_experts),
                   _ms(r.predicted_gain_s), _ms(r.predicted_cost_s)]
            if self.show_timings:
                row += [_ms(r.switch_s), _ms(r.measured_gain_s)]
            table.add_row(*row)
        return table

    def exchange_table(self) -> Table:
        """Rows each expert-parallel layer on this rank sent to and received from every rank (one step)."""
        table = Table(title=f"moecc: routed rows exchanged by rank {self.exchanges[0].rank} on the step the monitor "
                            "last checked (forward; the backward sends the same rows back)")
        for col in ("block", "step", "with rank", "its experts (slots)", "rows sent to it", "rows received from it"):
            table.add_column(col, overflow="fold")
        for x in self.exchanges:
            for q, (sent, received) in enumerate(zip(x.sent_R, x.received_R)):
                experts = str(x.experts_R[q]) if q < len(x.experts_R) else ""
                table.add_row(x.block or "<root>", str(x.step), str(q), experts, str(sent), str(received))
        return table

    def timing_table(self) -> Table:
        """Predicted against measured layer time, per block (only what the runtime recorded)."""
        table = Table(title="moecc: predicted vs measured layer time (forward and backward of one step; measured: "
                            "its moecc ops in the profiler, the slowest rank's under expert parallelism)")
        for col in ("block", "step", "predicted", "measured", "measured / predicted", "measured by"):
            table.add_column(col, overflow="fold")
        for t in self.timings:
            ratio = f"{t.measured_s / t.predicted_s:.2f}" if t.measured_s and t.predicted_s else ""
            table.add_row(t.block or "<root>", "" if t.step is None else str(t.step), _ms(t.predicted_s),
                          _ms(t.measured_s), ratio, t.source)
        return table

    def memory_table(self) -> Table:
        """What this rank stores for each sharded layer's experts (from tensor storages)."""
        table = Table(title=f"moecc: expert memory on rank {self.memory[0]['rank']}")
        for col in ("layer", "experts in this rank's slots", "weights", "gradients", "optimizer state", "total"):
            table.add_column(col, overflow="fold")
        for m in self.memory:
            total = m["weights"] + m["grads"] + m["optimizer"]
            table.add_row(m["layer"] or "<root>", str(m["slots"]), _bytes(m["weights"]), _bytes(m["grads"]),
                          _bytes(m["optimizer"]), _bytes(total))
        return table

    def summary(self, hint: bool = False) -> Group:
        """The one-screen part: the block table, and the exchange, memory, switch and timing tables when there is
        anything in them (``report()`` passes timings only with ``timings=True``)."""
        parts = [self.table(hint)]
        if self.exchanges:
            parts.append(self.exchange_table())
        if self.memory:
            parts.append(self.memory_table())
        if self.switches:
            parts.append(self.switch_table())
        if self.timings:
            parts.append(self.timing_table())
        return Group(*parts)

    # --- the graph views -----------------------------------------------------------------------------------

    def block(self, path: str) -> Printable:
        """The graph view of the block(s) at module path ``path`` ("" or "<root>" for the root module), to print
        (``print(...)`` gives plain text, rich's ``Console.print`` colours)."""
        path = "" if path == "<root>" else path
        found = [b for b in self.blocks if b.spec.path == path]
        if not found:
            known = ", ".join(b.spec.path or "<root>" for b in self.blocks) or "none"
            raise KeyError(f"moecc: no MoE block at {path or '<root>'!r}; the report's blocks: {known}")
        return Printable(Group(*(block_section(b, self._exchange(b)) for b in found)))

    def graph_views(self) -> Printable:
        return Printable(Group(*(block_section(b, self._exchange(b)) for b in self.blocks)))

    def sections(self) -> list[tuple[str, object]]:
        """(title, renderable) for every section, in order: the summary, then one per block."""
        return [("moecc report: summary", self.summary())] + [(_block_title(b), block_section(b, self._exchange(b)))
                                                              for b in self.blocks]

    def _exchange(self, b):
        """The latest RowCounts of block ``b`` (by module path), or None."""
        return next((x for x in reversed(self.exchanges) if x.block == b.spec.path), None)

    # --- output --------------------------------------------------------------------------------------------

    def __rich__(self):
        return Group(self.summary(), self.graph_views()) if self.detail == "graph" else self.summary(hint=True)

    def __str__(self) -> str:
        return render_text(self)

    def save_html(self, path: str, width: int = 160) -> None:
        """Every section of the report (summary and each block's graph view, whatever ``detail`` is) in one
        standalone HTML page, each section folded in a ``<details>`` (the summary open), for sharing."""
        with open(path, "w", encoding="utf-8") as out:
            out.write(self.html(width))

    def html(self, width: int = 160) -> str:
        parts = []
        for i, (title, renderable) in enumerate(self.sections()):
            rec = console(width, quiet=True)
            rec.print(renderable)
            code = rec.export_html(inline_styles=True, code_format="{code}")
            parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(title)}</summary>\n"
                         f"<pre class=\"moecc\">{code}</pre></details>")
        return _HTML_PAGE.format(body="\n".join(parts))

    def save_svg(self, path: str, width: int = 160) -> None:
        """The report as printed (its ``detail``) as an SVG image (rich's export), for sharing."""
        out = console(width, quiet=True)
        out.print(self)
        out.save_svg(path, title="moecc report")


_HTML_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="UTF-8">
<title>moecc report</title>
<style>
body {{ color: #000000; background-color: #ffffff; font-family: sans-serif; }}
summary {{ cursor: pointer; font-weight: bold; margin: 0.4em 0; }}
pre.moecc {{ font-family: Menlo, 'DejaVu Sans Mono', consolas, 'Courier New', monospace; font-size: 13px;
            line-height: 1.25; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.2f} ms"


def _node_counts(b) -> str:
    view = getattr(b, "view", None)
    if view is None or view.error:
        return ""
    return f"{view.nodes_before} -> {view.nodes_after}" if view.rewritten else f"{view.nodes_before} (kept)"


def _block_title(b) -> str:
    """``moes.0 (graph 0): rewritten (fused glu-silu), nodes 67 -> 29``; a fallback's reason follows its table."""
    outcome = f"{b.outcome} ({b.kernel})" if b.kernel else b.outcome.split(": ", 1)[0]
    counts = _node_counts(b)
    return f"{b.spec.path or '<root>'} ({b.graph}): {outcome}" + (f", nodes {counts}" if counts else "")


def block_section(b, exchange=None) -> Group:
    """One block's graph view: a title, a table of its stages (original | rewritten), the plan under expert
    parallelism (with ``exchange``, a RowCounts: the rows of the runtime's last recorded step), and for a fallback
    the reason."""
    view = getattr(b, "view", None)
    parts = [Text(_block_title(b), style="bold green" if b.rewritten else "bold yellow")]
    if view is None:
        parts.append(Text("  no graph view recorded for this block", style="dim"))
    elif view.error:
        parts.append(Text(f"  the graph view could not be built: {view.error}", style="red"))
    else:
        parts.append(stage_table(view))
    if b.layout:
        parts.append(plan_table(b, exchange))
    if not b.rewritten:
        stopped = view.stopped if view is not None else ()
        where = ", ".join(stopped) if stopped else "the reason names no node: the whole region stays"
        parts.append(Text(f"  why: {b.outcome.split(': ', 1)[-1]}\n  where matching stopped: {where}",
                          style="yellow"))
    parts.append(Text(""))
    return Group(*parts)


def stage_table(view) -> Table:
    """Stage by stage, the block's original nodes beside the rewritten ones (kept dim, removed red, added
    green); a fallback shows the original region only, the nodes its reason names marked."""
    table = Table(show_lines=True)
    table.add_column("stage", no_wrap=True)
    table.add_column(f"original ({view.nodes_before} nodes)")
    if view.rewritten:
        table.add_column(f"rewritten ({view.nodes_after} nodes)")
    for stage in view.stages:
        if not stage.before and not stage.after:
            continue
        counts = f"{len(stage.before)} -> {len(stage.after)}" if view.rewritten else f"{len(stage.before)}"
        row = [Text(f"{stage.name}\n{counts}"), node_list(stage.before)]
        if view.rewritten:
            row.append(node_list(stage.after))
        table.add_row(*row)
    return table


def node_list(nodes) -> Table:
    """One line per node: name, what it calls (``.reshape`` a method, ``topk`` a function, ``buffer`` a
    ``get_attr``, ``name()`` a submodule), what it produces."""
    grid = Table.grid(padding=(0, 1))
    # Names and targets are what a reader looks up: when the cell is narrow, the value wraps first.
    names = [len(n.name) + (len(" <- stopped here") if n.stopped else 0) for n in nodes]
    grid.add_column("name", overflow="fold", min_width=min(max(names, default=0), 32))
    grid.add_column("target", overflow="fold", min_width=min(max((len(_call(n)) for n in nodes), default=0), 24))
    grid.add_column("value", overflow="fold")
    for n in nodes:
        style = "bold red reverse" if n.stopped else _STATUS_STYLE.get(n.status, "")
        name = f"{n.name} <- stopped here" if n.stopped else n.name
        grid.add_row(Text(name, style=style), Text(_call(n), style=style),
                     Text(n.value, style="dim" if n.status == "kept" else ""))
    return grid


def _call(node) -> str:
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_module":
        return f"{node.target}()"
    return node.target


def plan_table(b, exchange=None) -> Table:
    """Expert parallelism: the experts each rank's slots hold and the rows this rank sent to it on the compile step,
    or with ``exchange`` (a RowCounts) the rows sent to and received from it on the runtime's last recorded step."""
    when = f"step {exchange.step}" if exchange is not None else "the compile step"
    table = Table(title=f"plan: {b.spec.path or '<root>'} (rows of {when})", title_justify="left")
    cols = ["rank", "experts (slots)", "rows sent to it"] + (["rows received from it"] if exchange else [])
    for col in cols:
        table.add_column(col)
    per_rank = [part.split(": ", 1)[-1] for part in b.layout.split("; ")]
    sent = exchange.sent_R if exchange is not None else (b.send_rows or [])
    for r, experts in enumerate(per_rank):
        row = [str(r), experts, str(sent[r]) if r < len(sent) else ""]
        if exchange is not None:
            row.append(str(exchange.received_R[r]) if r < len(exchange.received_R) else "")
        table.add_row(*row)
    return table


def render_text(renderable, width: int = 160) -> str:
    """``renderable`` as plain text (no colour codes) at ``width`` columns."""
    out = Console(width=width, file=io.StringIO(), color_system=None, force_terminal=False)
    with out.capture() as cap:
        out.print(renderable)
    return cap.get()


def _bytes(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def console(width: int = 160, quiet: bool = False) -> Console:
    """A recording console: what is printed to it can be saved as HTML or SVG (``quiet``: and goes nowhere else)."""
    return Console(width=width, record=True, file=io.StringIO() if quiet else None)


def report(model=None, detail: str = "summary", timings: bool = False) -> Report:
    """What moecc did for ``model`` (the module given to ``torch.compile``, or what it returned), or without a
    model, for every model of this process so far. ``detail="graph"`` adds each block's graph view;
    ``timings=True`` the times that change from run to run (check times, switch times, the runtime's predicted
    against measured layer times)."""
    from moecc import sessions

    if model is not None:
        found = sessions.session(model).report()
    else:
        found = Report(sessions.all_blocks(), [r for s in sessions.sessions() for r in s.switch_log],
                       [t for s in sessions.sessions() for t in s.timings],
                       [m for s in sessions.sessions() for m in s.memory() if m["sharded"]],
                       [x for s in sessions.sessions() for x in s.exchanges])
    return Report(found.blocks, found.switches, found.timings if timings else [], found.memory, found.exchanges,
                  detail=detail, show_timings=timings)

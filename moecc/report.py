"""``moecc.report()``: what the backend did, one row per MoE block, rendered with rich.

The rows come from the sessions (``moecc/session.py``): one model's with ``moecc.report(model)``, every model's
of the process without an argument.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass(slots=True)
class Report:
    """Every MoE block the backend saw, in the order it compiled them."""

    blocks: list = field(default_factory=list)  # passes.moe_pass.BlockResult
    switches: list = field(default_factory=list)  # moecc.runtime.SwitchRecord, oldest first

    @property
    def rewritten(self) -> list:
        return [b for b in self.blocks if b.rewritten]

    @property
    def fallbacks(self) -> list:
        return [b for b in self.blocks if not b.rewritten]

    def table(self) -> Table:
        table = Table(title="moecc: MoE blocks")
        parallel = any(b.layout for b in self.blocks)
        columns = ["graph", "block", "form", "spec", "weights", "outcome"]
        columns += ["experts per rank (slots)", "rows sent per rank"] if parallel else []
        for col in columns:
            table.add_column(col, overflow="fold")
        for b in self.blocks:
            s = b.spec
            weights = "; ".join(s.experts.layouts) if s.experts else ""
            style = "green" if b.rewritten else "yellow"
            spec = "; ".join([s.summary(), *s.notes])
            outcome = f"{b.outcome} ({b.kernel})" if b.kernel else b.outcome
            row = [b.graph, s.path or "<root>", s.form, spec, weights, f"[{style}]{outcome}[/]"]
            if parallel:
                row += [b.layout, str(b.send_rows or "")]
            table.add_row(*row)
        return table

    def switch_table(self) -> Table:
        table = Table(title="moecc: placement switches")
        for col in ("step", "block", "from (experts per rank)", "to", "moved experts", "predicted gain/step",
                    "predicted cost", "switch took", "measured gain/step"):
            table.add_column(col, overflow="fold")
        for r in self.switches:
            measured = "" if r.measured_gain_s is None else f"{1e3 * r.measured_gain_s:.2f} ms"
            table.add_row(str(r.step), r.layer or "<root>", str(r.placement_from), str(r.placement_to),
                          str(r.moved_experts), f"{1e3 * r.predicted_gain_s:.2f} ms",
                          f"{1e3 * r.predicted_cost_s:.2f} ms", f"{1e3 * r.switch_s:.2f} ms", measured)
        return table

    def __rich__(self):
        from rich.console import Group

        return Group(self.table(), self.switch_table()) if self.switches else self.table()

    def __str__(self) -> str:
        console = Console(width=160, record=True)
        with console.capture() as cap:
            console.print(self)
        return cap.get()

    def save_html(self, path: str, width: int = 160) -> None:
        """The report as a standalone HTML page (rich's export), for sharing."""
        out = console(width, quiet=True)
        out.print(self)
        out.save_html(path)

    def save_svg(self, path: str, width: int = 160) -> None:
        """The report as an SVG image (rich's export), for sharing."""
        out = console(width, quiet=True)
        out.print(self)
        out.save_svg(path, title="moecc report")


def console(width: int = 160, quiet: bool = False) -> Console:
    """A recording console: what is printed to it can be saved as HTML or SVG (``quiet``: and goes nowhere else)."""
    return Console(width=width, record=True, file=io.StringIO() if quiet else None)


def report(model=None) -> Report:
    """What moecc did for ``model`` (the module given to ``torch.compile``, or what it returned), or without a
    model, for every model of this process so far."""
    from moecc import sessions

    if model is not None:
        return sessions.session(model).report()
    return Report(sessions.all_blocks(), [r for s in sessions.sessions() for r in s.switch_log])

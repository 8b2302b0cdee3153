"""The switching rule: whether a layer should leave its placement for one of its candidates, and for which.

One function for every caller, so the runtime (``moecc.runtime.decide``) and the simulations
(``benchmarks/switching_sim.py``) cannot decide apart. Pure Python like the rest of the cost model: the runtime
turns its own switch record into a :class:`LastSwitch`.

The rule: price the current placement and every candidate on the window's per-step loads; the cheapest candidate
wins (the first on ties, so a candidate list that starts with the current placement keeps it); switch when the
predicted saving over the next ``interval_steps`` steps exceeds the predicted switch cost. When the layer switched
before, what that switch really cost and gained corrects both predictions: the cost per moved slot is at least what
the last switch took per moved expert, and the gain is scaled by the share of its predicted gain the last switch
delivered (clamped to [0, 1]: a switch that gained nothing stops further ones, one that gained more is not trusted
to again).
"""
from __future__ import annotations

from dataclasses import dataclass

from .formulas import CostModel
from .placement import EMPTY, Placement


@dataclass(frozen=True, kw_only=True, slots=True)
class LastSwitch:
    """What the layer's previous switch predicted and what was measured, for the correction."""

    predicted_gain_s: float  # per step, on the window that triggered it
    switch_s: float  # measured seconds of the switch itself
    moved_experts: int  # experts that gained a host
    measured_gain_s: float | None  # mean step time before minus after; None until measured


@dataclass(frozen=True, kw_only=True, slots=True)
class SwitchDecision:
    """Switch to ``placement``: it saves ``gain_s`` per step (predicted, corrected) and costs ``cost_s`` once."""

    placement: Placement
    gain_s: float
    cost_s: float


def decide_switch(model: CostModel, current: Placement, candidates: list[Placement], load_per_step_E: list[float],
                  interval_steps: int, last: LastSwitch | None = None) -> SwitchDecision | None:
    """The placement to switch to before the next ``interval_steps`` steps, or None to stay.

    ``load_per_step_E``: mean routed rows per expert per step over the window just seen (all ranks), the estimate of
    the next one. ``candidates`` need not hold ``current``; a candidate slower than it never wins (its gain is
    negative). No loads (a window that routed nothing) say nothing about the next one: stay.
    """
    if sum(load_per_step_E) == 0:
        return None
    current_s = model.step_s(current, load_per_step_E)
    best = min(candidates, key=lambda p: model.step_s(p, load_per_step_E))
    gain = current_s - model.step_s(best, load_per_step_E)
    cost = model.switch_s(current, best)
    moves = sum(1 for a, b in zip(current.expert_S, best.expert_S) if b != EMPTY and a != b)
    if last is not None:  # what switches really cost and gained here beats the profile's guess
        cost = max(cost, last.switch_s / max(1, last.moved_experts) * moves)
        if last.measured_gain_s is not None and last.predicted_gain_s > 0:
            gain *= min(1.0, max(0.0, last.measured_gain_s / last.predicted_gain_s))
    if best.expert_S == current.expert_S or gain * interval_steps <= cost:
        return None
    return SwitchDecision(placement=best, gain_s=gain, cost_s=cost)

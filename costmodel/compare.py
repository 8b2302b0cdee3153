"""A planned pool against the two baselines, in full-model seconds: what ``moecc plan`` and the benchmark print.

Every number here comes from the compiled formulas (``formulas.CostModel``), not the planner's linear model:
the per-slot GEMM table, the all-to-all by level and the real bytes of each switch. Expected step times assume
the best member per window (what the planner optimises); the ``online`` ones let the runtime choose from the
previous window's loads, as it must.
"""
from __future__ import annotations

from dataclasses import dataclass

from .formulas import CostModel
from .greedy import static_placement
from .placement import Pool, SlotLayout
from .planner import PoolPlan, greedy_pool, plan_pool, plan_terms, simulate_online, simulate_pool
from .workload import window_loads


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    plan: PoolPlan
    greedy: Pool
    static_step_s: float
    greedy_step_s: float
    pool_expected_step_s: float
    pool_online_step_s: float  # the runtime re-choosing every few steps from the loads just seen (causal)
    greedy_online_step_s: float
    predicted_step_s: tuple[float | None, ...]  # per plan: mean over the windows it serves (None if none)
    step_s_WK: tuple[tuple[float, ...], ...]  # per window, per plan
    static_step_s_W: tuple[float, ...]
    greedy_step_s_W: tuple[float, ...]
    assignment: tuple[int, ...]
    switches: int
    switch_s_total: float
    steps_W: tuple[int, ...]

    def to_json(self) -> dict:
        """The ``moecc plan --json`` document (the keys the issue names first, then the detail)."""
        return {
            "plans": [p.experts_per_rank() for p in self.plan.pool.placements],
            "predicted_step_s": list(self.predicted_step_s),
            "static_step_s": self.static_step_s,
            "greedy_step_s": self.greedy_step_s,
            "pool_expected_step_s": self.pool_expected_step_s,
            "solve_s": self.plan.solve_s,
            "optimality_gap": self.plan.gap,
            "pool_online_step_s": self.pool_online_step_s,
            "greedy_online_step_s": self.greedy_online_step_s,
            "status": self.plan.status,
            "shares": [[[round(p.share_S[s], 6) for s in p.layout.slots_of(r)] for r in range(p.layout.ranks)]
                       for p in self.plan.pool.placements],
            "plan_per_window": list(self.assignment),
            "steps_per_window": list(self.steps_W),
            "per_window_step_s": [list(r) for r in self.step_s_WK],
            "static_per_window_step_s": list(self.static_step_s_W),
            "greedy_per_window_step_s": list(self.greedy_step_s_W),
            "switches": self.switches,
            "switch_s_total": self.switch_s_total,
        }


def compare(rows, layout: SlotLayout, K: int, model: CostModel, *, window: int, time_limit_s: float = 2.0,
            use_ilp: bool = True, check_every: int = 10) -> Comparison:
    """Plan a pool for a layer's trace rows and evaluate it, static EP and the greedy pool on the same windows.

    The online numbers let the runtime re-choose every ``check_every`` steps from the previous ``check_every``
    steps' mean loads (``simulate_online`` over those shorter windows).
    """
    load_WE = window_loads(rows, window)
    steps_W = [len(rows[i:i + window]) for i in range(0, len(rows), window)]
    E = len(load_WE[0])
    plan = plan_pool(layout, load_WE, steps_W, K, model, time_limit_s=time_limit_s, use_ilp=use_ilp)
    greedy = greedy_pool(layout, load_WE, steps_W, K, plan_terms(model, layout, load_WE))[0]
    static = Pool(layout=layout, placements=(static_placement(layout, E),))
    ev = simulate_pool(plan.pool, load_WE, steps_W, model)
    ev_static = simulate_pool(static, load_WE, steps_W, model)
    ev_greedy = simulate_pool(greedy, load_WE, steps_W, model)
    fine_WE = window_loads(rows, check_every)
    fine_W = [len(rows[i:i + check_every]) for i in range(0, len(rows), check_every)]
    per_plan = []
    for k in range(len(plan.pool)):
        served = [(ev.step_s_WK[w][k], steps_W[w]) for w in range(len(steps_W)) if ev.assignment[w] == k]
        per_plan.append(sum(t * s for t, s in served) / sum(s for _, s in served) if served else None)
    return Comparison(
        plan=plan, greedy=greedy, static_step_s=ev_static.expected_step_s, greedy_step_s=ev_greedy.expected_step_s,
        pool_expected_step_s=ev.expected_step_s,
        pool_online_step_s=simulate_online(plan.pool, fine_WE, fine_W, model, first=ev.assignment[0]).expected_step_s,
        greedy_online_step_s=simulate_online(greedy, fine_WE, fine_W, model,
                                             first=ev_greedy.assignment[0]).expected_step_s,
        predicted_step_s=tuple(per_plan), step_s_WK=ev.step_s_WK,
        static_step_s_W=tuple(r[0] for r in ev_static.step_s_WK),
        greedy_step_s_W=tuple(r[ev_greedy.assignment[w]] for w, r in enumerate(ev_greedy.step_s_WK)),
        assignment=ev.assignment, switches=ev.switches, switch_s_total=ev.switch_s_total, steps_W=tuple(steps_W))

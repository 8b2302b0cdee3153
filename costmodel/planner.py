"""The placement-pool planner: a PuLP ILP (bundled CBC) with the LPT greedy as warm start, fallback and baseline.

Planning model (linear, exact for the ILP and for the brute-force check in the tests). A scenario w is one
window of the trace: its mean load ``L[w][e]`` and the steps it stands for. Under placement k, rank r carries
``N[k][r][w] = sum_e L[w][e] g[k][r][e]`` tokens, ``g`` being the share of expert e's tokens on rank r, and holds
``occ[k][r]`` experts. The compiled formulas, linearised at the workload's operating point (``PlanTerms``), give
the step time above its constant part as::

    max_r (kappa_c N + beta occ)  +  kappa_n max_r N

the slowest rank's compute (seconds per token, plus a fixed ``beta`` per held slot: its weights are read and its
GEMMs launched whatever its rows) and the all-to-all, which ends when the busiest receiver does. ``beta`` is
what keeps the planner from filling every spare slot with replicas that each cost a small, inefficient GEMM. The
runtime runs the best pool member per window; changing member costs ``switch_s``. So the pool's value is::

    min  sum_w p_w (C_w + kappa_n T_w)  +  switch_s / steps * (number of switches)

ILP over plans k, ranks r, experts e, scenarios w:

- ``y[k,r,e]`` binary: rank r of plan k holds e (one slot); ``sum_e y <= slots_per_rank``. Slots are aggregated per
  rank: which slot of the rank holds e does not change the step time, so it is chosen afterwards (``align_pool``).
- ``g[k,r,e]`` in [0, y]: the share; ``sum_r g[k,r,e] = 1`` (replicas of hot experts are the ``y`` beyond one).
- ``C_w >= kappa_c N[k,r,w] + beta sum_e y[k,r,e] - M_w (1 - a[w,k])`` and ``T_w >= N[k,r,w] - M'_w (1 - a[w,k])``,
  ``a[w,k]`` binary with ``sum_k a = 1``: the two makespans linearised, the member chosen per window; the M are
  the largest values a rank can reach (the window's total load, a full rank of slots).
- ``s[t,k] >= a[t,k] - a[t+1,k]``: counts switches between consecutive windows.
- Symmetry: ranks within a plan are ordered by their load on the mean scenario, and plan k is first used after
  plan k-1 (``a[w,k] <= sum_{w'<w} a[w',k-1]``): interchangeable ranks and plans otherwise multiply the search.
- ``T_w >= total_w / R`` and ``C_w >= (kappa_c total_w + beta E) / R``: valid for any member (the busiest rank
  carries at least the mean), and the root bound the big-M rows alone cannot give.

Loads are normalised by the balanced rank load so that CBC's tolerances see numbers near 1. CBC runs with a time
limit; whatever it holds then (at worst the warm start) is returned with its gap. ``plan_pool`` is the entry
point: warm start (``greedy_pool``, ``heuristic_pool``, ``polish_shares``), then this ILP whole for small
instances or per group of windows for large ones.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
import time
from dataclasses import dataclass

import pulp

from .formulas import CostModel
from .greedy import InfeasibleError, check_feasible, greedy_placement, robust_greedy_placement, static_placement
from .placement import EMPTY, Placement, Pool, SlotLayout, placement_from_ranks


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolPlan:
    """What the planner chose and how sure it is.

    ``objective_s`` is the planning model's expected seconds per step above the constant part; ``bound_s`` CBC's
    lower bound on it; ``gap`` their relative difference (0 when proven optimal). ``status`` is ``optimal``,
    ``per_group_optimal`` (each member optimal for its windows), ``time_limit`` (incumbent returned),
    ``heuristic`` (too large for CBC in the time limit: the multi-scenario greedy members) or ``greedy`` (the
    ILP had nothing better or failed: the greedy pool).
    """

    pool: Pool
    assignment: tuple[int, ...]
    objective_s: float
    bound_s: float
    gap: float
    solve_s: float
    status: str


# -- the planning model -------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class PlanTerms:
    """The planning model's coefficients (seconds): per token of compute on a rank, per held slot, per token of
    the busiest rank's all-to-all traffic, and what the ILP charges per switch."""

    compute_per_token_s: float
    per_slot_s: float
    comm_per_token_s: float
    switch_s: float


def plan_terms(model: CostModel, layout: SlotLayout, load_WE: list[list[float]]) -> PlanTerms:
    """Linearise the compiled formulas around a slot holding one expert's mean load.

    ``t_ffn(n) ~ per_slot_s + compute_per_token_s * n`` by the secant between half and twice that load; the
    all-to-all's slope likewise. The switch charge assumes a whole rank's slots are refilled: the worst case, so
    a pool only switches when it pays for itself even then; reports use the real moves of the chosen pool.
    """
    n_bar = max(1.0, sum(sum(row) for row in load_WE) / len(load_WE) / len(load_WE[0]))
    lo, hi = 0.5 * n_bar, 2.0 * n_bar
    # non-negative since ``ffn_s`` is non-decreasing (``GemmTable.flops_per_s``); a negative slope made CBC's
    # warm start infeasible (``C_w`` below its bound 0) and the planner prefer piling tokens on a slot
    slope = max(0.0, (model.ffn_s(hi) - model.ffn_s(lo)) / (hi - lo))
    comm = model.passes * (model.a2a_s(hi) - model.a2a_s(lo)) / (hi - lo) if model.ranks > 1 else 0.0
    return PlanTerms(compute_per_token_s=slope, per_slot_s=max(0.0, model.ffn_s(n_bar) - slope * n_bar),
                     comm_per_token_s=comm, switch_s=model.switch_s_of(layout.slots_per_rank))


def plan_step_s(placement: Placement, load_E: list[float], terms: PlanTerms) -> float:
    """The planning model's step seconds (above the constant part) of one placement on one load vector."""
    N_R = placement.tokens_per_rank(load_E)
    occ_R = placement.held_per_rank()
    compute = max(terms.compute_per_token_s * n + terms.per_slot_s * o for n, o in zip(N_R, occ_R))
    return compute + terms.comm_per_token_s * max(N_R)


def best_assignment(cost_WK: list[list[float]], steps_W: list[int], switch_s: list[list[float]] | float
                    ) -> tuple[float, list[int]]:
    """The member to run per window minimising total time (step costs x steps + switches): Viterbi over windows.

    ``cost_WK`` are seconds per step; ``switch_s`` one number for every change or a K x K matrix. Returns the mean
    seconds per step and the member per window.
    """
    W, K = len(cost_WK), len(cost_WK[0])
    sw = switch_s if isinstance(switch_s, list) else [[0.0 if i == j else switch_s for j in range(K)] for i in range(K)]
    best = [cost_WK[0][k] * steps_W[0] for k in range(K)]
    back: list[list[int]] = []
    for w in range(1, W):
        prev = [min(range(K), key=lambda i: best[i] + sw[i][k]) for k in range(K)]
        best = [best[prev[k]] + sw[prev[k]][k] + cost_WK[w][k] * steps_W[w] for k in range(K)]
        back.append(prev)
    k = min(range(K), key=lambda i: best[i])
    total = best[k]
    path = [k]
    for prev in reversed(back):
        k = prev[k]
        path.append(k)
    return total / sum(steps_W), path[::-1]


def planning_objective(pool: Pool, load_WE: list[list[float]], steps_W: list[int], terms: PlanTerms) -> float:
    """The ILP's objective evaluated for any pool (greedy, brute force, ...): seconds per step above the constant."""
    return best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)[0]


def _cost_WK(pool: Pool, load_WE: list[list[float]], terms: PlanTerms) -> list[list[float]]:
    return [[plan_step_s(p, load_E, terms) for p in pool.placements] for load_E in load_WE]


# -- pools from the greedy: warm start, fallback, baseline ------------------------------------------------------

def _kmeans_groups(load_WE: list[list[float]], K: int, iters: int = 20, seed: int | None = None) -> list[int]:
    """Group windows with similar load shapes (normalised loads; farthest-point start, or random with ``seed``)."""
    shapes = [[x / (sum(row) or 1.0) for x in row] for row in load_WE]
    dist = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b))  # noqa: E731
    if seed is None:
        centres = [shapes[0]]
        while len(centres) < min(K, len(shapes)):
            centres.append(max(shapes, key=lambda s: min(dist(s, c) for c in centres)))
    else:
        centres = random.Random(seed).sample(shapes, min(K, len(shapes)))
    group = [0] * len(shapes)
    for _ in range(iters):
        group = [min(range(len(centres)), key=lambda k: dist(s, centres[k])) for s in shapes]
        for k in range(len(centres)):
            members = [s for s, g in zip(shapes, group) if g == k]
            if members:
                centres[k] = [sum(col) / len(members) for col in zip(*members)]
    return group


def _mean_load(load_WE: list[list[float]], steps_W: list[int], members: list[int]) -> list[float]:
    total = sum(steps_W[w] for w in members)
    return [sum(load_WE[w][e] * steps_W[w] for w in members) / total for e in range(len(load_WE[0]))]


def greedy_pool(layout: SlotLayout, load_WE: list[list[float]], steps_W: list[int], K: int,
                terms: PlanTerms) -> tuple[Pool, list[int]]:
    """K LPT placements, one per group of similar windows, regrouped by which member serves each window best."""
    group = _kmeans_groups(load_WE, K)
    pool = None
    for _ in range(3):
        used = sorted(set(group))
        placements = tuple(greedy_placement(layout, _mean_load(load_WE, steps_W,
                                                               [w for w, g in enumerate(group) if g == k]))
                           for k in used)
        pool = Pool(layout=layout, placements=placements)
        _, regroup = best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)
        if regroup == [used.index(g) for g in group]:
            break
        group = regroup
    return pool, best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)[1]


def _members_for(layout: SlotLayout, load_WE, steps_W, group: list[int], terms: PlanTerms) -> tuple[Placement, ...]:
    """Per group, the best of LPT on the group's mean load and the multi-scenario LPT on its windows, each with
    replicas only for experts larger than a rank's fair share and with every spare slot filled."""
    members = []
    for k in sorted(set(group)):
        windows = [w for w, g in enumerate(group) if g == k]
        sub, steps = [load_WE[w] for w in windows], [steps_W[w] for w in windows]
        mean = _mean_load(load_WE, steps_W, windows)
        candidates = [greedy_placement(layout, mean), greedy_placement(layout, mean, fill=True),
                      robust_greedy_placement(layout, sub), robust_greedy_placement(layout, sub, fill=True)]
        members.append(min(candidates, key=lambda p: sum(plan_step_s(p, x, terms) * s for x, s in zip(sub, steps))))
    return tuple(members)


def polish_shares(placement: Placement, load_WE: list[list[float]], steps_W: list[int], terms: PlanTerms) -> Placement:
    """The best shares for a placement's choice of experts per rank: an LP over the held (rank, expert) pairs.

    Exact for that choice (the ILP with its binaries fixed), and small: one variable per occupied slot. The
    LPT heuristics split an expert evenly over its replicas; this is where that split becomes the right one.
    """
    layout, E = placement.layout, placement.num_experts
    if all(c == 1 for c in placement.replicas()):
        return placement  # one replica each: every share is 1 already
    held = sorted({(layout.rank_of(s), e) for s, e in enumerate(placement.expert_S) if e != EMPTY})
    W = len(load_WE)
    scale, a_c, a_n, b = _units(load_WE, layout.ranks, terms)
    p = [s / sum(steps_W) for s in steps_W]
    lin = pulp.LpAffineExpression
    prob = pulp.LpProblem("moecc_shares", pulp.LpMinimize)
    g = {(r, e): pulp.LpVariable(f"g_{r}_{e}", 0, 1) for r, e in held}
    C = [pulp.LpVariable(f"C_{w}", 0) for w in range(W)]
    T = [pulp.LpVariable(f"T_{w}", 0) for w in range(W)]
    prob += lin([(C[w], p[w]) for w in range(W)] + [(T[w], p[w] * a_n) for w in range(W)])
    for e in range(E):
        prob += lin([(g[r, x], 1) for r, x in held if x == e]) == 1
    for r in range(layout.ranks):
        mine = [x for q, x in held if q == r]
        for w in range(W):
            load = [(g[r, x], -load_WE[w][x] / scale) for x in mine if load_WE[w][x]]
            prob += lin(load + [(T[w], 1)]) >= 0
            prob += lin([(v, a_c * c) for v, c in load] + [(C[w], 1)]) >= b * len(mine)
    prob.solve(pulp.PULP_CBC_CMD(msg=False))  # serial CBC: see solve_pool_ilp on ``threads``
    if prob.sol_status != pulp.LpSolutionOptimal:
        return placement
    ranks = [[(x, g[r, x].value() or 0.0) for q, x in held if q == r] for r in range(layout.ranks)]
    return _normalised(layout, E, [[(x, f) for x, f in items if f > 1e-9] for items in ranks])


def polish_pool(pool: Pool, assignment: list[int], load_WE: list[list[float]], steps_W: list[int],
                terms: PlanTerms) -> Pool:
    """``polish_shares`` for each member over the windows it serves."""
    members = []
    for k, p in enumerate(pool.placements):
        windows = [w for w, a in enumerate(assignment) if a == k]
        members.append(polish_shares(p, [load_WE[w] for w in windows], [steps_W[w] for w in windows], terms)
                       if windows else p)
    return Pool(layout=pool.layout, placements=tuple(members))


def _units(load_WE: list[list[float]], ranks: int, terms: PlanTerms) -> tuple[float, float, float, float]:
    """Normalisation for CBC: tokens in units of the balanced rank load, seconds in units of its step time.

    Returns (token scale, compute and comm weights summing to 1, per-slot cost in those units)."""
    scale = sum(sum(row) for row in load_WE) / len(load_WE) / ranks or 1.0
    per_token = terms.compute_per_token_s + terms.comm_per_token_s or 1.0  # 0 only for a zero-cost model
    return (scale, terms.compute_per_token_s / per_token, terms.comm_per_token_s / per_token,
            terms.per_slot_s / (per_token * scale))


def heuristic_pool(layout: SlotLayout, load_WE: list[list[float]], steps_W: list[int], K: int, terms: PlanTerms,
                   *, baseline: tuple[Pool, list[int]], time_budget_s: float) -> tuple[Pool, list[int]]:
    """The planner's warm start: the best pool over several groupings of the windows, never worse than ``baseline``
    nor than static EP alone.

    Groupings tried: the baseline's, contiguous stretches of time (a drifting hot set), k-means from random starts.
    Each group gets the best of four LPT variants (``_members_for``), windows regroup by Viterbi once, and the
    winner's shares are polished by LP (``polish_shares``). Static EP is a candidate because the LPT variants can
    lose to it: their replicas are sized by tokens alone, and each held slot costs ``per_slot_s`` whatever its rows
    (found by the property tests: 2 experts on 3 ranks, the greedy pool 1.8x static EP's planning objective).
    """
    started = time.perf_counter()
    W = len(load_WE)
    groupings = [list(baseline[1]), [w * min(K, W) // W for w in range(W)]]
    groupings += [_kmeans_groups(load_WE, K, seed=seed) for seed in range(4)]
    best = (planning_objective(baseline[0], load_WE, steps_W, terms), baseline)
    static = (Pool(layout=layout, placements=(static_placement(layout, len(load_WE[0])),)), [0] * W)
    static_objective = planning_objective(static[0], load_WE, steps_W, terms)
    if static_objective < best[0]:
        best = (static_objective, static)
    for group in groupings:
        for _ in range(2):
            if time.perf_counter() - started > time_budget_s:
                break
            pool = Pool(layout=layout, placements=_members_for(layout, load_WE, steps_W, group, terms))
            objective, path = best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)
            if objective < best[0]:
                best = (objective, (pool, path))
            if path == [sorted(set(group)).index(g) for g in group]:
                break
            group = path
    pool, path = best[1]
    polished = polish_pool(pool, path, load_WE, steps_W, terms)
    objective, path = best_assignment(_cost_WK(polished, load_WE, terms), steps_W, terms.switch_s)
    return (polished, path) if objective < best[0] else best[1]


# -- the ILP ---------------------------------------------------------------------------------------------------

def _cbc_bound(log_text: str) -> float | None:
    """CBC's best lower bound from its log (PuLP does not expose it)."""
    for pattern in (r"Lower bound:\s*([-\d.eE+]+)", r"best possible\s*([-\d.eE+]+)"):
        found = re.findall(pattern, log_text)
        if found:
            return float(found[-1])
    return None


def solve_pool_ilp(layout: SlotLayout, load_WE: list[list[float]], steps_W: list[int], K: int, *, terms: PlanTerms,
                   warm: tuple[Pool, list[int]] | None = None, time_limit_s: float = 10.0, gap_rel: float = 1e-6,
                   threads: int | None = None) -> PoolPlan | None:
    """Solve the pool ILP (module docstring); None when CBC finds no solution in time (the caller falls back).

    ``threads=None`` runs CBC's serial search. Any ``threads`` value, 1 included, switches CBC 2.10 to its threaded
    search, where about one solve in several thousand of these small models waited 10 s for a worker thread that
    never started (its log: ``Thread 0 used 0 times, waiting to start 10.000143``) under a 0.12 s limit; found
    checking the planner's time limit with random instances (tests/test_costmodel_properties.py). None in 6587
    solves since.
    """
    started = time.perf_counter()
    W, E, R, S = len(load_WE), len(load_WE[0]), layout.ranks, layout.slots_per_rank
    check_feasible(layout, E)
    K = min(K, W)
    scale, a_c, a_n, b = _units(load_WE, R, terms)
    L = [[x / scale for x in row] for row in load_WE]
    p = [s / sum(steps_W) for s in steps_W]
    total = [sum(row) for row in L]
    mean = [sum(L[w][e] * p[w] for w in range(W)) for e in range(E)]
    unit_s = (terms.compute_per_token_s + terms.comm_per_token_s) * scale
    per_switch = terms.switch_s / (unit_s * sum(steps_W))

    prob = pulp.LpProblem("moecc_pool", pulp.LpMinimize)
    ks, rs, es, ws = range(K), range(R), range(E), range(W)
    y = {(k, r, e): pulp.LpVariable(f"y_{k}_{r}_{e}", cat="Binary") for k in ks for r in rs for e in es}
    g = {(k, r, e): pulp.LpVariable(f"g_{k}_{r}_{e}", 0, 1) for k in ks for r in rs for e in es}
    C = {w: pulp.LpVariable(f"C_{w}", 0) for w in ws}
    T = {w: pulp.LpVariable(f"T_{w}", 0) for w in ws}
    a = {(w, k): pulp.LpVariable(f"a_{w}_{k}", cat="Binary") for w in ws for k in ks} if K > 1 else {}
    sw = {(w, k): pulp.LpVariable(f"s_{w}_{k}", 0) for w in range(W - 1) for k in ks} if K > 1 else {}
    # Expressions are built from (variable, coefficient) lists: PuLP's operator overloading costs ~10x more,
    # which at E=64 x R=64 is most of the time budget.
    lin = pulp.LpAffineExpression
    prob += lin([(C[w], p[w]) for w in ws] + [(T[w], p[w] * a_n) for w in ws] + [(v, per_switch) for v in sw.values()])

    for k in ks:
        for r in rs:
            prob += lin([(y[k, r, e], 1) for e in es]) <= S
            for e in es:
                prob += lin([(g[k, r, e], 1), (y[k, r, e], -1)]) <= 0
        for e in es:
            prob += lin([(g[k, r, e], 1) for r in rs]) == 1
        for r in rs:
            if r + 1 < R:
                prob += lin([(g[k, r, e], mean[e]) for e in es if mean[e]]
                            + [(g[k, r + 1, e], -mean[e]) for e in es if mean[e]]) >= 0
            for w in ws:
                load = [(g[k, r, e], -L[w][e]) for e in es if L[w][e]]
                tokens = load + [(T[w], 1)]
                compute = [(v, a_c * c) for v, c in load] + [(y[k, r, e], -b) for e in es] + [(C[w], 1)]
                if K == 1:
                    prob += lin(tokens) >= 0
                    prob += lin(compute) >= 0
                else:  # only binding for the member that serves w
                    m_t, m_c = total[w], a_c * total[w] + b * S
                    prob += lin(tokens + [(a[w, k], -m_t)]) >= -m_t
                    prob += lin(compute + [(a[w, k], -m_c)]) >= -m_c
    for w in ws:
        # valid for every member (its busiest rank carries at least the mean), and the bound the big-M rows
        # cannot give the LP relaxation: without it the root bound is near 0
        prob += T[w] >= total[w] / R
        prob += C[w] >= (a_c * total[w] + b * E) / R
    if K > 1:
        for w in ws:
            prob += lin([(a[w, k], 1) for k in ks]) == 1
            for k in ks:
                if k:
                    prob += lin([(a[v, k - 1], 1) for v in range(w)] + [(a[w, k], -1)]) >= 0
        for w in range(W - 1):
            for k in ks:
                prob += lin([(sw[w, k], 1), (a[w, k], -1), (a[w + 1, k], 1)]) >= 0

    if warm is not None:
        _set_warm_start(warm, L, p, (a_c, b), y, g, C, T, a, sw, K)
    log_fd, log_path = tempfile.mkstemp(suffix=".cbc.log")
    os.close(log_fd)
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(0.05, time_limit_s), gapRel=gap_rel, threads=threads,
                               warmStart=warm is not None, logPath=log_path)
    try:
        prob.solve(solver)
        log_text = open(log_path).read()
    except pulp.PulpSolverError:
        return None
    finally:
        os.unlink(log_path)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None

    placements = []
    for k in ks:
        ranks = [[(e, g[k, r, e].value()) for e in es
                  if (y[k, r, e].value() or 0) > 0.5 and (g[k, r, e].value() or 0) > 1e-7] for r in rs]
        placements.append(_normalised(layout, E, ranks))
    chosen = [max(ks, key=lambda k: a[w, k].value() or 0) for w in ws] if K > 1 else [0] * W
    pool = Pool(layout=layout, placements=tuple(placements[k] for k in sorted(set(chosen))))
    objective, assignment = best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)
    optimal = prob.sol_status == pulp.LpSolutionOptimal and "Stopped on time" not in log_text
    cbc_bound = _cbc_bound(log_text)
    bound = objective if optimal else max(balance_bound(load_WE, steps_W, R, terms), (cbc_bound or 0.0) * unit_s)
    return PoolPlan(pool=pool, assignment=tuple(assignment), objective_s=objective,
                    bound_s=bound, gap=_gap(objective, bound), solve_s=time.perf_counter() - started,
                    status="optimal" if optimal else "time_limit")


def _gap(objective: float, bound: float) -> float:
    return max(0.0, (objective - bound) / objective) if objective > 0 else 0.0


def balance_bound(load_WE: list[list[float]], steps_W: list[int], ranks: int, terms: PlanTerms) -> float:
    """No pool beats perfect balance (tokens and held slots) in every window with no switches: a valid lower
    bound on the objective."""
    E = len(load_WE[0])
    per_window = [(terms.compute_per_token_s * sum(row) + terms.per_slot_s * E) / ranks
                  + terms.comm_per_token_s * sum(row) / ranks for row in load_WE]
    return sum(x * s for x, s in zip(per_window, steps_W)) / sum(steps_W)


def _normalised(layout: SlotLayout, E: int, ranks: list[list[tuple[int, float]]]) -> Placement:
    """Shares from the solver, rescaled so each expert's sum to exactly 1 (CBC rounds at 1e-9 or so)."""
    total = [0.0] * E
    for items in ranks:
        for e, f in items:
            total[e] += f
    return placement_from_ranks(layout, E, [[(e, f / total[e]) for e, f in items] for items in ranks])


def _set_warm_start(warm, L, p, weights, y, g, C, T, a, sw, K) -> None:
    """A complete feasible point for CBC: the warm pool, its ranks sorted as the symmetry constraints demand."""
    pool, assignment = warm
    a_c, b = weights
    layout = pool.layout
    W, E = len(L), len(L[0])
    mean = [sum(L[w][e] * p[w] for w in range(W)) for e in range(E)]
    plans = list(pool.placements) + [pool.placements[-1]] * max(0, K - len(pool))
    order = []  # members numbered by first use, as the symmetry rows on a demand
    for k in assignment:
        if k not in order:
            order.append(k)
    order += [k for k in range(len(plans)) if k not in order]
    shares = []
    for new, old in enumerate(order[:K]):
        share = [[0.0] * E for _ in range(layout.ranks)]
        for s, (e, f) in enumerate(zip(plans[old].expert_S, plans[old].share_S)):
            if e != EMPTY and f > 0:
                share[layout.rank_of(s)][e] += f
        share.sort(key=lambda row: -sum(mean[e] * row[e] for e in range(E)))
        shares.append(share)
        for r, row in enumerate(share):
            for e in range(E):
                y[new, r, e].setInitialValue(1 if row[e] > 0 else 0)
                g[new, r, e].setInitialValue(row[e])
    chosen = [order.index(k) for k in assignment]
    for w in range(W):
        rows = shares[chosen[w]]
        tokens = [sum(L[w][e] * row[e] for e in range(E)) for row in rows]
        T[w].setInitialValue(max(tokens))
        C[w].setInitialValue(max(a_c * t + b * sum(1 for x in row if x > 0) for t, row in zip(tokens, rows)))
        for k in range(K if K > 1 else 0):
            a[w, k].setInitialValue(1 if chosen[w] == k else 0)
    for w in range(W - 1 if K > 1 else 0):
        for k in range(K):
            sw[w, k].setInitialValue(max(0, (chosen[w] == k) - (chosen[w + 1] == k)))


# -- after the solve: cheap switches -----------------------------------------------------------------------------

def align_pool(pool: Pool) -> Pool:
    """Relabel ranks and order slots so that consecutive members share as many slots as possible.

    Ranks are interchangeable in the model, so this changes no step time, only the bytes a switch moves.
    """
    layout = pool.layout
    out = [pool.placements[0]]
    for p in pool.placements[1:]:
        prev = out[-1]
        prev_sets = [set(x for x in row if x != EMPTY) for row in prev.experts_per_rank()]
        items = [[(e, f) for e, f in zip(p.expert_S[s.start:s.stop], p.share_S[s.start:s.stop]) if e != EMPTY]
                 for s in (layout.slots_of(r) for r in range(layout.ranks))]
        free = set(range(layout.ranks))
        target: list[list[tuple[int, float]]] = [[] for _ in range(layout.ranks)]
        for r in sorted(range(layout.ranks), key=lambda r: -len(items[r])):
            best = max(free, key=lambda q: (len(prev_sets[q] & {e for e, _ in items[r]}), -q))
            free.remove(best)
            target[best] = items[r]
        expert_S, share_S = [], []
        for r in range(layout.ranks):
            prev_row = prev.experts_per_rank()[r]
            mine = dict(target[r])
            row_e = [e if e in mine else None for e in prev_row]
            rest = [e for e in mine if e not in row_e]
            row_e = [e if e is not None else (rest.pop(0) if rest else EMPTY) for e in row_e]
            expert_S += row_e
            share_S += [mine.get(e, 0.0) if e != EMPTY else 0.0 for e in row_e]
        out.append(Placement(layout=layout, num_experts=p.num_experts, expert_S=tuple(expert_S),
                             share_S=tuple(share_S)))
    return Pool(layout=layout, placements=tuple(out))


# -- the planner ------------------------------------------------------------------------------------------------

MONOLITHIC_MAX_BINARIES = 400
HEURISTIC_SHARE = 0.15  # of the time limit for trying groupings before the ILP
CBC_SHARE = 0.75  # of the time left that goes to CBC's search; the rest covers building and file round trips


def plan_pool(layout: SlotLayout, load_WE: list[list[float]], steps_W: list[int], K: int, model: CostModel, *,
              time_limit_s: float = 2.0, gap_rel: float = 1e-4, use_ilp: bool = True) -> PoolPlan:
    """Choose a pool of at most K placements for the scenarios (windows in time order, ``steps_W`` steps each).

    First the greedy pool (the baseline) and ``heuristic_pool`` (better groupings and members) give a warm start.
    Small instances (``K * R * E <= MONOLITHIC_MAX_BINARIES``) solve the whole pool ILP: exact up to ``gap_rel``.
    Larger ones fix the window-to-member grouping of the warm start, solve one single-placement ILP per group
    (the same model with K = 1: no big-M, so CBC's bound is useful) within the time limit, then regroup windows by
    the best member (Viterbi). Either way the result is never worse than the greedy pool in the planning model,
    and ``gap`` is measured against CBC's bound or perfect balance, whichever is higher.

    Raises ``InfeasibleError`` for inputs no placement satisfies: more experts than slots, or slots whose
    experts (weights + optimizer state) exceed the profile's device memory.
    """
    started = time.perf_counter()
    if K < 1:
        raise ValueError(f"a pool needs at least one placement: K (--pool) must be >= 1, got {K}")
    if not load_WE or len(steps_W) != len(load_WE) or any(s < 1 for s in steps_W):
        raise ValueError(f"plan_pool needs one or more windows, each of >= 1 steps: {len(load_WE)} load vectors, "
                         f"steps {steps_W}")
    E, R = len(load_WE[0]), layout.ranks
    check_feasible(layout, E)
    check_memory(layout, model)
    terms = plan_terms(model, layout, load_WE)
    warm = greedy_pool(layout, load_WE, steps_W, K, terms)
    status = "greedy"
    if use_ilp:
        better = heuristic_pool(layout, load_WE, steps_W, K, terms, baseline=warm,
                                time_budget_s=HEURISTIC_SHARE * time_limit_s)
        status, warm = ("heuristic", better) if better is not warm else (status, warm)
    warm_obj = planning_objective(warm[0], load_WE, steps_W, terms)
    bound = balance_bound(load_WE, steps_W, R, terms)
    result = PoolPlan(pool=warm[0], assignment=tuple(warm[1]), objective_s=warm_obj, bound_s=bound,
                      gap=_gap(warm_obj, bound), solve_s=0.0, status=status)
    if use_ilp:
        left = time_limit_s - (time.perf_counter() - started)
        if min(K, len(load_WE)) * R * E <= MONOLITHIC_MAX_BINARIES:
            # CBC's limit is its own search; model writing, start-up and reading back come on top
            found = solve_pool_ilp(layout, load_WE, steps_W, K, terms=terms, warm=warm,
                                   time_limit_s=max(0.05, CBC_SHARE * left - 0.1), gap_rel=gap_rel)
        else:
            found = _solve_per_group(layout, load_WE, steps_W, warm, terms=terms, time_limit_s=0.8 * left,
                                     gap_rel=gap_rel)
        if found is not None and found.objective_s <= warm_obj * (1 + 1e-9):
            result = found
    return PoolPlan(pool=align_pool(result.pool), assignment=result.assignment, objective_s=result.objective_s,
                    bound_s=result.bound_s, gap=result.gap, solve_s=time.perf_counter() - started, status=result.status)


def _cbc_floor_s(triples: int) -> float:
    """Seconds a CBC solve of the per-group ILP takes beyond its time limit, by model size (see the caller)."""
    return 0.15 + (triples / 7000) ** 1.5


def _solve_per_group(layout: SlotLayout, load_WE: list[list[float]], steps_W: list[int], warm: tuple[Pool, list[int]],
                     *, terms: PlanTerms, time_limit_s: float, gap_rel: float) -> PoolPlan:
    """One K = 1 ILP per group of windows of the warm pool, warm-started from its member; then windows move to
    their best member."""
    started = time.perf_counter()
    pool, assignment = warm
    groups = [[w for w, k in enumerate(assignment) if k == j] for j in range(len(pool))]
    placements = []
    all_optimal, solved = True, 0
    # CBC does not look at its clock while it solves the root LP and re-solves around the warm start, and the
    # model is built, written and read back besides: measured on this machine, a group of 3k (rank, expert,
    # window) triples costs about 0.4 s whatever the limit, 12k about 3.5 s. ``_cbc_floor_s`` models that,
    # scaled up by what each solve shows; a group whose floor exceeds its share of the budget keeps its member.
    slowdown = 1.0
    for i, grp in enumerate(groups):
        start = pool.placements[i]
        if not grp:
            placements.append(start)
            continue
        sub, steps = [load_WE[w] for w in grp], [steps_W[w] for w in grp]
        floor = slowdown * _cbc_floor_s(layout.ranks * len(load_WE[0]) * len(grp))
        budget = (time_limit_s - (time.perf_counter() - started)) / sum(1 for g_ in groups[i:] if g_)
        found = None
        if budget >= floor + 0.05:
            t0 = time.perf_counter()
            found = solve_pool_ilp(layout, sub, steps, 1, terms=terms,
                                   warm=(Pool(layout=layout, placements=(start,)), [0] * len(grp)),
                                   time_limit_s=budget - floor, gap_rel=gap_rel)
            slowdown = max(slowdown, (time.perf_counter() - t0 - (budget - floor)) / floor)
            solved += 1
        all_optimal &= found is not None and found.status == "optimal"
        placements.append(found.pool.placements[0] if found is not None else start)
    pool = Pool(layout=layout, placements=tuple(placements))
    objective, path = best_assignment(_cost_WK(pool, load_WE, terms), steps_W, terms.switch_s)
    bound = balance_bound(load_WE, steps_W, layout.ranks, terms)
    return PoolPlan(pool=pool, assignment=tuple(path), objective_s=objective, bound_s=bound, gap=_gap(objective, bound),
                    solve_s=time.perf_counter() - started,
                    status="per_group_optimal" if all_optimal else "time_limit" if solved else "heuristic")


def check_memory(layout: SlotLayout, model: CostModel) -> None:
    need = layout.slots_per_rank * model.dims.expert_bytes
    if need > model.profile.device_memory_bytes:
        raise InfeasibleError(
            f"{layout.slots_per_rank} slots per rank x {model.dims.expert_bytes / 1e9:.3g} GB per expert (weights + "
            f"optimizer state) = {need / 1e9:.3g} GB exceeds the profile's device_memory_bytes "
            f"({model.profile.device_memory_bytes / 1e9:.3g} GB); use fewer slots per rank or more ranks")
    if layout.ranks > model.profile.max_ranks:
        raise InfeasibleError(f"{layout.ranks} ranks exceed the profile's {model.profile.nodes} nodes x "
                              f"{model.profile.devices_per_node} devices; use at most {model.profile.max_ranks} "
                              f"ranks or a profile with more nodes")


# -- evaluation with the full model: reports and the runtime ---------------------------------------------------

def evaluate_pool(pool: Pool, load_E: list[float], current: int, model: CostModel) -> list[tuple[float, float]]:
    """For the runtime: each member's predicted step seconds on ``load_E`` (a recent window's mean loads) and the
    seconds to switch to it from member ``current``. Pick ``argmin(step * steps_ahead + switch)``."""
    src = pool.placements[current]
    return [(model.step_s(p, load_E), model.switch_s(src, p)) for p in pool.placements]


def choose_member(pool: Pool, load_E: list[float], current: int, model: CostModel, steps_ahead: int) -> int:
    costs = evaluate_pool(pool, load_E, current, model)
    return min(range(len(costs)), key=lambda k: (costs[k][0] * steps_ahead + costs[k][1], k != current))


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolEvaluation:
    expected_step_s: float
    step_s_WK: tuple[tuple[float, ...], ...]
    assignment: tuple[int, ...]
    switches: int
    switch_s_total: float


def simulate_online(pool: Pool, load_WE: list[list[float]], steps_W: list[int], model: CostModel,
                    first: int = 0) -> PoolEvaluation:
    """Expected step seconds when the runtime decides from what it has seen: before window w it runs
    ``choose_member`` on window w-1's loads (``first`` for window 0), then pays window w's actual step time."""
    step = [[model.step_s(p, load_E) for p in pool.placements] for load_E in load_WE]
    path, switch_total, total = [first], 0.0, step[0][first] * steps_W[0]
    for w in range(1, len(load_WE)):
        k = choose_member(pool, load_WE[w - 1], path[-1], model, steps_W[w])
        switch_total += model.switch_s(pool.placements[path[-1]], pool.placements[k])
        total += step[w][k] * steps_W[w]
        path.append(k)
    return PoolEvaluation(expected_step_s=(total + switch_total) / sum(steps_W),
                          step_s_WK=tuple(tuple(r) for r in step),
                          assignment=tuple(path), switches=sum(a != b for a, b in zip(path, path[1:])),
                          switch_s_total=switch_total)


def simulate_pool(pool: Pool, load_WE: list[list[float]], steps_W: list[int], model: CostModel) -> PoolEvaluation:
    """Expected step seconds with the best member per window (the planning model's assumption: the runtime knows
    each window's loads), switch costs (real bytes moved) included. ``simulate_online`` is the causal version."""
    K = len(pool)
    step = [[model.step_s(p, load_E) for p in pool.placements] for load_E in load_WE]
    sw = [[model.switch_s(pool.placements[i], pool.placements[j]) for j in range(K)] for i in range(K)]
    mean, path = best_assignment(step, steps_W, sw)
    switches = [(i, j) for i, j in zip(path, path[1:]) if i != j]
    return PoolEvaluation(expected_step_s=mean, step_s_WK=tuple(tuple(r) for r in step), assignment=tuple(path),
                          switches=len(switches), switch_s_total=sum(sw[i][j] for i, j in switches))


"""The pool planner: the ILP is exact on small instances, never worse than the greedy, and refuses bad inputs."""
import itertools
import random

import pulp
import pytest

from moecc.costmodel.formulas import ExpertDims, compile_cost_model
from moecc.costmodel.greedy import InfeasibleError, greedy_placement, static_placement
from moecc.costmodel.placement import Pool, SlotLayout
from moecc.costmodel.planner import (
    PlanTerms,
    align_pool,
    choose_member,
    evaluate_pool,
    greedy_pool,
    plan_pool,
    planning_objective,
    simulate_pool,
    solve_pool_ilp,
)
from moecc.costmodel.profile import builtin_profile


def _terms(switch_s=0.0, per_slot_s=0.02):
    """Seconds per token of compute and of all-to-all, per held slot, per switch: numbers of the size CBC likes."""
    return PlanTerms(compute_per_token_s=1e-3, per_slot_s=per_slot_s, comm_per_token_s=5e-4, switch_s=switch_s)


def _best_shares_lp(rank_sets, loads, steps, terms):
    """The continuous part of the model for one fixed choice of experts per rank: an LP over the shares."""
    E, R = len(loads[0]), len(rank_sets)
    prob = pulp.LpProblem("shares", pulp.LpMinimize)
    g = {(r, e): pulp.LpVariable(f"g_{r}_{e}", 0, 1) for r in range(R) for e in rank_sets[r]}
    C = [pulp.LpVariable(f"C_{w}", 0) for w in range(len(loads))]
    T = [pulp.LpVariable(f"T_{w}", 0) for w in range(len(loads))]
    prob += pulp.lpSum(s * (c + terms.comm_per_token_s * t) for s, c, t in zip(steps, C, T))
    for e in range(E):
        prob += pulp.lpSum(g[r, e] for r in range(R) if e in rank_sets[r]) == 1
    for w, load in enumerate(loads):
        for r in range(R):
            tokens = pulp.lpSum(load[e] * g[r, e] for e in rank_sets[r])
            prob += T[w] >= tokens
            prob += C[w] >= terms.compute_per_token_s * tokens + terms.per_slot_s * len(rank_sets[r])
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    return pulp.value(prob.objective)


def _brute_force(E, R, S, loads, steps, K, terms):
    """Exhaustive enumeration of the planning model: every assignment of windows to at most K members, every
    choice of experts per rank (up to rank order), shares by LP; seconds per step including switches."""
    subsets = [frozenset(c) for size in range(S + 1) for c in itertools.combinations(range(E), size)]
    combos = itertools.combinations_with_replacement(subsets, R)
    layouts = {tuple(sorted(tuple(sorted(s)) for s in combo)) for combo in combos
               if frozenset().union(*combo) == frozenset(range(E))}
    best_for_group = {}
    total_steps = sum(steps)
    best = float("inf")
    for assign in itertools.product(range(K), repeat=len(loads)):
        cost = terms.switch_s * sum(a != b for a, b in zip(assign, assign[1:]))
        for k in set(assign):
            group = tuple(w for w, a in enumerate(assign) if a == k)
            if group not in best_for_group:
                best_for_group[group] = min(
                    _best_shares_lp([set(s) for s in sets], [loads[w] for w in group], [steps[w] for w in group], terms)
                    for sets in layouts)
            cost += best_for_group[group]
        best = min(best, cost / total_steps)
    return best


@pytest.mark.parametrize("E, R, S, K, loads, terms", [
    (5, 3, 2, 1, [[90, 40, 30, 20, 10], [20, 80, 40, 10, 40]], _terms()),
    (4, 2, 3, 2, [[100, 10, 10, 5], [10, 100, 5, 10], [90, 20, 10, 10]], _terms(switch_s=0.5)),
    (6, 3, 2, 1, [[120, 60, 30, 20, 15, 5]], _terms(per_slot_s=0.0)),
])
def test_ilp_optimum_equals_brute_force(E, R, S, K, loads, terms):
    steps = [10] * len(loads)
    layout = SlotLayout(ranks=R, slots_per_rank=S)
    result = solve_pool_ilp(layout, loads, steps, K, terms=terms, time_limit_s=20, gap_rel=1e-9)
    assert result is not None and result.status == "optimal"
    expected = _brute_force(E, R, S, loads, steps, K, terms)
    assert result.objective_s == pytest.approx(expected, rel=1e-6)
    assert planning_objective(result.pool, loads, steps, terms) == pytest.approx(expected, rel=1e-6)


def _random_instance(rng, E, W):
    hot = [rng.sample(range(E), 2) for _ in range(W)]
    return [[rng.randint(1, 20) + (300 if e == h[0] else 120 if e == h[1] else 0) for e in range(E)] for h in hot]


@pytest.mark.parametrize("seed", range(3))
def test_greedy_is_never_better_than_the_ilp(seed):
    rng = random.Random(seed)
    E, R, S, K = 6, 3, 3, 2
    loads = _random_instance(rng, E, 4)
    steps = [20] * 4
    layout = SlotLayout(ranks=R, slots_per_rank=S)
    terms = _terms(switch_s=0.05)
    ilp = solve_pool_ilp(layout, loads, steps, K, terms=terms, time_limit_s=10)
    greedy, _ = greedy_pool(layout, loads, steps, K, terms)
    assert ilp.objective_s <= planning_objective(greedy, loads, steps, terms) * (1 + 1e-9)
    for load in loads:
        single = solve_pool_ilp(layout, [load], [1], 1, terms=terms, time_limit_s=10)
        for fill in (False, True):
            lpt = Pool(layout=layout, placements=(greedy_placement(layout, load, fill=fill),))
            assert single.objective_s <= planning_objective(lpt, [load], [1], terms) * (1 + 1e-9)


def _model(ranks, profile="h100-sxm-8x", **dims):
    return compile_cost_model(builtin_profile(profile), ExpertDims(d_model=1024, d_ffn=704, **dims), ranks)


def test_more_experts_than_slots_is_refused():
    layout = SlotLayout(ranks=2, slots_per_rank=2)
    with pytest.raises(InfeasibleError, match="5 experts do not fit in 2 ranks x 2 slots"):
        plan_pool(layout, [[1, 2, 3, 4, 5]], [1], 1, _model(2))


def test_slots_that_do_not_fit_in_device_memory_are_refused():
    layout = SlotLayout(ranks=2, slots_per_rank=4)
    huge = ExpertDims(d_model=16384, d_ffn=65536)  # 3.2 G params per expert: 45 GB with Adam state
    model = compile_cost_model(builtin_profile("a100-sxm-8x"), huge, 2)
    with pytest.raises(InfeasibleError, match="device_memory_bytes"):
        plan_pool(layout, [[5, 4, 3, 2]], [1], 1, model)


def test_planned_pool_beats_static_expert_parallelism_on_a_skewed_trace():
    layout = SlotLayout(ranks=4, slots_per_rank=3)
    model = _model(4)
    shape = [[40, 9, 5, 4, 3, 2, 1.5, 1], [3, 2, 1.5, 1, 40, 9, 5, 4]]
    loads = [[2000 * x for x in row] for row in shape]
    steps = [1000, 1000]
    plan = plan_pool(layout, loads, steps, 2, model, time_limit_s=5)
    static = Pool(layout=layout, placements=(static_placement(layout, 8),))
    assert simulate_pool(plan.pool, loads, steps, model).expected_step_s < \
        0.6 * simulate_pool(static, loads, steps, model).expected_step_s


def test_runtime_evaluation_prices_each_member_and_its_switch():
    layout = SlotLayout(ranks=2, slots_per_rank=3)  # two spare slots: each member replicates its hot expert
    model = _model(2)
    hot0, hot2 = [9000, 500, 500, 10], [500, 10, 9000, 500]
    pool = align_pool(Pool(layout=layout, placements=(greedy_placement(layout, hot0), greedy_placement(layout, hot2))))
    costs = evaluate_pool(pool, hot2, 0, model)
    assert costs[0][1] == 0.0 and costs[1][1] > 0.0
    assert costs[1][0] < costs[0][0]
    assert choose_member(pool, hot2, 0, model, steps_ahead=1_000_000) == 1
    assert choose_member(pool, hot2, 0, model, steps_ahead=0) == 0


def test_aligning_a_pool_keeps_step_times_and_moves_no_more_slots():
    layout = SlotLayout(ranks=3, slots_per_rank=3)
    model = _model(3)
    a = greedy_placement(layout, [500, 300, 200, 100, 50, 40, 30])
    b = greedy_placement(layout, [40, 30, 500, 300, 200, 100, 50])
    aligned = align_pool(Pool(layout=layout, placements=(a, b)))
    load = [100, 200, 300, 50, 40, 30, 20]
    assert model.step_s(aligned.placements[1], load) == pytest.approx(model.step_s(b, load))
    assert model.switch_s(aligned.placements[0], aligned.placements[1]) <= model.switch_s(a, b)


def test_polished_shares_balance_what_even_splits_leave_uneven():
    layout = SlotLayout(ranks=2, slots_per_rank=2)
    # expert 0 on both ranks, expert 1 with it on rank 0, expert 2 on rank 1: an even split of expert 0
    # leaves rank 0 with 50 + 30 and rank 1 with 50 + 10; moving 10 of expert 0 to rank 1 balances them
    from moecc.costmodel.placement import placement_from_ranks
    from moecc.costmodel.planner import polish_shares
    even = placement_from_ranks(layout, 3, [[(0, 0.5), (1, 1.0)], [(0, 0.5), (2, 1.0)]])
    load = [[100, 30, 10]]
    polished = polish_shares(even, load, [1], _terms())
    assert polished.tokens_per_rank(load[0]) == pytest.approx([70, 70])
    assert polished.expert_S == even.expert_S

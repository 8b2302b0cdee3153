"""Cost formulas: the compiled functions agree with the symbolic ones and behave like a machine would."""
import sympy as sp

from moecc.costmodel.formulas import (
    ExpertDims,
    a2a_time_expr,
    compile_cost_model,
    constants,
    ffn_time_expr,
    n,
    step_time_expr,
    theta,
)
from moecc.costmodel.greedy import static_placement
from moecc.costmodel.placement import Placement, SlotLayout, placement_from_ranks
from moecc.costmodel.profile import builtin_profile

H100 = builtin_profile("h100-sxm-8x")
DIMS = ExpertDims(d_model=1024, d_ffn=704)


def test_lambdified_ffn_time_equals_the_symbolic_formula():
    model = compile_cost_model(H100, DIMS, 8)
    expr = ffn_time_expr().subs(constants(H100, DIMS, 8))
    for tokens in (1, 37, 1000, 20_000):
        exact = expr.subs(n, tokens).replace(theta, lambda x: sp.Float(H100.gemm.flops_per_s(float(x))))
        assert abs(model.ffn_s(tokens) - float(exact)) <= 1e-12 + 1e-9 * float(exact)
    assert model.ffn_s(0) == 0.0


def test_whole_step_expression_matches_the_compiled_step_time():
    layout = SlotLayout(ranks=2, slots_per_rank=2)
    placement = placement_from_ranks(layout, 3, [[(0, 0.5), (1, 1.0)], [(0, 0.5), (2, 1.0)]])
    model = compile_cost_model(H100, DIMS, 2)
    expr, slot_syms = step_time_expr(layout)
    load = [3000, 500, 1200]
    tokens = placement.tokens_per_slot(load)
    subs = {sym: tokens[r * 2 + s] for r, row in enumerate(slot_syms) for s, sym in enumerate(row)}
    subs.update(constants(H100, DIMS, 2))
    exact = float(expr.subs(subs).replace(theta, lambda x: sp.Float(H100.gemm.flops_per_s(float(x)))))
    assert abs(model.step_s(placement, load) - exact) <= 1e-9 * exact


def test_predicted_step_time_grows_with_load():
    layout = SlotLayout(ranks=4, slots_per_rank=2)
    placement = static_placement(layout, 8)
    model = compile_cost_model(H100, DIMS, 4)
    base = [400, 300, 250, 200, 150, 120, 100, 80]
    times = [model.step_s(placement, [x * scale for x in base]) for scale in (1, 2, 4, 8)]
    assert times == sorted(times) and len(set(times)) == 4
    hotter = list(base)
    hotter[0] += 500
    assert model.step_s(placement, hotter) > model.step_s(placement, base)


def test_imbalance_costs_more_than_balance_for_the_same_tokens():
    layout = SlotLayout(ranks=4, slots_per_rank=1)
    placement = static_placement(layout, 4)
    model = compile_cost_model(H100, DIMS, 4)
    assert model.step_s(placement, [4000, 0, 0, 0]) > model.step_s(placement, [1000, 1000, 1000, 1000])


def test_all_to_all_crosses_nodes_only_beyond_one_node():
    dims = DIMS
    within = compile_cost_model(H100, dims, 8).a2a_s(10_000)
    across = compile_cost_model(H100, dims, 16).a2a_s(10_000)
    assert across > within > 0
    assert a2a_time_expr().has(sp.Symbol("B_inter", nonnegative=True))


def test_switch_cost_counts_the_busiest_ranks_refilled_slots():
    layout = SlotLayout(ranks=2, slots_per_rank=2)
    a = placement_from_ranks(layout, 4, [[(0, 1.0), (1, 1.0)], [(2, 1.0), (3, 1.0)]])
    one = placement_from_ranks(layout, 4, [[(0, 1.0), (2, 1.0)], [(1, 1.0), (3, 1.0)]])
    two = placement_from_ranks(layout, 4, [[(2, 1.0), (3, 1.0)], [(0, 1.0), (1, 1.0)]])
    model = compile_cost_model(H100, DIMS, 2)
    move = H100.param_move
    assert model.switch_s(a, a) == 0.0
    assert abs(model.switch_s(a, one) - (move.latency_s + DIMS.expert_bytes / move.bandwidth_Bps)) < 1e-12
    assert abs(model.switch_s(a, two) - (move.latency_s + 2 * DIMS.expert_bytes / move.bandwidth_Bps)) < 1e-12


def test_placement_refuses_shares_that_do_not_sum_to_one():
    layout = SlotLayout(ranks=1, slots_per_rank=2)
    try:
        Placement(layout=layout, num_experts=2, expert_S=(0, 1), share_S=(0.5, 1.0))
    except ValueError as err:
        assert "expert 0" in str(err)
    else:
        raise AssertionError("a placement whose expert 0 takes half its tokens was accepted")

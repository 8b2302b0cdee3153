"""The switching rule (``costmodel.switching.decide_switch``) and expert dims read from the real weights."""
import math

import pytest

from moecc import runtime
from moecc.costmodel.formulas import ExpertDims, compile_cost_model
from moecc.costmodel.placement import SlotLayout, placement_from_ranks
from moecc.costmodel.profile import builtin_profile
from moecc.costmodel.switching import LastSwitch, SwitchDecision, decide_switch

H100 = builtin_profile("h100-sxm-8x")
CPU = builtin_profile("cpu")
D, F = 1024, 704
LAYOUT = SlotLayout(ranks=2, slots_per_rank=2)
HOT_TOGETHER = placement_from_ranks(LAYOUT, 4, [[(0, 1.0), (1, 1.0)], [(2, 1.0), (3, 1.0)]])  # experts 0, 1 on rank 0
HOT_APART = placement_from_ranks(LAYOUT, 4, [[(0, 1.0), (2, 1.0)], [(1, 1.0), (3, 1.0)]])
SKEWED = [4000.0, 3000.0, 100.0, 100.0]
BALANCED = [1000.0] * 4


def _model(**dims):
    return compile_cost_model(H100, ExpertDims(d_model=D, d_ffn=F, **dims), 2)


def _payback_steps(model, current, target, load_E) -> float:
    """Steps after which moving ``current -> target`` has paid for itself, by the formulas themselves."""
    gain = model.step_s(current, load_E) - model.step_s(target, load_E)
    return model.switch_s(current, target) / gain


def test_switches_away_from_a_hot_rank_once_the_interval_pays_for_the_move():
    model = _model()
    pay = _payback_steps(model, HOT_TOGETHER, HOT_APART, SKEWED)
    assert pay > 1  # the interval decides, not only the sign of the gain
    choice = decide_switch(model, HOT_TOGETHER, [HOT_TOGETHER, HOT_APART], SKEWED, math.ceil(pay) + 1)
    assert isinstance(choice, SwitchDecision) and choice.placement == HOT_APART
    assert choice.gain_s == model.step_s(HOT_TOGETHER, SKEWED) - model.step_s(HOT_APART, SKEWED) > 0
    assert choice.cost_s == model.switch_s(HOT_TOGETHER, HOT_APART) > 0
    # the saving over the interval must exceed the cost: one step short of paying back, stay
    assert decide_switch(model, HOT_TOGETHER, [HOT_TOGETHER, HOT_APART], SKEWED, math.floor(pay)) is None


def test_stays_on_a_balanced_layout_and_on_no_loads():
    model = _model()
    # balanced: the other layout prices the same, so the first (current) candidate wins and nothing moves
    assert decide_switch(model, HOT_TOGETHER, [HOT_TOGETHER, HOT_APART], BALANCED, 10**9) is None
    # a candidate list without the current placement: a slower candidate never wins (negative gain)
    skew_apart = [4000.0, 100.0, 3000.0, 100.0]  # HOT_APART puts 0 and 2 together
    assert decide_switch(model, HOT_TOGETHER, [HOT_APART], skew_apart, 10**9) is None
    assert decide_switch(model, HOT_TOGETHER, [HOT_TOGETHER, HOT_APART], [0.0] * 4, 10**9) is None


def test_a_previous_switch_that_gained_nothing_stops_the_next():
    model = _model()
    interval = 10 * math.ceil(_payback_steps(model, HOT_TOGETHER, HOT_APART, SKEWED))
    pair = [HOT_TOGETHER, HOT_APART]
    plain = decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval)
    assert plain is not None
    cheap = 1e-9  # the last switch was fast: only its measured gain can stop this one
    nothing = LastSwitch(predicted_gain_s=1e-3, switch_s=cheap, moved_experts=1, measured_gain_s=0.0)
    assert decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval, nothing) is None
    half = LastSwitch(predicted_gain_s=1e-3, switch_s=cheap, moved_experts=1, measured_gain_s=0.5e-3)
    corrected = decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval, half)
    assert corrected is not None and corrected.gain_s == pytest.approx(0.5 * plain.gain_s, rel=1e-12)
    more = LastSwitch(predicted_gain_s=1e-3, switch_s=cheap, moved_experts=1, measured_gain_s=5e-3)
    assert decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval, more).gain_s == plain.gain_s  # clamped at 1
    unmeasured = LastSwitch(predicted_gain_s=1e-3, switch_s=cheap, moved_experts=1, measured_gain_s=None)
    assert decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval, unmeasured) == plain


def test_a_previous_switch_that_cost_more_raises_the_predicted_cost():
    model = _model()
    pair = [HOT_TOGETHER, HOT_APART]
    interval = 10 * math.ceil(_payback_steps(model, HOT_TOGETHER, HOT_APART, SKEWED))
    plain = decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval)
    moves = 2  # slots whose expert changes: rank 0's second, rank 1's first
    per_expert = plain.gain_s * interval  # measured: each moved expert took the whole interval's saving
    assert per_expert > plain.cost_s
    slow = LastSwitch(predicted_gain_s=plain.gain_s, switch_s=3 * per_expert, moved_experts=3,
                      measured_gain_s=plain.gain_s)
    assert decide_switch(model, HOT_TOGETHER, pair, SKEWED, interval, slow) is None
    longer = math.ceil(per_expert * moves / plain.gain_s) + 1
    corrected = decide_switch(model, HOT_TOGETHER, pair, SKEWED, longer, slow)
    assert corrected.cost_s == pytest.approx(per_expert * moves, rel=1e-12) and corrected.gain_s == plain.gain_s


def test_from_weights_reads_a_swiglu_expert_in_either_orientation():
    want = ExpertDims(d_model=D, d_ffn=F, param_bytes=2, act_bytes=2)
    assert ExpertDims.from_weights(D, [(F, D), (F, D), (D, F)], param_bytes=2, act_bytes=2) == want
    assert ExpertDims.from_weights(D, [(D, F), (D, F), (F, D)], param_bytes=2, act_bytes=2) == want
    assert want.matrices == 3 and want.expert_params == 3 * D * F


def test_from_weights_prices_a_two_matrix_mlp_at_two_thirds_of_the_swiglu_gemms():
    mlp = ExpertDims.from_weights(D, [(F, D), (F,), (D, F), (D,)], param_bytes=2, act_bytes=2)
    assert (mlp.d_ffn, mlp.matrices, mlp.bias_params) == (F, 2, F + D)  # not 2F/3 wide, as params // 3D said
    assert mlp.expert_params == 2 * D * F + F + D
    two, three = (compile_cost_model(H100, dims, 2) for dims in (mlp, ExpertDims(d_model=D, d_ffn=F)))
    c, bw = 3, H100.memory_bandwidth_Bps  # training: forward + backward
    for rows in (1, 64, 3000):
        t_gemm = H100.gemm.call_overhead_s + 2 * rows * D * F / H100.gemm.flops_per_s(rows)
        assert two.ffn_s(rows) == pytest.approx(c * (2 * t_gemm + 2 * rows * F * 2 / bw), rel=1e-12)
        assert three.ffn_s(rows) == pytest.approx(c * (3 * t_gemm + 5 * rows * F * 2 / bw), rel=1e-12)
        gemm_two = two.ffn_s(rows) - c * 2 * rows * F * 2 / bw
        gemm_three = three.ffn_s(rows) - c * 5 * rows * F * 2 / bw
        assert gemm_two / gemm_three == pytest.approx(2 / 3, rel=1e-9)


def test_from_weights_counts_a_concatenated_gate_up_as_two_matrices():
    fused = ExpertDims.from_weights(D, [(2 * F, D), (D, F)], param_bytes=2, act_bytes=2)
    assert (fused.d_ffn, fused.matrices, fused.bias_params) == (F, 3, 0)
    assert fused == ExpertDims(d_model=D, d_ffn=F, param_bytes=2, act_bytes=2)
    # GPT-OSS stores gate_up as [D, 2F] with a bias, and down as [F, D] with a bias
    oss = ExpertDims.from_weights(D, [(D, 2 * F), (2 * F,), (F, D), (D,)], param_bytes=2, act_bytes=2)
    assert (oss.d_ffn, oss.matrices, oss.bias_params) == (F, 3, 2 * F + D)


def test_bf16_weights_halve_the_weight_bytes_a_switch_moves():
    shapes = [(F, D), (F, D), (D, F)]
    move = H100.param_move
    weights_s = {}
    for param_bytes in (4, 2):
        dims = ExpertDims.from_weights(D, shapes, param_bytes=param_bytes, act_bytes=2, state_bytes_per_param=0)
        model = compile_cost_model(H100, dims, 2)
        weights_s[param_bytes] = model.switch_s(HOT_TOGETHER, HOT_APART) - move.latency_s  # one slot per rank
        assert weights_s[param_bytes] == pytest.approx(3 * D * F * param_bytes / move.bandwidth_Bps, rel=1e-12)
    assert weights_s[2] == pytest.approx(0.5 * weights_s[4], rel=1e-12)
    # with Adam state moving too, bf16 saves exactly the weights' two bytes per parameter
    adam = {pb: ExpertDims.from_weights(D, shapes, param_bytes=pb, act_bytes=2).expert_bytes for pb in (4, 2)}
    assert adam[4] - adam[2] == 2 * 3 * D * F


@pytest.mark.parametrize("shapes", [
    [(F, 3), (D, F)],  # a matrix without a d_model side
    [(4, F, D)],  # a stacked [E, ...] weight, not one expert's
    [(F, D), (F + 1, D), (D, F)],  # widths that are not multiples of one ffn width
    [(F, D)] * 3 + [(D, F)],  # four matrices: no formula prices it
    [(F,), (D,)],  # biases only
])
def test_from_weights_refuses_shapes_it_cannot_price(shapes):
    with pytest.raises(ValueError):
        ExpertDims.from_weights(D, shapes, param_bytes=2, act_bytes=2)


class _Layer:
    """What runtime.decide reads of a layer on 2 ranks, without processes; shapes only when given."""

    def __init__(self, **attrs):
        self.config = type("C", (), {"placement": HOT_TOGETHER})()
        self.placement, self.pool, self.d_model, self.d_ffn, self.switch_log = HOT_TOGETHER, None, 512, 1024, []
        for k, v in attrs.items():
            setattr(self, k, v)


def test_runtime_decide_prices_the_layers_own_weights_and_falls_back_without_them():
    load = [x * 50 for x in SKEWED]
    fallback = compile_cost_model(CPU, ExpertDims(d_model=512, d_ffn=1024, act_bytes=4, param_bytes=4), 2)
    best, gain, cost = runtime.decide(_Layer(), load, 50, CPU)
    assert cost == fallback.switch_s(HOT_TOGETHER, best)
    assert gain == fallback.step_s(HOT_TOGETHER, SKEWED) - fallback.step_s(best, SKEWED)
    mlp = _Layer(expert_weight_shapes=[(1024, 512), (1024,), (512, 1024), (512,)], param_bytes=2, act_bytes=2)
    dims = ExpertDims(d_model=512, d_ffn=1024, matrices=2, bias_params=1024 + 512, param_bytes=2, act_bytes=2)
    priced = compile_cost_model(CPU, dims, 2)
    best, gain, cost = runtime.decide(mlp, load, 50, CPU)
    assert cost == priced.switch_s(HOT_TOGETHER, best) < fallback.switch_s(HOT_TOGETHER, best)
    assert gain == priced.step_s(HOT_TOGETHER, SKEWED) - priced.step_s(best, SKEWED)

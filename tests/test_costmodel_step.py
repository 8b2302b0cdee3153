"""The whole-step cost model (costmodel/step.py): what its formulas promise, and the exchange chooser."""
import dataclasses
import json
import random

import pytest

from moecc.costmodel.greedy import static_placement
from moecc.costmodel.placement import SlotLayout
from moecc.costmodel.profile import (
    Link,
    MeasuredExchange,
    ProfileError,
    StepTerms,
    builtin_profile,
    load_profile,
    profile_to_dict,
    save_profile,
)
from moecc.costmodel.step import (
    LayerWork,
    _pipeline,
    choose_exchange,
    exchange_options,
    formulas_text,
    pipeline_s,
    step_breakdown,
)

H100 = builtin_profile("h100-sxm-8x")
WORK = LayerWork(tokens=4096, d_model=4096, d_ffn=1408, top_k=2, num_experts=64)


def cluster(nodes=8, *, efficiency=1.0, per_peer_inter=0.0, per_peer_intra=0.0, inter=None, intra=None):
    """The H100 datasheet profile with the exchange's terms set by the test."""
    step = dataclasses.replace(H100.step_terms, overlap_efficiency=efficiency, inter_node_per_peer_s=per_peer_inter,
                               intra_node_per_peer_s=per_peer_intra)
    return dataclasses.replace(H100, nodes=nodes, step=step, inter_node=inter or H100.inter_node,
                               intra_node=intra or H100.intra_node)


def totals(profile, work, ranks, chunks, **kw):
    return [step_breakdown(profile, work, ranks, chunks=c, **kw).total_s for c in chunks]


# -- the pipeline ---------------------------------------------------------------------------------------------------

def test_pipeline_arithmetic_is_the_sympy_formula():
    rng = random.Random(3)
    for _ in range(30):
        a, f, b, eff = rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0, 1)
        for c in (1, 2, 3, 7):
            assert _pipeline(a, f, b, c, eff) == pytest.approx(pipeline_s(a, f, b, c, eff), rel=1e-12)


def test_one_chunk_runs_exchange_compute_exchange_back_to_back():
    assert _pipeline(1.0, 5.0, 2.0, 1, 1.0) == 8.0


def test_without_overlap_chunking_only_splits_the_same_work():
    for c in (2, 3, 8):
        assert _pipeline(1.0 / c, 5.0 / c, 2.0 / c, c, 0.0) == pytest.approx(8.0)


def test_full_overlap_leaves_only_the_first_dispatch_and_the_last_return_when_compute_dominates():
    c = 4
    a, f, b = 1.0 / c, 10.0 / c, 2.0 / c
    assert _pipeline(a, f, b, c, 1.0) == pytest.approx(a + 10.0 + b)


def test_comm_bound_pipeline_is_set_by_the_exchanges():
    c = 4
    a, f, b = 3.0 / c, 1.0 / c, 3.0 / c  # the exchanges dominate: compute hides under them
    assert _pipeline(a, f, b, c, 1.0) == pytest.approx(c * (a + b))  # every exchange, compute hidden under them


# -- chunks ---------------------------------------------------------------------------------------------------------

def test_more_chunks_hide_more_of_the_exchange_up_to_a_limit():
    profile = cluster(efficiency=1.0)
    bds = [step_breakdown(profile, WORK, 64, chunks=c) for c in range(1, 9)]
    assert bds[0].hidden_s == pytest.approx(0.0, abs=1e-12)
    assert bds[1].total_s < bds[0].total_s  # the second chunk's rows fly while the first computes
    hidden = [bd.hidden_s for bd in bds]
    assert all(h2 >= h1 - 1e-12 for h1, h2 in zip(hidden, hidden[1:]))
    for bd in bds:  # never more than the shorter of the two (smaller chunks' GEMMs run slower: compute grows)
        assert bd.hidden_s <= min(bd.exchange_s, bd.expert_compute_s) + 1e-12


def test_latency_per_chunk_penalises_many_chunks():
    cheap = cluster(efficiency=1.0)
    slow = cluster(efficiency=1.0, per_peer_inter=20e-6)
    best = lambda p: min(range(1, 9), key=lambda c: step_breakdown(p, WORK, 64, chunks=c).total_s)  # noqa: E731
    assert best(slow) < best(cheap) or best(slow) == 1
    many = totals(slow, WORK, 64, [8, 1])
    assert many[0] > many[1]  # eight chunks pay eight times every exchange's per-peer latency


def test_chunks_do_not_help_when_the_exchange_needs_the_cores_that_compute():
    profile = cluster(efficiency=0.0)
    one, *more = totals(profile, WORK, 64, [1, 2, 4])
    assert all(t > one for t in more)


# -- flat or 2-D ----------------------------------------------------------------------------------------------------

def test_2d_exchange_beats_flat_when_per_peer_latency_across_nodes_dominates():
    profile = cluster(nodes=128, per_peer_inter=5e-6)
    flat = step_breakdown(profile, WORK, 1024)
    two_d = step_breakdown(profile, WORK, 1024, hierarchical=True)
    assert two_d.hierarchical and two_d.total_s < flat.total_s


def test_2d_exchange_loses_on_one_node():
    profile = cluster(nodes=1)
    flat = step_breakdown(profile, WORK, 8)
    two_d = step_breakdown(profile, WORK, 8, hierarchical=True)
    assert two_d.total_s > flat.total_s  # no second phase to save; the regrouping and both latencies cost


def test_2d_exchange_loses_when_bandwidth_dominates_and_messages_are_large():
    profile = cluster(nodes=2, per_peer_inter=0.0, per_peer_intra=0.0)
    assert step_breakdown(profile, WORK, 16, hierarchical=True).total_s > step_breakdown(profile, WORK, 16).total_s


# -- the chooser ----------------------------------------------------------------------------------------------------

def test_chooser_keeps_the_plain_exchange_when_communication_is_negligible():
    free_links = Link(bandwidth_Bps=1e18, latency_s=0.0)
    profile = cluster(efficiency=1.0, intra=free_links, inter=free_links)
    choice = choose_exchange(profile, tokens=4096, d_model=4096, d_ffn=1408, top_k=2, num_experts=64, ranks=64)
    assert (choice.chunks, choice.hierarchical) == (1, False)
    chunks, hierarchical, predicted_s = choice  # unpacks as the dispatch uses it
    assert predicted_s == pytest.approx(step_breakdown(profile, WORK, 64).total_s)


def test_chooser_overlaps_when_the_exchange_is_long_and_hides_well():
    profile = cluster(efficiency=1.0)
    choice = choose_exchange(profile, tokens=4096, d_model=4096, d_ffn=1408, top_k=2, num_experts=64, ranks=64)
    assert choice.chunks > 1 and not choice.hierarchical
    options = exchange_options(profile, WORK, 64)
    assert choice.predicted_s == pytest.approx(min(o.total_s for o in options))


def test_chooser_picks_the_2d_exchange_at_scale_when_latency_dominates():
    profile = cluster(nodes=128, per_peer_inter=5e-6)
    choice = choose_exchange(profile, tokens=1024, d_model=4096, d_ffn=1408, top_k=2, num_experts=256, ranks=1024,
                             slots_per_rank=1, node_size=8)
    assert choice.hierarchical and choice.chunks == 1


def test_one_rank_has_no_exchange_and_no_choice():
    choice = choose_exchange(H100, tokens=4096, d_model=4096, d_ffn=1408, top_k=2, num_experts=8, ranks=1)
    assert (choice.chunks, choice.hierarchical) == (1, False)
    bd = step_breakdown(H100, WORK, 1)
    assert bd.exchange_s == 0 and bd.counts_s == 0


# -- the whole step -------------------------------------------------------------------------------------------------

def test_every_term_of_the_step_is_priced_and_adds_up():
    bd = step_breakdown(H100, WORK, 64)
    for term in ("router_s", "permute_s", "host_s", "counts_s", "forward_s", "backward_s"):
        assert getattr(bd, term) > 0, term
    assert bd.total_s == pytest.approx(bd.router_s + bd.permute_s + bd.host_s + bd.accumulate_s + bd.counts_s
                                       + bd.forward_s + bd.backward_s)


def test_backward_doubles_the_expert_gemms_and_repeats_the_row_exchanges():
    inference = dataclasses.replace(WORK, training=False)
    fwd_only = step_breakdown(H100, inference, 64)
    training = step_breakdown(H100, WORK, 64)
    assert training.backward_s > fwd_only.forward_s
    assert training.exchange_s == pytest.approx(fwd_only.exchange_s * 4 / 2, rel=0.05)  # ids are small


def test_a_skewed_load_prices_the_busiest_rank():
    layout = SlotLayout(ranks=8, slots_per_rank=8)
    rows = WORK.tokens * 8 * WORK.top_k
    balanced = [rows / 64] * 64
    skewed = [rows * 0.3] + [rows * 0.7 / 63] * 63
    placement = static_placement(layout, 64)
    a = step_breakdown(H100, WORK, 8, load=balanced, placement=placement).total_s
    b = step_breakdown(H100, WORK, 8, load=skewed, placement=placement).total_s
    assert b > 1.5 * a


def test_shared_cores_stretch_compute_not_the_exchanges():
    cpu = builtin_profile("cpu")
    work = LayerWork(tokens=512, d_model=256, d_ffn=512, top_k=2, num_experts=8, act_bytes=4, param_bytes=4)
    own = step_breakdown(cpu, work, 4)
    shared = step_breakdown(cpu, work, 4, cpu_share=2.0)
    assert shared.exchange_s == own.exchange_s
    assert shared.expert_compute_s == pytest.approx(2 * own.expert_compute_s)


def test_formulas_print():
    text = formulas_text()
    assert "a2a_2d" in text and "eta" in text and "B_perm" in text


# -- the profile's step terms ---------------------------------------------------------------------------------------

def test_a_version_1_profile_loads_with_the_old_models_assumptions(tmp_path):
    data = profile_to_dict(H100)
    data["version"] = 1
    del data["step"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    profile = load_profile(path)
    assert profile.step is None
    terms = profile.step_terms
    assert terms.overlap_efficiency == 0 and terms.op_overhead_s == 0
    assert terms.permute_bandwidth_Bps == profile.memory_bandwidth_Bps
    save_profile(profile, tmp_path / "v2.json")
    assert json.loads((tmp_path / "v2.json").read_text())["version"] == 2


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["step"].__setitem__("overlap_efficiency", 1.5), "step.overlap_efficiency"),
    (lambda d: d["step"].pop("permute_bandwidth_Bps"), "step.permute_bandwidth_Bps"),
    (lambda d: d["step"].__setitem__("all_to_all_measured", [{"ranks": 1, "bandwidth_Bps": 1e9, "latency_s": 0}]),
     "step.all_to_all_measured[0].ranks"),
    (lambda d: d["step"].__setitem__("per_peer_s", 1e-6), "step.per_peer_s"),
])
def test_bad_step_terms_are_refused_naming_the_field(tmp_path, edit, field):
    data = profile_to_dict(H100)
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=f"'{field}'".replace("[", r"\[").replace("]", r"\]")):
        load_profile(path)


def test_measured_exchanges_interpolate_between_group_sizes():
    terms = StepTerms(all_to_all_measured=(MeasuredExchange(ranks=2, bandwidth_Bps=2e9, latency_s=100e-6),
                                           MeasuredExchange(ranks=4, bandwidth_Bps=1e9, latency_s=500e-6)))
    assert terms.measured_link(2) == Link(bandwidth_Bps=2e9, latency_s=100e-6)
    mid = terms.measured_link(3)
    assert mid.latency_s == pytest.approx(300e-6) and mid.bandwidth_Bps == pytest.approx(1.5e9)
    assert terms.measured_link(7).latency_s == pytest.approx(500e-6 * 6 / 3)  # latency by peers beyond
    assert terms.measured_link(1) is None and StepTerms().measured_link(4) is None


def test_a_measured_exchange_prices_a_one_node_group_instead_of_the_level():
    cpu = builtin_profile("cpu")
    slow = MeasuredExchange(ranks=4, bandwidth_Bps=cpu.intra_node.bandwidth_Bps / 4, latency_s=1e-3)
    measured = dataclasses.replace(cpu, step=dataclasses.replace(cpu.step_terms, all_to_all_measured=(slow,)))
    work = LayerWork(tokens=512, d_model=256, d_ffn=512, top_k=2, num_experts=8, act_bytes=4)
    assert step_breakdown(measured, work, 4).exchange_s > 3 * step_breakdown(
        dataclasses.replace(cpu, step=dataclasses.replace(cpu.step_terms, all_to_all_measured=())), work, 4).exchange_s

"""Qwen2-MoE (transformers 5.x) under backend="moecc": softmax top-2 without renormalisation, plus a shared expert behind its own sigmoid gate (shared_expert_gate), added outside the routed sum.

Built from its config class at tiny size (tests/hf_zoo.py). The whole model is compiled in training mode with the
"eager" experts implementation (the loop that graph-breaks under stock torch.compile); the "grouped_mm"
implementation is checked on one block compiled alone with fullgraph=True.
"""
import pytest

from hf_zoo import Compiled, assert_pairs_close, block_fullgraph, router_facts

pytest.importorskip("transformers")

FAMILY = "qwen2_moe"
ROUTER = {'score': 'softmax', 'top_k': 2, 'score_after_topk': False, 'renormalize': False, 'selection_bias': False, 'router_bias': False, 'grouped': False, 'scale': False}
PATHS = ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]


@pytest.fixture(scope="module")
def eager_impl():
    return Compiled(FAMILY, "eager")


def test_every_block_is_rewritten_and_reported_with_the_family_facts(eager_impl):
    assert [r.spec.path for r in eager_impl.records] == PATHS
    assert all(r.rewritten for r in eager_impl.records), [r.outcome for r in eager_impl.records]
    for r in eager_impl.records:
        assert r.spec.form == "stacked-loop" and r.spec.num_experts == 4
        assert router_facts(r.spec) == ROUTER
        assert (r.spec.experts.ffn, r.spec.experts.weights) == ("swiglu", "stacked")
        assert r.spec.shared_experts == ('shared_expert', 'shared_expert_gate')
        assert list(r.spec.experts.layouts) == ['gate_up_proj [64, 16]', 'down_proj [16, 32]']


def test_one_graph_and_no_graph_break(eager_impl):
    assert (eager_impl.graphs, eager_impl.breaks) == (1, 0)


def test_logits_and_every_gradient_equal_eager(eager_impl):
    assert_pairs_close([("logits", eager_impl.out, eager_impl.ref), *eager_impl.grads()])


def test_grouped_mm_block_has_no_graph_break_and_equals_eager():
    records, pairs = block_fullgraph(FAMILY, "grouped_mm")
    assert len(records) == 1 and records[0].rewritten, [r.outcome for r in records]
    assert records[0].spec.form == "grouped_mm" and router_facts(records[0].spec) == ROUTER
    assert_pairs_close(pairs)

"""Mixtral (transformers 5.x) under backend="moecc": softmax over E, top-2, renormalised; SwiGLU experts stacked gate_up_proj [E, 2F, H] (gate then up) and down_proj [E, H, F].

Built from its config class at tiny size (tests/hf_zoo.py). The whole model is compiled in training mode with the
"eager" experts implementation (the loop that graph-breaks under stock torch.compile); the "grouped_mm"
implementation is checked on one block compiled alone with fullgraph=True.
"""
import pytest

from hf_zoo import (Compiled, Family, assert_blocks_report_family, assert_grouped_mm_block_equals_eager,
                    assert_pairs_close)

pytest.importorskip("transformers")

FAMILY = Family(name="mixtral", ffn="swiglu",
                router={'score': 'softmax', 'top_k': 2, 'score_after_topk': False, 'renormalize': True, 'selection_bias': False, 'router_bias': False, 'grouped': False, 'scale': False},
                layouts=tuple(['gate_up_proj [64, 16]', 'down_proj [16, 32]']))


@pytest.fixture(scope="module")
def eager_impl():
    return Compiled(FAMILY.name, "eager")


def test_every_block_is_rewritten_and_reported_with_the_family_facts(eager_impl):
    assert_blocks_report_family(eager_impl.records, FAMILY)


def test_one_graph_and_no_graph_break(eager_impl):
    assert (eager_impl.graphs, eager_impl.breaks) == (1, 0)


def test_logits_and_every_gradient_equal_eager(eager_impl):
    assert_pairs_close([("logits", eager_impl.out, eager_impl.ref), *eager_impl.grads()])


def test_grouped_mm_block_has_no_graph_break_and_equals_eager():
    assert_grouped_mm_block_equals_eager(FAMILY)

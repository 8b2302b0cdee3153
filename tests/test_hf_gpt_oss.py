"""GPT-OSS (transformers 5.x) under backend="moecc": router linear with a bias, top-k of the logits, softmax over the k; experts transposed [E, H, 2F] with biases, interleaved gate/up ([..., ::2]), clamped SwiGLU (up + 1) * gate * sigmoid(alpha * gate).

Built from its config class at tiny size (tests/hf_zoo.py). The whole model is compiled in training mode with the
"eager" experts implementation (the loop that graph-breaks under stock torch.compile); the "grouped_mm"
implementation is checked on one block compiled alone with fullgraph=True (and, marked slow, the whole model).
"""
import pytest

from hf_zoo import (Compiled, Family, assert_blocks_report_family, assert_grouped_mm_block_equals_eager,
                    assert_pairs_close, assert_whole_grouped_mm_model_equals_eager)

pytest.importorskip("transformers")

FAMILY = Family(name="gpt_oss", ffn="glu-sigmoid",
                router={'score': 'logits', 'top_k': 2, 'score_after_topk': True, 'renormalize': False, 'selection_bias': False, 'router_bias': True, 'grouped': False, 'scale': False},
                layouts=tuple(['gate_up_proj [16, 64]', 'gate_up_proj_bias [64]', 'down_proj [32, 16]', 'down_proj_bias [16]']))


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


@pytest.mark.slow
def test_whole_model_with_grouped_mm_experts_is_rewritten_and_equals_eager():
    assert_whole_grouped_mm_model_equals_eager(FAMILY)

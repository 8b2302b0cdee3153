"""HF "eager" experts under moecc (passes/hf_eager.py): the traceable equivalents equal HF's loops bit for bit,
they are chosen by the text of the forward, and they exist only while Dynamo traces a frame for moecc."""
import sys
import types

import hf_zoo
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo import trace_rules

from moecc.passes import hf_eager

transformers = pytest.importorskip("transformers")


def _experts(family):
    model, _ = hf_zoo.build(family, "eager")
    _, block = hf_zoo.moe_blocks(model)[0]
    return block.experts


def _routing(num_tokens, num_experts, top_k, gen):
    """Random distinct expert ids per token with expert ``num_experts - 1`` never chosen, and random weights."""
    ids = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:top_k] for _ in range(num_tokens)])
    return ids, torch.rand(num_tokens, top_k, generator=gen)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_equivalent_equals_the_eager_loop_bit_for_bit(family):
    experts = _experts(family)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, experts.gate_up_proj.shape[1 if family == "gpt_oss" else 2], generator=gen)
    ids, weights = _routing(11, experts.num_experts, 2, gen)
    traceable = hf_eager.experts_classes()[hf_eager.eager_forward(type(experts))]
    eager = hf_eager.eager_forward(type(experts))
    assert torch.equal(traceable(experts, x, ids, weights), eager(experts, x, ids, weights))


def test_switch_equivalent_equals_the_eager_loop_with_dropped_tokens():
    experts = _experts("switch")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 16, generator=gen)
    ids = torch.randint(0, 3, (9,), generator=gen)
    selected = torch.nn.functional.one_hot(ids, 4).view(9, 1, 4)
    selected[::3] = 0  # every third token past its expert's capacity
    weights = torch.rand(9, 1, generator=gen)
    original = hf_eager.eager_forward(type(experts))
    assert torch.equal(hf_eager.switch_forward(experts, x, selected, weights), original(experts, x, selected, weights))
    assert not hf_eager.switch_forward(experts, x, selected, weights)[::3].any()


def test_the_families_are_covered_by_their_forward_text():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    covered = hf_eager.experts_classes()
    for cls in (MixtralExperts, OlmoeExperts, DeepseekV2Experts):
        assert covered[hf_eager.eager_forward(cls)] is hf_eager.mixtral_template_forward
    assert covered[hf_eager.eager_forward(GptOssExperts)] is hf_eager.gpt_oss_forward
    assert covered[hf_eager.eager_forward(SwitchTransformersExperts)] is hf_eager.switch_forward


def test_an_experts_class_with_another_text_is_not_substituted():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    module = types.ModuleType("transformers.models.zz_changed.modeling_zz_changed")

    class ChangedExperts(MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states * 2  # not the Mixtral text: no equivalent applies

    ChangedExperts.__module__ = module.__name__
    module.ChangedExperts = ChangedExperts
    sys.modules[module.__name__] = module
    try:
        assert hf_eager.eager_forward(ChangedExperts) not in hf_eager.experts_classes()
    finally:
        del sys.modules[module.__name__]


def test_substitutions_exist_only_while_a_moecc_frame_is_traced():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    eager_forward = hf_eager.eager_forward(MixtralExperts)
    seen = []

    def probe(gm, example_inputs):
        seen.append((hf_eager.active(), trace_rules.is_polyfilled_callable(eager_forward)))
        return gm.forward

    probe._moecc_capture = True  # traced like a moecc frame
    dynamo.reset()
    torch.compile(lambda x: x + 1, backend=probe)(torch.randn(2))
    assert seen == [(True, True)]
    assert not hf_eager.active() and not trace_rules.is_polyfilled_callable(eager_forward)


def test_other_backends_still_break_on_the_eager_loop_after_a_moecc_compile():
    model, make_input = hf_zoo.build("mixtral", "eager")
    _, block = hf_zoo.moe_blocks(model)[0]
    x = torch.randn(2, 6, 16)
    dynamo.reset()
    torch.compile(block, backend="moecc", fullgraph=True)(x)  # one graph under moecc
    dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|dynamic shape|nonzero|graph break"):
        torch.compile(block, backend="eager", fullgraph=True)(x)

"""Form (c): transformers 5.x Mixtral with the grouped_mm and batched_mm experts implementations."""
import pytest
import torch
from conftest import assert_same_forward_backward, compile_and_records

transformers = pytest.importorskip("transformers")


def tiny_mixtral(impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    return MixtralForCausalLM(cfg)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens).logits


@pytest.fixture(scope="module", params=["grouped_mm", "batched_mm"])
def compiled_hf(request):
    model = Logits(tiny_mixtral(request.param))
    compiled, records = compile_and_records(model, torch.randint(0, 64, (2, 5)))
    return request.param, model, compiled, records


def test_both_layers_found_and_rewritten(compiled_hf):
    impl, _, _, records = compiled_hf
    assert [r.spec.path for r in records] == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    assert all(r.rewritten for r in records), [r.outcome for r in records]
    spec = records[0].spec
    assert spec.form == impl
    assert (spec.num_experts, spec.router.top_k, spec.router.score, spec.router.renormalize) == (4, 2, "softmax", True)
    assert spec.experts.ffn == "swiglu" and spec.experts.weights == "stacked"


def test_forward_and_backward_equal_eager(compiled_hf):
    _, model, compiled, _ = compiled_hf
    assert_same_forward_backward(model, compiled, torch.randint(0, 64, (2, 5)), atol=1e-5, rtol=1e-4)

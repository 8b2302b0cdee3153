"""backend="moecc" on every MoE form of issue 2: the block is rewritten, and the compiled model equals eager."""
import moe_zoo as zoo
import pytest
import torch
from conftest import assert_same_forward_backward, compile_and_records

from moecc.backends import kernels_cpu

FORMS = {
    "loop": (lambda: zoo.LoopMoE(), lambda: torch.randn(2, 5, 16), "loop"),
    "loop-gelu-top1": (lambda: zoo.LoopMoE(expert_cls=zoo.GeluExpert, top_k=1), lambda: torch.randn(3, 4, 16), "loop"),
    "stacked-loop": (lambda: zoo.StackedLoopMoE(), lambda: torch.randn(10, 16), "stacked-loop"),
    "dense-masked": (lambda: zoo.DenseMaskedMoE(), lambda: torch.randn(2, 5, 16), "dense-masked"),
    "sorted-histc": (lambda: zoo.SortedMoE(counts="histc"), lambda: torch.randn(10, 16), "sorted"),
    "sorted-bincount": (lambda: zoo.SortedMoE(counts="bincount"), lambda: torch.randn(10, 16), "sorted"),
}


@pytest.fixture(scope="module", params=sorted(FORMS))
def compiled_form(request):
    make_model, make_input, form = FORMS[request.param]
    model = make_model()
    compiled, records = compile_and_records(model, make_input())
    return model, compiled, records, make_input, form


def test_block_is_found_with_its_form_and_rewritten(compiled_form):
    _, _, records, _, form = compiled_form
    assert len(records) == 1
    assert records[0].spec.form == form
    assert records[0].outcome == "rewritten"
    assert records[0].spec.num_experts == 4


def test_forward_and_backward_equal_eager(compiled_form):
    model, compiled, _, make_input, _ = compiled_form
    assert_same_forward_backward(model, compiled, make_input())


# Bias-free FFNs run as one fused op; the others (biases here) as grouped GEMMs plus the user's elementwise ops.
FUSED = {"loop": "fused glu-silu", "stacked-loop": "fused glu-silu", "sorted-histc": "fused glu-silu",
         "sorted-bincount": "fused glu-silu", "loop-gelu-top1": "grouped GEMM", "dense-masked": "grouped GEMM"}


def test_block_reports_how_its_experts_run(compiled_form, request):
    _, _, records, _, _ = compiled_form
    assert records[0].kernel == FUSED[request.node.callspec.params["compiled_form"]]


def test_compiled_model_runs_the_reported_expert_kernel(compiled_form, monkeypatch):
    from moecc.backends import expert_ffn_cpu

    model, compiled, records, make_input, _ = compiled_form
    with torch.no_grad():
        compiled(make_input())  # compiles the inference graph (its checks call the kernels too)
    calls = {"grouped": 0, "fused": 0}
    grouped, fused = kernels_cpu.grouped_mm, expert_ffn_cpu.expert_ffn
    monkeypatch.setattr(kernels_cpu, "grouped_mm", lambda *a: calls.__setitem__("grouped", calls["grouped"] + 1)
                        or grouped(*a))
    monkeypatch.setattr(expert_ffn_cpu, "expert_ffn", lambda *a: calls.__setitem__("fused", calls["fused"] + 1)
                        or fused(*a))
    with torch.no_grad():
        compiled(make_input())
    if records[0].kernel.startswith("fused"):
        assert calls == {"grouped": 0, "fused": 1}
    else:
        assert calls["fused"] == 0 and calls["grouped"] >= 2  # at least an up and a down projection


def test_router_spec_is_read_from_the_graph():
    _, records = compile_and_records(zoo.LoopMoE(renormalize=True), torch.randn(1, 3, 16))
    router = records[0].spec.router
    assert (router.score, router.top_k, router.renormalize) == ("softmax", 2, True)
    _, records = compile_and_records(zoo.DenseMaskedMoE(), torch.randn(1, 3, 16))
    router = records[0].spec.router
    assert (router.score, router.renormalize) == ("sigmoid", False)
    assert records[0].spec.experts.ffn == "mlp-gelu"


class TestShapesAndLoads:
    """One compiled loop model, fed token counts and routings that stress the dispatch."""

    @pytest.fixture(scope="class")
    def model_and_compiled(self):
        model = zoo.LoopMoE(top_k=1)
        compiled, records = compile_and_records(model, torch.randn(2, 6, 16))
        assert records[-1].rewritten
        return model, compiled

    def test_one_token(self, model_and_compiled):
        assert_same_forward_backward(*model_and_compiled, torch.randn(1, 1, 16))

    def test_other_token_counts(self, model_and_compiled):
        for shape in [(1, 7, 16), (3, 5, 16)]:
            assert_same_forward_backward(*model_and_compiled, torch.randn(shape))

    def test_all_tokens_on_one_expert_and_others_empty(self, model_and_compiled):
        model, compiled = model_and_compiled
        with torch.no_grad():
            gate = model.router.gate.weight
            saved = gate.clone()
            gate.zero_()
            gate[2] = 1.0
        try:
            x = torch.rand(2, 6, 16) + 0.1  # positive inputs: expert 2's logit wins for every token
            assert (model.router(x.view(-1, 16))[2] == 2).all()
            assert_same_forward_backward(model, compiled, x)
        finally:
            with torch.no_grad():
                gate.copy_(saved)


def test_experts_without_tokens_get_zero_gradients():
    model = zoo.LoopMoE(top_k=2)
    compiled, _ = compile_and_records(model, torch.randn(1, 4, 16))
    with torch.no_grad():
        model.router.gate.weight.zero_()
        model.router.gate.weight[0] = 1.0
        model.router.gate.weight[1] = 0.5
    x = torch.rand(1, 4, 16) + 0.1  # experts 0 and 1 win everywhere; 2 and 3 receive nothing
    compiled(x).__getitem__(0).sum().backward()
    assert model.experts[0].w1.weight.grad.abs().sum() > 0
    for e in (2, 3):
        assert model.experts[e].w1.weight.grad is None or not model.experts[e].w1.weight.grad.abs().any()

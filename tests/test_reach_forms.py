"""Issue 13, item 1: the same MoE block spelled other ways is found, rewritten, runs moecc's ops, and equals eager.

Spellings: ``torch._grouped_mm`` over stacked [E, F, D] weights with argsort dispatch and offsets from the cumsum
of histc / bincount / one-hot counts, combined by ``scatter_add`` or ``index_add``; dense-masked top-1 chosen with
``max`` or ``argmax`` instead of ``topk``; a per-expert loop combined by ``scatter_add_`` or ``index_put_``.
"""
import moe_zoo as zoo
import pytest
import torch
from conftest import assert_same_forward_backward, compile_and_records

BF16 = dict(atol=3e-2, rtol=3e-2)  # the grouped GEMMs run in bf16, in eager as in the compiled graph
FP32 = dict(atol=1e-5, rtol=1e-4)

SPELLINGS = {
    "grouped_mm-histc-scatter_add": (lambda: zoo.GroupedMMMoE(counts="histc"), (10, 16), "grouped_mm", BF16),
    "grouped_mm-bincount-index_add": (lambda: zoo.GroupedMMMoE(counts="bincount", combine="index_add"), (10, 16),
                                      "grouped_mm", BF16),
    "grouped_mm-onehot-scatter_add": (lambda: zoo.GroupedMMMoE(counts="onehot"), (10, 16), "grouped_mm", BF16),
    "dense-max": (lambda: zoo.DenseArgmaxMoE(select="max"), (10, 16), "dense-masked", FP32),
    "dense-argmax": (lambda: zoo.DenseArgmaxMoE(select="argmax"), (10, 16), "dense-masked", FP32),
    "loop-scatter_add": (lambda: zoo.LoopCombineMoE(combine="scatter_add"), (2, 5, 16), "loop", FP32),
    "loop-index_put": (lambda: zoo.LoopCombineMoE(combine="index_put"), (2, 5, 16), "loop", FP32),
}


@pytest.fixture(scope="module", params=sorted(SPELLINGS))
def spelled(request):
    make_model, shape, form, tol = SPELLINGS[request.param]
    model = make_model()
    compiled, records = compile_and_records(model, torch.randn(shape))
    return model, compiled, records, shape, form, tol


def moecc_ops_run(compiled, *args) -> set[str]:
    """The moecc custom ops one forward of ``compiled`` calls (read off the profiler, so Inductor's kernels count)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled(*args)
    return {e.name for e in prof.events() if e.name.startswith("moecc::")}


def test_block_found_with_its_form_and_rewritten(spelled):
    _, _, records, _, form, _ = spelled
    assert [(r.spec.form, r.outcome, r.spec.num_experts) for r in records] == [(form, "rewritten", 4)]


def test_forward_and_backward_equal_eager(spelled):
    model, compiled, _, shape, _, tol = spelled
    assert_same_forward_backward(model, compiled, torch.randn(shape), **tol)


def test_compiled_forward_runs_moecc_ops(spelled):
    _, compiled, _, shape, _, _ = spelled
    ran = moecc_ops_run(compiled, torch.randn(shape))
    assert "moecc::sort_by_slot" in ran
    assert ran & {"moecc::grouped_mm", "moecc::expert_ffn"}


def test_max_selection_is_read_as_top1():
    _, records = compile_and_records(zoo.DenseArgmaxMoE(select="max"), torch.randn(6, 16))
    assert (records[0].spec.router.top_k, records[0].spec.router.score) == (1, "softmax")


def test_grouped_mm_weights_are_read_through_their_bf16_cast():
    _, records = compile_and_records(zoo.GroupedMMMoE(), torch.randn(6, 16))
    assert records[0].kernel == "grouped GEMM"  # the fused op reads weights as stored: not for a cast
    assert records[0].spec.experts.params == ("w1_EFD", "w3_EFD", "w2_EDF")


def test_near_uniform_router_gets_its_weights_in_token_order():
    """Weights permuted into expert order (``weights_TK.view(-1)[order_N]``) are not the [tokens, k] weights: with
    near-uniform scores they pass a forward probe, and the gate's gradient tells them apart."""
    model = zoo.GroupedMMMoE()
    with torch.no_grad():
        model.gate.weight.mul_(1e-3)
    compiled, records = compile_and_records(model, torch.randn(10, 16))
    assert records[0].rewritten, records[0].outcome
    x = torch.randn(10, 16)
    cot = torch.randn(10, 16)
    (g_ref,) = torch.autograd.grad((model(x) * cot).sum(), [model.gate.weight])
    (g_out,) = torch.autograd.grad((compiled(x) * cot).sum(), [model.gate.weight])
    assert float((g_out - g_ref).norm()) <= 3e-2 * float(g_ref.norm())

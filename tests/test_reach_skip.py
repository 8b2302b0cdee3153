"""Issue 13, item 3: ``if t_idx.numel() == 0: continue`` in the expert loop is the same block: one graph, rewritten,
equal to eager, also when experts receive no rows."""
import moe_zoo as zoo
import pytest
import torch
from conftest import assert_same_forward_backward, compile_and_records

import moecc
from moecc.passes import empty_skip


@pytest.fixture(scope="module")
def skipping():
    model = zoo.LoopCombineMoE(combine="scatter_add", skip_empty=True)
    before = len(empty_skip.decided)
    compiled, records = compile_and_records(model, torch.randn(2, 5, 16))
    return model, compiled, records, empty_skip.decided[before:]


def test_one_graph_and_the_block_is_rewritten(skipping):
    model, _, records, _ = skipping
    assert moecc.session(model).graphs == 1
    assert [(r.spec.form, r.outcome) for r in records] == [("loop", "rewritten")]


def test_each_experts_skip_test_was_decided_as_not_empty(skipping):
    *_, decided = skipping
    assert len(decided) == 4 and all(d.startswith("Eq(") and d.endswith(", 0)") for d in decided)


def test_forward_and_backward_equal_eager(skipping):
    model, compiled, _, _ = skipping
    assert_same_forward_backward(model, compiled, torch.randn(3, 4, 16))


def test_equal_eager_when_experts_get_no_rows(skipping):
    model, compiled, _, _ = skipping
    saved = model.router.gate.weight.detach().clone()
    try:
        with torch.no_grad():
            model.router.gate.weight.zero_()
            model.router.gate.weight[1] = 1.0
            model.router.gate.weight[3] = 0.5
        x = torch.rand(2, 5, 16) + 0.1  # experts 1 and 3 win for every token; 0 and 2 are skipped in eager
        assert set(model.router(x.view(-1, 16))[2].unique().tolist()) == {1, 3}
        assert_same_forward_backward(model, compiled, x)
    finally:
        with torch.no_grad():
            model.router.gate.weight.copy_(saved)


def test_the_rule_is_scoped_to_moeccs_traces(skipping):
    from torch._dynamo.variables.tensor import SymNodeVariable

    assert SymNodeVariable.evaluate_expr is not empty_skip._evaluate_expr


def test_only_tests_of_a_size_against_zero_are_decided():
    import sympy
    from torch.utils._sympy.symbol import SymT, make_symbol

    u, v = make_symbol(SymT.UNBACKED_INT, 0, integer=True), make_symbol(SymT.UNBACKED_INT, 1, integer=True)
    assert empty_skip._nonempty_answer(sympy.Eq(u, 0)) is False
    assert empty_skip._nonempty_answer(sympy.Eq(2 * u, 0)) is False
    assert empty_skip._nonempty_answer(sympy.Ne(u, 0)) is True
    assert empty_skip._nonempty_answer(sympy.Gt(u, 0)) is True
    assert empty_skip._nonempty_answer(sympy.Eq(u, 3)) is None  # a real data-dependent branch
    assert empty_skip._nonempty_answer(sympy.Eq(u - v, 0)) is None  # two sizes may well be equal

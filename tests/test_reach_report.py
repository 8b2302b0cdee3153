"""Issue 13, item 6: a selection over E scores that moecc does not rewrite still has a report row, with the module
path and the step that failed; ``moecc.explain`` prints the same without Inductor."""
import io

import moe_zoo as zoo
import pytest
import torch
from conftest import compile_and_records

import moecc


def rendered(report) -> str:
    """The report's table on one line per row (rich folds long cells at the console width)."""
    from rich.console import Console

    console = Console(width=4000, file=io.StringIO())
    console.print(report.table())
    return console.file.getvalue()


@pytest.fixture(scope="module")
def crosstalk():
    model = zoo.CrossTalkMoE()
    return model, compile_and_records(model, torch.randn(2, 5, 16))[1]


def test_expert_reading_another_experts_output_falls_back_with_the_reason(crosstalk):
    _, records = crosstalk
    assert len(records) == 1 and not records[0].rewritten
    assert "expert 1's input rows depend on expert 0's output" in records[0].outcome


def test_fallback_row_is_in_the_report(crosstalk):
    model, _ = crosstalk
    text = rendered(moecc.report(model))
    assert "expert 1's input rows depend on expert 0's output" in text and "E=4" in text


@pytest.fixture(scope="module")
def gshard():
    model = zoo.GShardEinsumMoE()
    return model, compile_and_records(model, torch.randn(12, 16))


def test_einsum_capacity_block_is_a_near_miss_naming_router_and_weights(gshard):
    _, (_, records) = gshard
    assert len(records) == 1
    outcome = records[0].outcome
    assert outcome.startswith("not rewritten: router found at <root> (softmax, top-1 of 4); experts not recognised")
    assert "wi_EDF [4, 16, 32] is read by `einsum`" in outcome and "moecc.capacity_factor" in outcome


def test_near_miss_leaves_the_model_as_it_was(gshard):
    model, (compiled, _) = gshard
    x = torch.randn(12, 16)
    torch.testing.assert_close(compiled(x), model(x))


def test_router_whose_experts_are_in_another_graph_is_reported():
    _, records = compile_and_records(zoo.BrokenRouterMoE(), torch.randn(2, 5, 16))
    assert [r.spec.path for r in records] == ["router"]
    assert "the experts may run in another graph" in records[0].outcome


def test_topk_without_anything_moe_has_no_row():
    class Sampler(torch.nn.Module):  # top-k over a vocabulary head: not a router
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 64)

        def forward(self, h):
            return torch.topk(self.head(h), 5, dim=-1).values

    model = Sampler()
    _, records = compile_and_records(model, torch.randn(3, 16))
    assert records == []


def test_explain_reports_without_compiling_or_filing_a_session(capsys):
    model = zoo.GroupedMMMoE()
    found = moecc.explain(model, torch.randn(6, 16))
    assert [(b.spec.form, b.outcome) for b in found.blocks] == [("grouped_mm", "rewritten")]
    assert found.graphs == 1 and found.graph_breaks == []
    assert capsys.readouterr().out.startswith("moecc.explain: 1 graph, 0 graph breaks")
    assert "grouped_mm" in rendered(found.report)
    with pytest.raises(ValueError, match="no graph of this GroupedMMMoE has been compiled"):
        moecc.session(model)


def test_explain_shows_near_misses_and_graph_breaks():
    found = moecc.explain(zoo.BrokenRouterMoE(), torch.randn(2, 5, 16), quiet=True)
    assert found.graphs >= 2 and found.graph_breaks
    assert [b.outcome.split(":")[0] for b in found.blocks] == ["not rewritten"]

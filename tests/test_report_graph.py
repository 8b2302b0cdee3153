"""The report's graph view (issue 14): each block's nodes before and after the rewrite, stage by stage; a fallback's
region with the node where matching stopped; the HTML export with every section; the same text for the same model.

Each model compiles once per module (module-scoped fixtures); shapes are tiny.
"""
import copy
import re

import moe_zoo
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_and_records
from torch import nn

import moecc
from moecc.report import LayerTiming, Report, render_text


class ScaledExpert(nn.Module):
    """A SwiGLU expert whose hidden layer is scaled by a value computed outside it: an expert that reads more than
    its input rows, which moecc refuses (the value is not row-wise)."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, scale):
        return self.w2(F.silu(self.w1(x)) * self.w3(x) * scale)


class ScaledMoE(moe_zoo.LoopMoE):
    def __init__(self):
        super().__init__(expert_cls=ScaledExpert)

    def forward(self, hidden_BSD):
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.view(-1, D)
        logits_TE, weights_TK, experts_TK = self.router(x_TD)
        scale = torch.sigmoid(x_TD.mean())  # one value for every token: not a row of the expert's input
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(experts_TK, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            k_idx, t_idx = torch.where(mask_EKT[e])
            out_TD.index_add_(0, t_idx, self.experts[e](x_TD[t_idx], scale) * weights_TK[t_idx, k_idx, None])
        return out_TD.view(B, S, D), logits_TE


class ThreeBlocks(nn.Module):
    """One block moecc rewrites, one it falls back on without a node to blame (misrouted), one whose reason names
    the node where matching stopped (the expert reads ``scale``)."""

    def __init__(self):
        super().__init__()
        self.good, self.misrouted, self.scaled = moe_zoo.LoopMoE(), moe_zoo.MisroutedMoE(), ScaledMoE()

    def forward(self, x_BSD):
        for moe in (self.good, self.misrouted, self.scaled):
            x_BSD = x_BSD + moe(x_BSD)[0]
        return x_BSD


class DropoutExpert(moe_zoo.SwiGLUExpert):
    """Dropout on the hidden layer, on while training: the block draws random numbers, so moecc cannot check a
    rewrite of it."""

    def forward(self, x):
        return self.w2(F.dropout(F.silu(self.w1(x)) * self.w3(x), p=0.5, training=self.training))


def _views(blocks) -> dict:
    return {b.spec.path: b.view for b in blocks}


def _targets(nodes, status=None) -> list[str]:
    return [n.target for n in nodes if status is None or n.status == status]


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo_cache_after():
    """Leave no compiled graph behind: a later test compiling the same model class must trace it again."""
    yield
    import torch

    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny():
    """Two fused blocks (the demo's shape of model): the model and its report rows."""
    torch.manual_seed(0)
    model = moe_zoo.TinyTransformer(layers=2)
    _, blocks = compile_and_records(model, torch.randint(0, 64, (1, 4)))
    return model, blocks


@pytest.fixture(scope="module")
def lifted():
    """One block with the lifted template (grouped GEMMs instead of the fused op)."""
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE()
    torch._dynamo.reset()
    torch.compile(model, backend="moecc", options={"moecc.fused_ffn": False})(torch.randn(1, 4, 16))
    return moecc.session(model).blocks


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = ThreeBlocks()
    _, blocks = compile_and_records(model, torch.randn(1, 4, 16))
    return model, blocks


def test_rewritten_block_names_the_moecc_ops_and_the_ops_they_replaced(tiny):
    _, blocks = tiny
    view = _views(blocks)["moes.0"]
    assert view.rewritten and not view.error
    experts, dispatch, combine = view.stage("experts"), view.stage("dispatch"), view.stage("combine")
    assert _targets(experts.after, "added") == ["moecc::expert_ffn"]  # 4 experts x SwiGLU became one op
    assert _targets(experts.before, "removed").count("linear") == 4 * 3
    assert "moecc::sort_by_slot" in _targets(dispatch.after, "added")
    assert _targets(dispatch.before, "removed").count("where") == 4  # the per-expert torch.where
    assert _targets(combine.before, "removed").count("index_add_") == 4
    # The fused op's output: one row per token (1 x 4 tokens, d=16), fp32.
    assert [n.value for n in experts.after] == ["[4, 16] f32"]
    assert view.nodes_after < view.nodes_before
    text = render_text(Report(blocks).block("moes.0"))
    for name in ("moecc::expert_ffn", "moecc::sort_by_slot", "index_add_", "where", "router", "combine"):
        assert name in text, name
    assert f"nodes {view.nodes_before} -> {view.nodes_after}" in text


def test_the_router_is_kept_node_for_node(tiny):
    router = _views(tiny[1])["moes.0"].stage("router")
    assert _targets(router.before) == _targets(router.after)
    assert {"linear", "softmax", "topk"} <= set(_targets(router.before))
    assert {n.status for n in router.before + router.after} == {"kept"}


def test_lifted_block_shows_one_grouped_gemm_per_expert_weight(lifted):
    [view] = _views(lifted).values()
    experts = view.stage("experts").after
    grouped = [n for n in experts if n.target == "moecc::grouped_mm"]
    # w1 and w3 [16 -> 32], w2 [32 -> 16] over the 4 tokens x top-2 = 8 routed rows.
    assert [n.value for n in grouped] == ["[8, 32] f32", "[8, 32] f32", "[8, 16] f32"]
    assert "silu" in _targets(experts, "added")  # the template's elementwise ops are copied for Inductor
    assert "moecc::gather_tokens" in _targets(view.stage("dispatch").after)
    assert "moecc::permute_rows" in _targets(view.stage("combine").after)


@pytest.fixture(scope="module")
def dynamic():
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE()
    torch._dynamo.reset()
    torch.compile(model, backend="moecc", dynamic=True)(torch.randn(1, 5, 16))
    return moecc.session(model).blocks


def test_dynamic_sizes_read_the_same_in_both_columns(dynamic):
    [view] = _views(dynamic).values()
    logits = view.stage("router").before[0]
    tokens = re.fullmatch(r"\[(s\d+), 4\] f32", logits.value).group(1)  # [T, E], T symbolic
    added = {n.value for s in view.stages for n in s.after if n.status == "added"}
    # The rewrite's tokens and routed rows (T x top-2) are Dynamo's symbol, not the example's 5 and 10.
    assert f"[{tokens}, 16] f32" in added and f"[2*{tokens}] i64" in added
    assert not any(re.search(r"\b(5|10)\b", v) for v in added)


def test_fallback_marks_the_node_where_matching_stopped(mixed):
    _, blocks = mixed
    view = _views(blocks)["scaled"]
    assert not view.rewritten and "reads 2 values besides its weights" in view.reason
    marked = [n for s in view.stages for n in s.before if n.stopped]
    # The expert reads ``scale`` (a sigmoid of the mean of all tokens) and its rows: both are named.
    assert sorted(n.target for n in marked) == ["getitem", "sigmoid"]
    assert all(n.name in view.reason for n in marked)
    text = render_text(Report(blocks).block("scaled"))
    stopped_lines = [line for line in text.splitlines() if "<- stopped here" in line]
    assert len(stopped_lines) == 2 and any("sigmoid" in line for line in stopped_lines)
    assert "why: " in text and "where matching stopped: " + ", ".join(view.stopped) in text


@pytest.fixture(scope="module")
def noisy():
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE(expert_cls=DropoutExpert).train()
    _, blocks = compile_and_records(model, torch.randn(1, 4, 16))
    return blocks


def test_fallback_on_a_random_op_marks_that_op(noisy):
    [view] = _views(noisy).values()
    assert not view.rewritten and "random numbers (dropout" in view.reason
    marked = [n for s in view.stages for n in s.before if n.stopped]
    assert [n.target for n in marked] == ["dropout"] * 4  # one per expert, and nothing else
    assert all(s.name == "experts" for s in view.stages for n in s.before if n.stopped)


def test_fallback_without_a_named_node_shows_the_whole_region(mixed):
    _, blocks = mixed
    view = _views(blocks)["misrouted"]
    assert not view.rewritten and view.stopped == ()
    assert view.nodes_after == view.nodes_before
    assert _targets(view.stage("experts").before).count("linear") == 4 * 3
    assert {n.status for s in view.stages for n in s.before} == {"kept"}  # nothing of a fallback is changed
    text = render_text(Report(blocks).block("misrouted"))
    assert "the whole region stays" in text and "rewritten (" not in text


def test_other_blocks_of_a_graph_with_fallbacks_are_still_shown_rewritten(mixed):
    view = _views(mixed[1])["good"]
    assert view.rewritten and _targets(view.stage("experts").after, "added") == ["moecc::expert_ffn"]


def test_html_export_folds_every_block_in_its_own_section(mixed, tmp_path):
    _, blocks = mixed
    path = tmp_path / "report.html"
    Report(blocks).save_html(str(path))  # detail="summary": the HTML has every section all the same
    page = path.read_text()
    summaries = re.findall(r"<summary>(.*?)</summary>", page)
    assert len(summaries) == 1 + len(blocks) == 4
    assert page.count("<details open>") == 1  # the summary unfolded, the blocks folded
    for block, title in zip(blocks, summaries[1:]):
        assert title.startswith(block.spec.path)
    assert "moecc::expert_ffn" in page and "stopped here" in page and "the whole region stays" in page


def test_graph_detail_prints_the_summary_then_every_block(tiny):
    model, blocks = tiny
    text = str(moecc.report(model, detail="graph"))
    assert text.index("moecc: MoE blocks") < text.index("moes.0 (") < text.index("moes.1 (")
    assert "moes.0 (" not in str(moecc.report(model))  # the summary stays one table


def test_the_same_model_compiled_twice_gives_the_same_report(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    again = moe_zoo.TinyTransformer(layers=2)
    compile_and_records(again, torch.randint(0, 64, (1, 4)))
    first, second = str(moecc.report(model, detail="graph")), str(moecc.report(again, detail="graph"))
    assert first == second
    assert not re.search(r"0x[0-9a-f]{6,}", first)  # no addresses
    assert " ms" not in first and "check" not in first  # no timings unless asked


def test_timings_only_when_asked(tiny):
    model, _ = tiny
    assert "check" in str(moecc.report(model, timings=True))
    with pytest.raises(ValueError, match="detail"):
        moecc.report(model, detail="everything")


def test_block_by_path_names_the_known_blocks_when_missing(tiny):
    with pytest.raises(KeyError, match="moes.0, moes.1"):
        moecc.report(tiny[0]).block("moes.7")


class _TwoRanks:
    """What a block's strategy under expert parallelism tells the report (``ExpertParallelDispatch.describe``)."""

    def describe(self) -> str:
        return "rank 0: [0, 2]; rank 1: [1, 3]"


def test_plan_shows_experts_and_rows_per_rank_and_predicted_against_measured(tiny):
    block = copy.copy(tiny[1][0])
    block.dispatch, block.send_rows = _TwoRanks(), [5, 3]
    rep = Report([block], timings=[LayerTiming(block="moes.0", predicted_s=2e-3, measured_s=3e-3, source="timer")])
    plan = render_text(rep.block("moes.0"))
    assert re.search(r"│ 0\s+│ \[0, 2\]\s+│ 5\s+│", plan) and re.search(r"│ 1\s+│ \[1, 3\]\s+│ 3\s+│", plan)
    summary = str(rep)
    assert "predicted vs measured" in summary
    assert re.search(r"2\.00 ms\s+│ 3\.00 ms\s+│ 1\.50\s+│ timer", summary)
    assert "predicted vs measured" not in str(Report([block]))  # nothing recorded, nothing shown


def test_a_view_that_cannot_be_built_costs_no_compile_and_the_report_says_why(tiny, monkeypatch):
    from moecc.passes import graph_view
    from moecc.passes.detect import Block

    def broken(gm, block):
        raise RuntimeError("no stages today")

    monkeypatch.setattr(graph_view, "original_stages", broken)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    block = Block(spec=tiny[1][0].spec, topk=None, indices=None, x=None)
    view = graph_view.block_view(gm, block, gm, "rewritten", {})
    assert view.error == "RuntimeError: no stages today" and view.stages == ()
    result = copy.copy(tiny[1][0])
    result.view = view
    text = str(Report([result]).block("moes.0"))
    assert "the graph view could not be built: RuntimeError: no stages today" in text
    assert str(Report([result])).count("moes.0") == 1  # the summary still lists the block, without node counts

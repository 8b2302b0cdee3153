"""The backend as users meet it: registration, training, state, fallbacks, models without MoE, the report."""
import copy
import os
import subprocess
import sys

import moe_zoo as zoo
import pytest
import torch
import torch._dynamo as dynamo
from conftest import assert_same_forward_backward, compile_and_records

import moecc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_found_by_name_without_importing_moecc():
    code = ("import torch, sys; sys.path.insert(0, 'tests'); import moe_zoo as z; m = z.LoopMoE(); "
            "x = torch.randn(1, 3, 16);"
            "y = torch.compile(m, backend='moecc')(x)[0]; assert torch.allclose(y, m(x)[0], atol=1e-5);"
            "assert 'moecc' not in sys.modules or 'moecc.backend' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_register_is_idempotent_after_import():
    moecc.register()
    moecc.register()
    assert "moecc" in dynamo.list_backends()


def test_capture_flags_are_scoped_to_moecc_compiles():
    compile_and_records(zoo.LoopMoE(), torch.randn(1, 3, 16))
    assert dynamo.config.capture_scalar_outputs is False
    assert dynamo.config.capture_dynamic_output_shape_ops is False
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        return x * x.sum().item()

    dynamo.reset()
    torch.compile(f, backend=counting_backend)(torch.randn(4))
    assert len(graphs) == 2  # .item() still breaks the graph for other backends


@pytest.fixture(scope="module")
def trained_pair():
    """A two-block model trained five AdamW steps compiled with moecc, and an eager twin trained alike."""
    model = zoo.TinyTransformer()
    twin = copy.deepcopy(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="moecc")
    opt, opt_twin = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin))
    losses = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        tokens = torch.randint(0, 64, (2, 6), generator=gen)
        for m, o in ((compiled, opt), (twin, opt_twin)):
            loss = torch.nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss.item())
    return model, twin, state_before, losses


def test_five_optimizer_steps_give_eager_parameters(trained_pair):
    model, twin, _, losses = trained_pair
    assert losses[0::2] == pytest.approx(losses[1::2], rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_state_dict_keys_unchanged_and_values_are_the_trained_ones(trained_pair):
    model, twin, state_before, _ = trained_pair
    assert list(model.state_dict()) == list(state_before)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, twin.state_dict()[k], atol=1e-5, rtol=1e-4)


def test_model_without_moe_matches_stock_inductor():
    model = zoo.DenseMLP()
    x = torch.randn(3, 5, 16)
    ours = torch.compile(model, backend="moecc")(x)
    stock = torch.compile(copy.deepcopy(model), backend="inductor")(x)
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=1e-6)
    assert moecc.report(model).blocks == []


def test_malformed_block_falls_back_with_a_reason_and_stays_correct():
    model = zoo.MisroutedMoE()
    compiled, records = compile_and_records(model, torch.randn(1, 4, 16))
    assert len(records) == 1
    # Expert e reads the rows routed to expert e + 1: no value of the block is what slot form computes.
    assert records[0].outcome.startswith("fallback: the slot-form computation does not reproduce any value")
    assert_same_forward_backward(model, compiled, torch.randn(1, 4, 16))


def test_shared_expert_outside_the_block_stays_dense_and_correct():
    model = zoo.SharedExpertMoE()
    compiled, records = compile_and_records(model, torch.randn(2, 3, 16))
    assert [r.spec.path for r in records] == ["moe"] and records[0].rewritten
    assert_same_forward_backward(model, compiled, torch.randn(2, 3, 16))


def test_report_renders_a_table_with_paths_and_outcomes():
    compile_and_records(zoo.TinyTransformer(), torch.randint(0, 64, (1, 4)))
    text = str(moecc.report())
    assert "moes.0" in text and "moes.1" in text and "rewritten" in text
    assert "softmax" in text


class MixedModel(torch.nn.Module):
    """A well-formed MoE block followed by a misrouted one: only the first may be rewritten."""

    def __init__(self):
        super().__init__()
        self.good, self.bad = zoo.LoopMoE(), zoo.MisroutedMoE()

    def forward(self, x):
        return self.bad(self.good(x)[0])[0]


def test_several_blocks_are_checked_once_together(monkeypatch):
    from moecc.passes import moe_pass

    calls = []
    real = moe_pass.check_equivalent
    monkeypatch.setattr(moe_pass, "check_equivalent", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = zoo.TinyTransformer(layers=3)
    compiled, records = compile_and_records(model, torch.randint(0, 64, (1, 5)))
    assert [r.outcome for r in records] == ["rewritten"] * 3
    assert len(calls) == 1  # one check of the whole graph instead of one per block
    assert_same_forward_backward(model, compiled, torch.randint(0, 64, (2, 3)))


def test_a_bad_block_among_good_ones_falls_back_alone():
    model = MixedModel()
    compiled, records = compile_and_records(model, torch.randn(1, 6, 16))
    assert [r.spec.path for r in records] == ["good", "bad"]
    assert records[0].outcome == "rewritten" and records[1].outcome.startswith("fallback")
    assert_same_forward_backward(model, compiled, torch.randn(1, 6, 16))


def test_the_rewrite_check_reads_weights_in_place_and_copies_an_input_a_graph_writes():
    """The check aliases parameters (no copy of every weight per run) but copies one that a graph writes."""
    from moecc.passes import validate

    def reads(w, x):
        return x @ w

    def writes(w, x):
        w.mul_(2)
        return x @ w

    w, x = torch.nn.Parameter(torch.ones(3, 3)), torch.randn(2, 3)
    assert validate._aliased([w, x], torch.fx.symbolic_trace(reads)) == {0}
    graph = torch.fx.symbolic_trace(writes)
    assert validate._aliased([w, x], graph) == set()
    with torch.no_grad():
        assert validate.check_equivalent(graph, graph, [w, x]) is None
    assert torch.equal(w, torch.ones(3, 3)), "the check changed the user's parameter"


def test_the_rewrite_check_compares_gradients_a_bounded_group_at_a_time(monkeypatch):
    """With a 1-byte budget every weight's gradient is its own backward: equal graphs still pass, and a graph
    whose gradient differs only for the last weight is still caught, naming that input."""
    from moecc.passes import validate

    def ref(w1, w2, x):
        return (x @ w1) @ w2

    def wrong(w1, w2, x):  # same output, but w2's gradient is scaled by 2
        return (x @ w1) @ (w2 + (w2 - w2.detach()))

    w1, w2 = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    assert validate.grad_groups([w1, w2, x], 64) == [[0], [1], [2]]
    assert validate.grad_groups([w1, w2, x], 1 << 20) == [[0, 1, 2]]
    monkeypatch.setenv("MOECC_CHECK_GRAD_BYTES", "1")
    same, bad = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(wrong)
    assert validate.check_equivalent(same, same, [w1, w2, x]) is None
    assert validate.check_equivalent(same, bad, [w1, w2, x]).startswith("gradient of input 1 differs")

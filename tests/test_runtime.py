"""The runtime on one process: load monitor, placement decisions, switches that never recompile, the switch log."""
import copy

import moe_zoo as zoo
import pytest
import torch
from torch._dynamo.utils import counters

import moecc
from moecc import runtime
from moecc.backends.ep import placement_from_lists
from moecc.costmodel.placement import SlotLayout


@pytest.fixture(scope="module")
def trained_with_switches():
    """20 AdamW steps with a (forced) switch every 3 steps, beside an eager twin without switches."""
    model = zoo.LoopMoE()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="moecc")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    gen = torch.Generator().manual_seed(5)
    losses, routed = [[], []], torch.zeros(4)
    graphs = None
    for step in range(20):
        x = torch.randn(2, 5, 16, generator=gen)
        routed += torch.bincount(model.router(x.view(-1, 16))[2].flatten(), minlength=4)
        for i, (m, opt) in enumerate(zip((compiled, twin), opts)):
            loss = m(x)[0].pow(2).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[i].append(loss.item())
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
            layer = runtime.layers()[-1]
        if step % 3 == 2:
            order = [(step // 3 + 1 + e) % 4 for e in range(4)]
            moecc.switch(layer, placement_from_lists([order], 4), [opts[0]], step=step)
    return model, twin, losses, layer, graphs, routed


def test_switching_gives_the_losses_and_parameters_of_no_switching(trained_with_switches):
    model, twin, losses, _, _, _ = trained_with_switches
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_switches_never_recompile(trained_with_switches):
    *_, graphs, _ = trained_with_switches
    assert counters["stats"]["unique_graphs"] == graphs


def test_switch_log_records_every_switch(trained_with_switches):
    _, _, _, layer, _, _ = trained_with_switches
    assert [r.step for r in layer.switch_log] == [2, 5, 8, 11, 14, 17]
    assert layer.switch_log[0].placement_to == [[1, 2, 3, 0]]
    assert "switches" in str(moecc.report())


def test_load_monitor_counts_tokens_per_expert_on_device(trained_with_switches):
    _, _, _, layer, _, routed = trained_with_switches
    assert runtime.read_loads(layer) == routed.tolist()
    assert runtime.read_loads(layer) == [0.0] * 4  # reading resets the window


class _FakeEPLayer:
    """What decide() reads of a layer, for a 2-rank layout, without starting processes."""

    def __init__(self, placement):
        self.config = type("C", (), {"placement": placement})()
        self.placement, self.pool, self.d_model, self.d_ffn, self.switch_log = placement, None, 512, 1024, []


def test_decision_switches_to_balance_a_hot_expert_and_stays_when_balanced():
    layout_lists = [[0, 1, -1], [2, 3, -1]]
    layer = _FakeEPLayer(placement_from_lists(layout_lists, 4))
    assert layer.placement.layout == SlotLayout(ranks=2, slots_per_rank=3)
    skewed = [4000.0, 3000.0, 100.0, 100.0]  # rank 0 holds both hot experts
    choice = runtime.decide(layer, [x * 50 for x in skewed], 50, moecc.costmodel.profile.builtin_profile("cpu"))
    assert choice is not None
    best, gain, cost = choice
    assert gain * 50 > cost > 0
    loads = best.tokens_per_rank(skewed)
    assert max(loads) < max(layer.placement.tokens_per_rank(skewed))
    balanced = [1000.0] * 4
    assert runtime.decide(layer, [x * 50 for x in balanced], 50,
                          moecc.costmodel.profile.builtin_profile("cpu")) is None


def test_every_block_of_a_model_counts_its_own_loads():
    model = zoo.TinyTransformer()
    compiled = torch.compile(model, backend="moecc")
    tokens = torch.randint(0, 64, (2, 6))
    before = len(runtime.layers())
    compiled(tokens)
    layers = runtime.layers()[before:]
    assert [layer.path for layer in layers] == ["moes.0", "moes.1"]
    h = model.embed(tokens)
    for norm, moe, layer in zip(model.norms, model.moes, layers):
        x = norm(h)
        chosen = moe.router(x.reshape(-1, 16))[2]
        assert runtime.read_loads(layer) == torch.bincount(chosen.flatten(), minlength=4).tolist()
        h = h + moe(x)[0]

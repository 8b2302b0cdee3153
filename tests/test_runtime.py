"""The runtime on one process: load monitor, placement decisions, sessions (one per compiled model), attach."""
import moe_zoo as zoo
import pytest
import torch

import moecc
from moecc import runtime
from moecc.backends.ep import placement_from_lists
from moecc.costmodel.placement import SlotLayout


@pytest.fixture(scope="module")
def trained():
    """20 AdamW steps of a compiled model, with the tokens its router sent to each expert."""
    model = zoo.LoopMoE()
    compiled = torch.compile(model, backend="moecc")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    routed = torch.zeros(4)
    for _ in range(20):
        x = torch.randn(2, 5, 16, generator=gen)
        routed += torch.bincount(model.router(x.view(-1, 16))[2].flatten(), minlength=4)
        compiled(x)[0].pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, moecc.session(model).layers[-1], routed


def test_load_monitor_counts_tokens_per_expert_on_device(trained):
    _, layer, routed = trained
    assert runtime.read_loads(layer) == routed.tolist()
    assert runtime.read_loads(layer) == [0.0] * 4  # reading resets the window


def test_a_switch_on_one_process_is_refused_with_the_reason(trained):
    model, layer, _ = trained
    with pytest.raises(ValueError, match="runs on one process.*needs expert parallelism"):
        moecc.switch(layer, placement_from_lists([[1, 2, 3, 0]], 4))
    assert moecc.report(model).switches == []


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
    compiled(tokens)
    layers = moecc.session(model).layers
    assert [layer.path for layer in layers] == ["moes.0", "moes.1"]
    h = model.embed(tokens)
    for norm, moe, layer in zip(model.norms, model.moes, layers):
        x = norm(h)
        chosen = moe.router(x.reshape(-1, 16))[2]
        assert runtime.read_loads(layer) == torch.bincount(chosen.flatten(), minlength=4).tolist()
        h = h + moe(x)[0]


def test_each_compiled_model_holds_only_its_own_layers_and_report_rows():
    torch._dynamo.reset()
    first, second = zoo.TinyTransformer(), zoo.LoopMoE()
    torch.compile(first, backend="moecc")(torch.randint(0, 64, (1, 4)))
    torch.compile(second, backend="moecc")(torch.randn(1, 3, 16))
    assert [layer.path for layer in moecc.session(first).layers] == ["moes.0", "moes.1"]
    assert [layer.path for layer in moecc.session(second).layers] == [""]
    assert [b.spec.path for b in moecc.report(second).blocks] == [""]
    everyone = [b.spec.path for b in moecc.report().blocks]
    assert everyone[-3:] == ["moes.0", "moes.1", ""]  # the process-wide report, in compile order


def test_session_of_a_model_never_compiled_is_refused_by_name():
    with pytest.raises(ValueError, match="no graph of this DenseMLP has been compiled"):
        moecc.session(zoo.DenseMLP())


def test_attach_finds_the_layers_its_optimizer_steps_and_leaves_other_models_alone():
    torch._dynamo.reset()
    mine, other = zoo.LoopMoE(), zoo.LoopMoE(dim=8)  # other shapes: Dynamo cannot reuse one model's graph
    opt = torch.optim.AdamW(mine.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=2, switching=False)  # before the first compiled call, as a training loop does
    compiled = torch.compile(mine, backend="moecc")
    torch.compile(other, backend="moecc")(torch.randn(1, 3, 8))
    for _ in range(2):
        compiled(torch.randn(1, 3, 16))[0].sum().backward()
        opt.step()
    (layer,) = moecc.session(mine).layers
    assert layer.optimizers == [opt] and len(layer.trace) == 1
    assert moecc.session(other).layers[0].optimizers == [] and moecc.session(other).layers[0].trace == []

"""Capacity factor (GShard/Switch token dropping), an option: rows past an expert's capacity contribute nothing."""
import math

import moe_zoo as zoo
import pytest
import torch
from conftest import compile_and_records

import moecc
from moecc import runtime


@pytest.fixture(scope="module")
def compiled_with_capacity():
    model = zoo.LoopMoE(top_k=2)
    compiled = torch.compile(model, backend="moecc", options={"moecc.capacity_factor": 1.0})
    x = torch.randn(1, 12, 16)
    compiled(x)
    return model, compiled, moecc.session(model).layers[-1]


def skewed(model, n=12):
    """Inputs that send most tokens to expert 0, so that it overflows its capacity."""
    direction = model.router.gate.weight[0].detach()
    return torch.randn(1, n, 16) + 3.0 * direction / direction.norm()


def test_rows_past_capacity_are_dropped_as_in_gshard(compiled_with_capacity):
    model, compiled, _ = compiled_with_capacity
    x = skewed(model)
    experts = model.router(x.view(-1, 16))[2]
    assert torch.bincount(experts.flatten(), minlength=4).max() > math.ceil(12 * 2 / 4)  # something overflows
    ref = zoo.gshard_reference(model, x, 1.0)
    torch.testing.assert_close(compiled(x)[0], ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ref, model(x)[0], atol=1e-4)  # dropping changed the answer


def test_gradients_follow_the_dropped_computation(compiled_with_capacity):
    model, compiled, _ = compiled_with_capacity
    x = skewed(model)
    params = list(model.parameters())
    g_out = torch.autograd.grad(compiled(x)[0].pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(zoo.gshard_reference(model, x, 1.0).pow(2).sum(), params, allow_unused=True,
                                materialize_grads=True)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_capacity_changes_at_run_time_without_recompiling(compiled_with_capacity):
    from torch._dynamo.utils import counters

    model, compiled, layer = compiled_with_capacity
    x = skewed(model)
    graphs = counters["stats"]["unique_graphs"]
    runtime.set_capacity_factor(layer, float("inf"))
    try:
        torch.testing.assert_close(compiled(x)[0], model(x)[0], atol=1e-5, rtol=1e-4)  # dropless again
        runtime.set_capacity_factor(layer, 0.5)
        torch.testing.assert_close(compiled(x)[0], zoo.gshard_reference(model, x, 0.5), atol=1e-5, rtol=1e-4)
    finally:
        runtime.set_capacity_factor(layer, 1.0)
    assert counters["stats"]["unique_graphs"] == graphs


def test_capacity_factor_is_refused_on_layers_compiled_without_one():
    model = zoo.LoopMoE()
    compile_and_records(model, torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="capacity_factor"):
        runtime.set_capacity_factor(moecc.session(model).layers[-1], 1.0)

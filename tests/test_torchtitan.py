"""Issue 13, item 4: torchtitan's MoE (router module, argsort dispatcher, bf16 ``torch._grouped_mm`` over stacked
[E, F, D] weights, ``scatter_add`` combine, shared experts, aux-loss-free buffers) under ``backend="moecc"``.

torchtitan is a test extra (``pip install -e .[torchtitan]``); these tests skip without it. Models are built from
torchtitan's own config builders; the debug models run with SDPA (causal) attention, because FlexAttention has no
backward on CPU, and with two layers, to keep the compiles short.
"""
from functools import partial

import pytest
import torch
from conftest import compile_and_records

pytest.importorskip("torchtitan")
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_ffn_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)

DIM, FFN, E, K = 16, 32, 8, 2


def moe_layer(score_func="sigmoid", shared=True, seed=0):
    """torchtitan's ``MoE`` at tiny size (random weights large enough that routing and outputs are not flat)."""
    init = {"weight": partial(torch.nn.init.normal_, std=0.02)}
    experts_init = {name: init["weight"] for name in ("w1_EFD", "w2_EDF", "w3_EFD")}
    config = make_moe_config(
        num_experts=E,
        router=make_router_config(dim=DIM, num_experts=E, gate_param_init=init, top_k=K, score_func=score_func,
                                  route_norm=True),
        routed_experts=make_routed_experts_config(dim=DIM, hidden_dim=FFN, num_experts=E, top_k=K,
                                                  param_init=experts_init, comm_backend="standard"),
        shared_experts=make_ffn_config(dim=DIM, hidden_dim=FFN, w1_param_init=init, w2w3_param_init=init)
        if shared else None,
    )
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def assert_close_bf16(actual, expected, rel=2e-2):
    """Equal up to bf16 rounding: the error's norm within ``rel`` of the value's (elementwise checks fail on the
    few entries where bf16 GEMMs cancel to near zero)."""
    err = float((actual.double() - expected.double()).norm())
    assert err <= rel * float(expected.double().norm()) + 1e-6, (err, float(expected.double().norm()))


def assert_forward_backward_bf16(model, compiled, x):
    params = [p for p in model.parameters() if p.requires_grad]
    ref, out = model(x), compiled(x)
    assert_close_bf16(out, ref)
    cot = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * cot).sum(), params, allow_unused=True)
    grads_out = torch.autograd.grad((out * cot).sum(), params, allow_unused=True)
    for a, b in zip(grads_ref, grads_out):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_bf16(b, a)


@pytest.fixture(scope="module")
def layer():
    model = moe_layer()
    model.train(False)
    compiled, records = compile_and_records(model, torch.randn(2, 5, DIM))
    return model, compiled, records


def test_layer_is_found_as_grouped_mm_with_its_router_and_rewritten(layer):
    _, _, records = layer
    assert len(records) == 1 and records[0].outcome == "rewritten", records[0].outcome
    spec = records[0].spec
    assert (spec.form, spec.num_experts, spec.router.top_k, spec.router.score) == ("grouped_mm", E, K, "sigmoid")
    assert spec.router.renormalize and spec.router.selection_bias  # route_norm; expert_bias_E for choice only
    assert sorted(spec.experts.params) == ["w1_EFD", "w2_EDF", "w3_EFD"] and spec.shared_experts == ("shared_experts",)


def test_layer_forward_and_backward_equal_eager(layer):
    model, compiled, _ = layer
    assert_forward_backward_bf16(model, compiled, torch.randn(3, 4, DIM))


def test_layer_runs_moecc_ops(layer):
    _, compiled, _ = layer
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled(torch.randn(2, 5, DIM))
    ran = {e.name for e in prof.events()}
    assert {"moecc::sort_by_slot", "moecc::grouped_mm"} <= ran


def test_expert_bias_steers_selection_in_the_compiled_layer(layer):
    model, compiled, _ = layer
    x = torch.randn(2, 5, DIM)
    unbiased = compiled(x).detach()
    try:
        with torch.no_grad():
            model.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 5.0, 0.0]))
        ids = model.router(x, model.expert_bias_E)[1]
        assert set(ids.unique().tolist()) == {3, 6}  # the bias alone decides: every token picks experts 3 and 6
        steered = compiled(x)
        assert_close_bf16(steered, model(x))
        assert not torch.allclose(steered, unbiased, atol=1e-3)
    finally:
        with torch.no_grad():
            model.expert_bias_E.zero_()


def test_tokens_per_expert_accumulate_as_in_eager():
    model = moe_layer(seed=1)
    model.train(True)
    compiled, records = compile_and_records(model, torch.randn(2, 5, DIM))
    assert records[0].rewritten
    x = torch.randn(3, 4, DIM)
    model.tokens_per_expert_E.zero_()
    model(x)
    eager_counts = model.tokens_per_expert_E.clone()
    model.tokens_per_expert_E.zero_()
    compiled(x)
    compiled(x)
    torch.testing.assert_close(model.tokens_per_expert_E, 2 * eager_counts)
    assert eager_counts.sum() == 3 * 4 * K


def _debug_model(family: str, n_layers: int):
    """torchtitan's debug model config with its first ``n_layers`` layers and causal SDPA attention."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    if family == "qwen3":
        from torchtitan.models.qwen3 import qwen3_configs

        config = qwen3_configs["debugmodel_moe"]("flex")
    else:
        from torchtitan.models.deepseek_v3 import deepseekv3_configs

        config = deepseekv3_configs["debugmodel"]("flex", "standard")
    config.layers = config.layers[:n_layers]
    for block in config.layers:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = config.build()
    model.init_states(buffer_device=torch.device("cpu"))
    model.train(False)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family,n_layers,moe_layers", [("qwen3", 2, ["layers.0.moe", "layers.1.moe"]),
                                                         ("deepseek_v3", 2, ["layers.1.moe"])])
def test_debug_model_is_rewritten_and_equals_eager(family, n_layers, moe_layers):
    model = _debug_model(family, n_layers)
    tokens = torch.randint(0, 2048, (1, 16))
    compiled, records = compile_and_records(model, tokens)
    assert [r.spec.path for r in records] == moe_layers
    assert all(r.rewritten for r in records), [r.outcome for r in records]
    assert_forward_backward_bf16(model, compiled, torch.randint(0, 2048, (1, 16)))

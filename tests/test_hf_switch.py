"""Switch Transformers (transformers 5.x) under backend="moecc": top-1 (argmax of an fp32 softmax) with expert
capacity, ModuleDict experts (``expert_0`` ...), an encoder-decoder with sparse layers on both sides.

The router stays the user's: it computes the capacity mask (cumsum of the one-hot ids over the sequence), and the
rewrite reproduces it exactly (a dropped token gets weight 0). Switch has a single experts implementation, its own
eager loop, which graph-breaks under stock torch.compile.
"""
import copy

import hf_zoo
import pytest
import torch
from hf_zoo import Compiled, assert_pairs_close, router_facts

import moecc

pytest.importorskip("transformers")

ROUTER = dict(score="softmax", top_k=1, score_after_topk=False, renormalize=False, selection_bias=False,
              router_bias=False, grouped=False, scale=False)
PATHS = ["model.encoder.block.0.layer.1.mlp", "model.encoder.block.1.layer.1.mlp",
         "model.decoder.block.0.layer.2.mlp", "model.decoder.block.1.layer.2.mlp"]


@pytest.fixture(scope="module")
def switch():
    return Compiled("switch", "eager")


def test_encoder_and_decoder_blocks_are_rewritten_with_capacity_reported(switch):
    assert [r.spec.path for r in switch.records] == PATHS
    assert all(r.rewritten for r in switch.records), [r.outcome for r in switch.records]
    for r in switch.records:
        assert r.spec.form == "loop" and r.spec.num_experts == 4
        assert router_facts(r.spec) == ROUTER
        assert any(note.startswith("capacity") for note in r.spec.notes)
        assert (r.spec.experts.ffn, r.spec.experts.weights) == ("mlp-relu", "modulelist")
        assert list(r.spec.experts.layouts) == ["wi.weight [32, 16]", "wo.weight [16, 32]"]


def test_one_graph_and_no_graph_break(switch):
    assert (switch.graphs, switch.breaks) == (1, 0)


def test_the_example_overflows_capacity(switch):
    """Some token is dropped on the compared batch: equal logits below really test the capacity."""
    dropped = []
    hooks = [block.router.register_forward_hook(
        lambda mod, args, out: dropped.append(int((out[0].sum(-1) == 0).sum())))
        for _, block in hf_zoo.moe_blocks(switch.twin)]
    try:
        with torch.no_grad():
            switch.twin(switch.make_input())
    finally:
        for h in hooks:
            h.remove()
    assert sum(dropped) > 0


def test_logits_and_every_gradient_equal_eager(switch):
    assert_pairs_close([("logits", switch.out, switch.ref), *switch.grads()])


def _jittery_block():
    model, _ = hf_zoo.build("switch", "eager")
    _, block = hf_zoo.moe_blocks(model)[0]
    block.router.jitter_noise = 0.5
    return block


def test_router_jitter_is_off_in_eval_so_the_block_is_rewritten():
    block = _jittery_block().train(False)
    x = torch.randn(2, 6, 16)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(block), backend="moecc", fullgraph=True)
    out = compiled(x)
    records = moecc.report(compiled).blocks
    assert len(records) == 1 and records[0].rewritten
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-4)


def test_router_jitter_in_training_falls_back_with_the_reason():
    block = _jittery_block().train(True)
    torch._dynamo.reset()
    torch.compile(block, backend="moecc", fullgraph=True)(torch.randn(2, 6, 16))
    records = moecc.report(block).blocks
    assert len(records) == 1 and records[0].outcome.startswith("fallback: the block draws random numbers")

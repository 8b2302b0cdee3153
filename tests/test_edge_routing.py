"""Routing edge cases in the compiled graph (issue 15, item 4): NaN and inf router logits, zero tokens, every
token on one expert, more experts than tokens, top-k with k = E.

Each case must give eager's answer (outputs and gradients, with eager's NaN pattern) or a clear error, never a
crash or an out-of-bounds access inside a kernel. Compiled blocks are shared per module; NaN and inf are
injected after compiling (router weights or a poison buffer added to the logits are graph inputs, so no
recompile: the rewritten graph itself sees them), and each such test checks that no recompile happened.
The kernel tests at the end feed the slot ops the malformed routing a bad router could produce.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import moe_zoo as zoo
import pytest
import torch
from conftest import compile_and_records

import moecc
from moecc.backends import expert_ffn_cpu, kernels_cpu, ops

NAN, INF = float("nan"), float("inf")
DIM = 16


def hf_mixtral_block(impl: str, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A tiny HF Mixtral sparse-MoE block (``impl``: "grouped_mm" or "eager" experts), seeded weights."""
    import transformers as T
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = T.MixtralConfig(hidden_size=DIM, intermediate_size=32, num_local_experts=experts,
                             num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF leaves a bare block's parameters uninitialised: its model's init does that
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return block.train(True)


# name -> (builder, input shape, top-k): the forms of tests/moe_zoo.py and HF Mixtral's two experts paths.
FORMS = {
    "loop-fused": (lambda: zoo.LoopMoE(), (1, 6, DIM), 2),
    "loop-grouped-top1": (lambda: zoo.LoopMoE(expert_cls=zoo.GeluExpert, top_k=1), (1, 6, DIM), 1),
    "stacked": (lambda: zoo.StackedLoopMoE(), (6, DIM), 2),
    "dense-masked": (lambda: zoo.DenseMaskedMoE(), (1, 6, DIM), 2),
    "sorted": (lambda: zoo.SortedMoE(), (6, DIM), 2),
    "hf-grouped_mm": (lambda: hf_mixtral_block("grouped_mm"), (2, 3, DIM), 2),
    "hf-eager": (lambda: hf_mixtral_block("eager"), (2, 3, DIM), 2),
}
TOP_E = {  # k = E = 4
    "loop": (lambda: zoo.LoopMoE(top_k=4), (1, 6, DIM), 4),
    "sorted": (lambda: zoo.SortedMoE(top_k=4), (6, DIM), 4),
    "dense-masked": (lambda: zoo.DenseMaskedMoE(top_k=4), (1, 6, DIM), 4),
    "hf-grouped_mm": (lambda: hf_mixtral_block("grouped_mm", top_k=4), (2, 3, DIM), 4),
}
MANY_EXPERTS = {  # E = 8, compiled on 2 tokens
    "loop": (lambda: zoo.LoopMoE(num_experts=8), (1, 2, DIM), 2),
    "stacked": (lambda: zoo.StackedLoopMoE(num_experts=8), (2, DIM), 2),
    "sorted-bincount": (lambda: zoo.SortedMoE(num_experts=8, counts="bincount"), (2, DIM), 2),
    "hf-grouped_mm": (lambda: hf_mixtral_block("grouped_mm", experts=8), (1, 2, DIM), 2),
}


def hf_family_block(family: str, impl: str = "grouped_mm") -> torch.nn.Module:
    """The first MoE block of a tiny ``family`` model (tests/hf_zoo.py), initialised by its model."""
    import hf_zoo

    model, _ = hf_zoo.build(family, impl)
    return hf_zoo.moe_blocks(model)[0][1].train(True)


# Routers beyond softmax-then-top-k: DeepSeek-V3 (sigmoid, correction bias for selection only, group-limited,
# scaled, shared experts), GPT-OSS (top-k over biased logits, softmax after), Qwen2-MoE (gated shared expert).
HF_FAMILIES = {
    "deepseek_v3": (lambda: hf_family_block("deepseek_v3"), (2, 3, DIM), 2),
    "gpt_oss": (lambda: hf_family_block("gpt_oss"), (2, 3, DIM), 2),
    "qwen2_moe-eager": (lambda: hf_family_block("qwen2_moe", "eager"), (2, 3, DIM), 2),
}


@dataclass
class Case:
    model: torch.nn.Module
    compiled: torch.nn.Module
    shape: tuple[int, ...]
    top_k: int

    @property
    def router_weight(self) -> torch.Tensor:
        router = getattr(self.model, "router", None) or self.model.gate
        weight = getattr(router, "weight", None)  # a Linear or HF router; the zoo's Router holds a .gate Linear
        return weight if isinstance(weight, torch.Tensor) else router.gate.weight

    def x(self, shape=None, positive: bool = False) -> torch.Tensor:
        x = torch.randn(shape or self.shape)
        return x.abs() + 0.1 if positive else x

    @contextlib.contextmanager
    def same_graph(self):
        """The calls inside run the graph already compiled (and rewritten): no recompile, no new block."""
        records = moecc.session(self.model).blocks
        before = len(records)
        yield
        assert len(moecc.session(self.model).blocks) == before, "the call recompiled: the edge case missed moecc"

    @contextlib.contextmanager
    def router_set(self, fill):
        """Router weight changed by ``fill`` (in place, no grad) for the duration, then restored."""
        saved = self.router_weight.detach().clone()
        with torch.no_grad():
            fill(self.router_weight)
        try:
            yield
        finally:
            with torch.no_grad():
                self.router_weight.copy_(saved)


def _build(table, name) -> Case:
    make, shape, top_k = table[name]
    model = make()
    compiled, records = compile_and_records(model, torch.randn(shape, requires_grad=True))
    assert [r.outcome for r in records] == ["rewritten"], [r.outcome for r in records]
    case = Case(model, compiled, shape, top_k)
    forward_backward(case.compiled, case.model, case.x())  # compiles the training graph before any test
    return case


@pytest.fixture(scope="module", params=sorted(FORMS))
def form(request) -> Case:
    case = _build(FORMS, request.param)
    with torch.no_grad():
        case.compiled(case.x())  # the inference graph (grad mode is guarded: a second compile)
    return case


@pytest.fixture(scope="module", params=sorted(HF_FAMILIES))
def hf_family(request) -> Case:
    return _build(HF_FAMILIES, request.param)


@pytest.fixture(scope="module", params=sorted(TOP_E))
def top_e(request) -> Case:
    return _build(TOP_E, request.param)


@pytest.fixture(scope="module", params=sorted(MANY_EXPERTS))
def many_experts(request) -> Case:
    return _build(MANY_EXPERTS, request.param)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def forward_backward(fn, model, x):
    """(outputs, gradients of x and every parameter, None ones as zeros), or None gradients when the first
    output takes no gradient (HF's eager experts loop returns a fresh zeros tensor for zero tokens)."""
    x = x.clone().requires_grad_(True)
    outs = _tensors(fn(x))
    if not outs[0].requires_grad:
        return [o.detach() for o in outs], None
    wrt = [x, *model.parameters()]
    cotangent = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((outs[0] * cotangent).sum(), wrt, allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


def assert_matches_eager(case: Case, x: torch.Tensor, reference=None):
    """Compiled outputs and gradients equal eager's (or ``reference``'s), NaN for NaN; returns the reference's
    (outputs, gradients)."""
    ref, ref_grads = forward_backward(reference or case.model, case.model, x)
    out, grads = forward_backward(case.compiled, case.model, x)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4, equal_nan=True)
    if ref_grads is None:
        assert grads is None or not any(g.abs().any() for g in grads)
    else:
        names = ["x", *(n for n, _ in case.model.named_parameters())]
        for name, g, r in zip(names, grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, equal_nan=True, msg=lambda m: f"{name}: {m}")
    return ref, ref_grads


# --- NaN and inf router logits, injected through the router weight after compiling ------------------------

def test_nan_router_weight_gives_eager_nan_pattern(form):
    def poison(w):
        w[1, 0] = NAN  # expert 1's logit is NaN for every token: softmax rows turn NaN

    with form.router_set(poison), form.same_graph():
        ref, _ = assert_matches_eager(form, form.x())
    assert ref[0].isnan().any()


def test_nan_router_weight_in_inference_gives_eager_nan_pattern(form):
    def poison(w):
        w[1, 0] = NAN

    x = form.x()
    with form.router_set(poison), form.same_graph(), torch.no_grad():
        ref, out = _tensors(form.model(x)), _tensors(form.compiled(x))
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert ref[0].isnan().any()


def test_inf_router_weight_gives_eager_answer(form):
    def poison(w):
        w[1, 0] = INF  # +inf or -inf logits depending on the sign of x[:, 0]

    with form.router_set(poison), form.same_graph():
        assert_matches_eager(form, form.x())


def test_minus_inf_logits_never_route_to_that_expert(form):
    def poison(w):
        w[1] = -INF  # positive inputs: expert 1's logit is -inf for every token, its probability 0

    with form.router_set(poison), form.same_graph():
        ref, _ = assert_matches_eager(form, form.x(positive=True))
    assert torch.isfinite(ref[0]).all()


# --- every token on one expert ---------------------------------------------------------------------------

def test_all_tokens_on_one_expert(form):
    def bias(w):
        w.zero_()
        w[2] = 1.0  # with positive inputs expert 2 wins every token; expert 0 is every token's second choice
        w[0] = 0.5

    x = form.x(positive=True)
    with form.router_set(bias):
        chosen = torch.topk(x.reshape(-1, DIM) @ form.router_weight.t(), form.top_k, dim=-1).indices
        assert (chosen[:, 0] == 2).all() and (chosen[:, 1:] == 0).all()
        with form.same_graph():
            assert_matches_eager(form, x)


# --- zero tokens ------------------------------------------------------------------------------------------

def test_zero_tokens_after_compiling_on_a_full_batch(form):
    shape = (*form.shape[:-2], 0, DIM)  # [B, 0, D] or [0, D]
    ref, _ = assert_matches_eager(form, form.x(shape))  # recompiles for the empty batch
    assert ref[0].shape == shape


@pytest.mark.parametrize("form", sorted(n for n, (_, shape, _) in FORMS.items() if len(shape) == 3), indirect=True)
def test_zero_sequences_after_compiling_on_a_full_batch(form):
    shape = (0, *form.shape[1:])
    ref, _ = assert_matches_eager(form, form.x(shape))
    assert ref[0].shape == shape


def test_compiled_first_on_zero_tokens_then_a_full_batch_is_rewritten():
    model = zoo.LoopMoE()
    compiled, _ = compile_and_records(model, torch.randn(1, 0, DIM))
    assert compiled(torch.randn(1, 0, DIM))[0].shape == (1, 0, DIM)
    case = Case(model, compiled, (1, 5, DIM), 2)
    assert_matches_eager(case, case.x())  # a new token count: recompiled, and this graph is rewritten
    assert moecc.session(model).blocks[-1].outcome == "rewritten"


def test_zero_token_graph_is_not_reported_as_an_internal_error():
    model = zoo.LoopMoE()
    _, records = compile_and_records(model, torch.randn(1, 0, DIM))
    assert records and not any("internal error" in r.outcome for r in records), [r.outcome for r in records]


# --- HF routers with selection biases, groups and routers after top-k ---------------------------------------

def test_hf_router_nan_weight_gives_eager_nan_pattern(hf_family):
    def poison(w):
        w[1, 0] = NAN

    with hf_family.router_set(poison), hf_family.same_graph():
        ref, _ = assert_matches_eager(hf_family, hf_family.x())
    assert ref[0].isnan().any()


def test_hf_router_inf_weight_gives_eager_answer(hf_family):
    def poison(w):
        w[2, 3] = INF

    with hf_family.router_set(poison), hf_family.same_graph():
        assert_matches_eager(hf_family, hf_family.x())


def test_hf_zero_tokens_after_compiling_on_a_full_batch(hf_family):
    ref, _ = assert_matches_eager(hf_family, hf_family.x((2, 0, DIM)))
    assert ref[0].shape == (2, 0, DIM)


@pytest.mark.parametrize("hf_family", ["deepseek_v3"], indirect=True)
def test_nan_selection_bias_picks_the_experts_eager_picks(hf_family):
    """DeepSeek-V3 selects experts on ``sigmoid + correction bias`` but weights them by the unbiased scores: a NaN
    bias makes top-k choose among NaN and the output stays finite, so the compiled top-k must choose as eager's."""
    bias = hf_family.model.gate.e_score_correction_bias
    saved = bias.clone()
    bias[1] = NAN
    try:
        with hf_family.same_graph():
            ref, _ = assert_matches_eager(hf_family, hf_family.x())
    finally:
        bias.copy_(saved)
    assert torch.isfinite(ref[0]).all()


# --- dynamic shapes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic() -> Case:
    """LoopMoE compiled with ``dynamic=True``: one graph for every token count from 2 up."""
    model = zoo.LoopMoE()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecc", dynamic=True)
    case = Case(model, compiled, (1, 6, DIM), 2)
    forward_backward(compiled, model, case.x())
    assert [r.outcome for r in moecc.session(model).blocks] == ["rewritten"]
    return case


def test_dynamic_graph_with_nan_router_weight_gives_eager_nan_pattern(dynamic):
    def poison(w):
        w[1, 0] = NAN

    with dynamic.router_set(poison), dynamic.same_graph():
        ref, _ = assert_matches_eager(dynamic, dynamic.x((1, 9, DIM)))  # another token count, same graph
    assert ref[0].isnan().any()


def test_dynamic_graph_then_zero_tokens(dynamic):
    ref, _ = assert_matches_eager(dynamic, dynamic.x((1, 0, DIM)))  # sizes 0 and 1 are specialised: recompiles
    assert ref[0].shape == (1, 0, DIM)


# --- k = E and more experts than tokens ---------------------------------------------------------------------

def test_top_e_matches_eager(top_e):
    with top_e.same_graph():
        assert_matches_eager(top_e, top_e.x())


def test_top_e_with_nan_router_weight_gives_eager_nan_pattern(top_e):
    def poison(w):
        w[3, 1] = NAN

    with top_e.router_set(poison), top_e.same_graph():
        ref, _ = assert_matches_eager(top_e, top_e.x())
    assert ref[0].isnan().any()


def test_more_experts_than_tokens_matches_eager(many_experts):
    with many_experts.same_graph():
        assert_matches_eager(many_experts, many_experts.x())


def test_more_experts_than_tokens_with_one_token(many_experts):
    one = (*many_experts.shape[:-2], 1, DIM)
    assert_matches_eager(many_experts, many_experts.x(one))  # recompiles for one token


def test_more_experts_than_tokens_with_every_token_on_one_expert(many_experts):
    def bias(w):
        w.zero_()
        w[5] = 1.0
        w[0] = 0.5

    with many_experts.router_set(bias), many_experts.same_graph():
        assert_matches_eager(many_experts, many_experts.x(positive=True))


# --- NaN and inf in single tokens' logits (a poison buffer added by a forward hook on the router) ----------

POISONED = {"loop": lambda: zoo.LoopMoE(), "dense-masked": lambda: zoo.DenseMaskedMoE()}


def add_poison(model: torch.nn.Module, tokens: int = 6) -> None:
    """Add ``gate.poison`` ([tokens, E], zeros) to the router's logits through a forward hook on its Linear."""
    gate = model.router.gate if hasattr(model, "router") else model.gate
    gate.register_buffer("poison", torch.zeros(tokens, gate.out_features))
    gate.register_forward_hook(lambda module, args, out: out + module.poison)


@pytest.fixture(scope="module", params=sorted(POISONED))
def poisoned(request) -> Case:
    """A block whose router logits get ``gate.poison`` added: zeros while compiling, NaN/inf in the tests."""
    model = POISONED[request.param]()
    add_poison(model)
    compiled, records = compile_and_records(model, torch.randn(1, 6, DIM, requires_grad=True))
    assert [r.outcome for r in records] == ["rewritten"], [r.outcome for r in records]
    case = Case(model, compiled, (1, 6, DIM), 2)
    forward_backward(compiled, model, case.x())
    return case


@contextlib.contextmanager
def poison(case: Case, token, expert, value):
    """``value`` added to the logit of ``token`` for ``expert`` (a slice: all) for the duration."""
    gate = case.model.router.gate if hasattr(case.model, "router") else case.model.gate
    gate.poison[token, expert] = value
    try:
        with case.same_graph():
            yield
    finally:
        gate.poison.zero_()


@pytest.mark.parametrize("expert", [slice(None), 1], ids=["all-logits", "one-logit"])
def test_nan_logits_of_one_token_stay_in_that_token(poisoned, expert):
    with poison(poisoned, 3, expert, NAN):
        ref, _ = assert_matches_eager(poisoned, poisoned.x())
    assert ref[0].reshape(6, DIM).isnan().any(-1).tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize("value", [INF, -INF], ids=["+inf", "-inf"])
def test_inf_logit_of_one_token(poisoned, value):
    with poison(poisoned, 2, 0, value):
        ref, _ = assert_matches_eager(poisoned, poisoned.x())
    assert torch.isfinite(ref[0].reshape(6, DIM)[[0, 1, 3, 4, 5]]).all()  # other tokens untouched


# --- capacity dropping (GShard) with every token on one expert, and a dropped token whose logits are NaN ---------

CAPACITY = {"fused-top1": lambda: zoo.LoopMoE(top_k=1),
            "grouped-top1": lambda: zoo.LoopMoE(expert_cls=zoo.GeluExpert, top_k=1)}


@pytest.fixture(scope="module")
def capacity_case(request) -> Case:
    """A poisoned top-1 block compiled with ``moecc.capacity_factor`` 1.0: 2 rows per expert for 6 tokens."""
    model = CAPACITY[request.param]()
    add_poison(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecc", options={"moecc.capacity_factor": 1.0})
    case = Case(model, compiled, (1, 6, DIM), model.router.top_k)
    forward_backward(compiled, model, case.x())
    assert [r.outcome for r in moecc.session(model).blocks] == ["rewritten"]
    return case


def gshard(case: Case):
    """The eager reference under capacity 1.0, with the logits as second output (as the block returns them)."""
    return lambda x: (zoo.gshard_reference(case.model, x, 1.0), case.model(x)[1])


def _one_expert(w):
    w.zero_()
    w[2] = 1.0  # positive inputs: every token's choice is expert 2, which takes 2 of the 6


@pytest.mark.parametrize("capacity_case", sorted(CAPACITY), indirect=True)
def test_capacity_with_every_token_on_one_expert_matches_gshard(capacity_case):
    with capacity_case.router_set(_one_expert), capacity_case.same_graph():
        ref, _ = assert_matches_eager(capacity_case, capacity_case.x(positive=True), gshard(capacity_case))
    assert not ref[0].reshape(6, DIM)[2:].any()  # tokens 2-5 were dropped


@pytest.mark.parametrize("capacity_case", ["fused-top1", "grouped-top1"], indirect=True)
def test_capacity_dropped_token_with_nan_logits_contributes_zero(capacity_case):
    with capacity_case.router_set(_one_expert), poison(capacity_case, 5, slice(None), NAN):
        # token 5's NaN logits pick expert 2 (top-k over NaN), already full: its row is dropped, its output zero
        ref, _ = assert_matches_eager(capacity_case, capacity_case.x(positive=True), gshard(capacity_case))
    assert not ref[0].reshape(6, DIM)[5].isnan().any()


# --- compiled while the router already holds NaN -------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_on_nan():
    model = zoo.LoopMoE()
    with torch.no_grad():
        model.router.gate.weight[1, 0] = NAN
    compiled, records = compile_and_records(model, torch.randn(1, 6, DIM, requires_grad=True))
    return Case(model, compiled, (1, 6, DIM), 2), records


def test_compiled_on_nan_router_gives_eager_nan_pattern(compiled_on_nan):
    case, _ = compiled_on_nan
    ref, _ = assert_matches_eager(case, case.x())
    assert ref[0].isnan().any()


def test_compiled_on_nan_router_says_why_it_fell_back(compiled_on_nan):
    _, records = compiled_on_nan
    reason = records[0].outcome.lower()
    assert "nan" in reason or "non-finite" in reason, reason


# --- the slot kernels refuse malformed routing by name -------------------------------------------------------

E, FFN = 4, 8


def _weights(rows_in, rows_out, groups=E):
    return [torch.randn(rows_out, rows_in) for _ in range(groups)]  # nn.Linear layout: transpose_w=True


@pytest.mark.parametrize("slots", [[0, 4], [-1, 2]], ids=["too-large", "negative"])
def test_sort_by_slot_refuses_slot_ids_out_of_range(slots):
    with pytest.raises(ValueError, match=r"slot ids must lie in \[0, 4\)"):
        ops.sort_by_slot(torch.tensor(slots), E)


def test_sort_by_slot_of_zero_rows():
    order, inverse, offsets = ops.sort_by_slot(torch.empty(0, dtype=torch.long), E)
    assert order.numel() == inverse.numel() == 0 and offsets.tolist() == [0] * E


BAD_OFFSETS = {"descending": [2, 1, 3, 3], "past-the-rows": [1, 2, 3, 9], "one-too-many": [0, 1, 2, 3, 3]}


@pytest.mark.parametrize("offsets", sorted(BAD_OFFSETS))
def test_grouped_mm_refuses_malformed_offsets(offsets):
    offs = torch.tensor(BAD_OFFSETS[offsets], dtype=torch.int32)
    with pytest.raises(ValueError, match="moecc::grouped_mm: "):
        kernels_cpu.grouped_mm(torch.randn(3, DIM), _weights(DIM, FFN), offs, True)
    if offsets != "one-too-many":  # the weight gradient has one group per offset: any count is consistent
        with pytest.raises(ValueError, match="moecc::grouped_mm_wgrad: "):
            kernels_cpu.grouped_mm_wgrad(torch.randn(3, DIM), torch.randn(3, FFN), offs, True)


def _ffn_args(tokens, rows):
    w1, w3, w2 = _weights(DIM, FFN), _weights(DIM, FFN), _weights(FFN, DIM)
    index = torch.arange(rows) % max(tokens, 1)
    offsets = torch.tensor([rows // 2, rows // 2, rows, rows], dtype=torch.int32)
    return torch.randn(tokens, DIM), index, torch.rand(rows), offsets, w1, w3, w2, [1, 1, 1, 1], "silu"


@pytest.mark.parametrize("offsets", sorted(BAD_OFFSETS))
def test_expert_ffn_refuses_malformed_offsets(offsets):
    x, index, weight, _, w1, w3, w2, flags, act = _ffn_args(3, 3)
    offs = torch.tensor(BAD_OFFSETS[offsets], dtype=torch.int32)
    with pytest.raises(ValueError, match="moecc::expert_ffn: "):
        expert_ffn_cpu.expert_ffn(x, index, weight, offs, w1, w3, w2, flags, act, False)


def test_expert_ffn_backward_refuses_row_weights_shorter_than_the_rows():
    # The native backward reads w[r] and writes dweight[r] through raw pointers: a short tensor was overrun.
    x, index, weight, offsets, w1, w3, w2, flags, act = _ffn_args(4, 6)
    _, saved = ops.expert_ffn(x, index, weight, offsets, w1, w3, w2, flags, act, True)
    with pytest.raises(ValueError, match="row weights"):
        expert_ffn_cpu.expert_ffn_backward(torch.randn(4, DIM), x, index, weight[:2], offsets, w1, w3, w2, flags,
                                           act, saved)
    with pytest.raises(ValueError, match="saved pre-activations"):
        expert_ffn_cpu.expert_ffn_backward(torch.randn(4, DIM), x, index, weight, offsets, w1, w3, w2, flags,
                                           act, saved[:3])


def test_expert_ffn_refuses_token_ids_out_of_range():
    x, index, weight, offsets, w1, w3, w2, flags, act = _ffn_args(4, 6)
    with pytest.raises(IndexError, match="out of range"):
        ops.expert_ffn(x, index + 4, weight, offsets, w1, w3, w2, flags, act, False)


def test_kernels_of_zero_rows():
    x, index, weight, offsets, w1, w3, w2, flags, act = _ffn_args(0, 0)
    out, saved = ops.expert_ffn(x, index, weight, offsets, w1, w3, w2, flags, act, True)
    assert out.shape == (0, DIM) and saved.shape == (0, 2 * FFN)
    dx, dweight, dw1, dw3, dw2 = ops.expert_ffn_backward(out, x, index, weight, offsets, w1, w3, w2, flags, act,
                                                         saved)
    assert dx.shape == (0, DIM) and dweight.shape == (0,)
    assert not any(g.abs().any() for g in (*dw1, *dw3, *dw2))
    assert ops.grouped_mm(torch.randn(0, DIM), w1, offsets, True).shape == (0, FFN)
    assert not ops.grouped_mm_wgrad(torch.randn(0, DIM), torch.randn(0, FFN), offsets, True).abs().any()


def test_expert_ffn_keeps_a_nan_row_in_its_token():
    x, index, weight, offsets, w1, w3, w2, flags, act = _ffn_args(6, 6)
    x[2] = NAN
    weight[4] = NAN  # row 4 reads token 4
    out, _ = ops.expert_ffn(x, index, weight, offsets, w1, w3, w2, flags, act, False)
    assert out.isnan().any(-1).tolist() == [False, False, True, False, True, False]

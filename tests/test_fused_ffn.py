"""moecc::expert_ffn: the whole routed FFN as one op (CPU), and when the MoE pass chooses it."""
import moe_zoo as zoo
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_forward_backward, compile_and_records
from torch import nn

from moecc.backends import cpu_native, expert_ffn_cpu, ops

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu}


def reference_ffn(x_TD, index_N, weight_N, offsets, w1, w3, w2, flags, activation):
    """Row by row, the definition: out[index[n]] += weight[n] * ffn_g(x[index[n]])."""
    t1, t3, t2, glu = flags
    out = torch.zeros(x_TD.shape[0], w2[0].shape[0] if t2 else w2[0].shape[1], dtype=x_TD.dtype)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        for n in range(start, end):
            x = x_TD[index_N[n]]
            h1 = x @ (w1[g].t() if t1 else w1[g])
            if glu == 0:
                a = ACT[activation](h1)
            elif glu == 1:
                a = ACT[activation](h1) * (x @ (w3[g].t() if t3 else w3[g]))
            else:
                gate, up = h1.chunk(2) if glu == 2 else reversed(h1.chunk(2))
                a = ACT[activation](gate) * up
            out[index_N[n]] += weight_N[n] * (a @ (w2[g].t() if t2 else w2[g]))
        start = end
    return out


def make_case(glu, dtype=torch.float32, groups=3, dim=8, ffn=12, tokens=7, loads=(5, 0, 7)):
    """Random rows for ``groups`` experts with the given loads (one empty), in Linear layout except w2."""
    rows = sum(loads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, dim, generator=gen, dtype=dtype, requires_grad=True)
    # Each group takes distinct tokens (a token meets an expert once), like top-k routing does.
    index = torch.cat([torch.randperm(tokens, generator=gen)[:n] for n in loads])
    weight = torch.rand(rows, generator=gen, dtype=dtype, requires_grad=True)
    offsets = torch.tensor(loads).cumsum(0).to(torch.int32)
    width1 = 2 * ffn if glu in (2, 3) else ffn
    w1 = [torch.randn(width1, dim, generator=gen, dtype=dtype, requires_grad=True) for _ in range(groups)]
    w3 = [torch.randn(ffn, dim, generator=gen, dtype=dtype, requires_grad=True) for _ in range(groups)] \
        if glu == 1 else []
    w2 = [torch.randn(ffn, dim, generator=gen, dtype=dtype, requires_grad=True) for _ in range(groups)]
    return x, index, weight, offsets, w1, w3, w2, [1, 1, 0, glu]


def grads_of(fn, case, cotangent):
    x, index, weight, offsets, w1, w3, w2, flags = case
    inputs = [x, weight, *w1, *w3, *w2]
    out = fn(x, index, weight, offsets, w1, w3, w2, flags)
    return out, torch.autograd.grad((out * cotangent).sum(), inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("activation", sorted(ACT))
@pytest.mark.parametrize("glu", [0, 1, 2, 3])
def test_op_equals_the_row_by_row_definition(glu, activation):
    case = make_case(glu)
    cot = torch.randn(case[0].shape[0], 8)
    out, grads = grads_of(lambda *a: ops.routed_ffn(*a, activation), case, cot)
    ref, ref_grads = grads_of(lambda *a: reference_ffn(*a, activation), case, cot)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_torch_ops_path_equals_the_native_kernels(monkeypatch):
    if cpu_native.kernels("silu") is None:
        pytest.skip("no working C++ compiler: the native kernels are not built, both paths would be torch ops")
    case = make_case(1)
    cot = torch.randn(case[0].shape[0], 8)
    out, grads = grads_of(lambda *a: ops.routed_ffn(*a, "silu"), case, cot)
    monkeypatch.setattr(cpu_native, "kernels", lambda activation: None)  # as without a C++ compiler
    out2, grads2 = grads_of(lambda *a: ops.routed_ffn(*a, "silu"), case, cot)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_float64_runs_without_the_fp32_kernels():
    case = make_case(2, dtype=torch.float64)
    cot = torch.randn(case[0].shape[0], 8, dtype=torch.float64)
    out, grads = grads_of(lambda *a: ops.routed_ffn(*a, "gelu"), case, cot)
    ref, ref_grads = grads_of(lambda *a: reference_ffn(*a, "gelu"), case, cot)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_rows_past_the_last_offset_are_not_computed():
    x, index, weight, _, w1, w3, w2, flags = make_case(1, loads=(3, 2, 2))
    cut = torch.tensor([3, 5, 5], dtype=torch.int32)  # the last group's rows are dropped (capacity)
    out = ops.routed_ffn(x, index, weight, cut, w1, w3, w2, flags, "silu")
    keep = reference_ffn(x, index[:5], weight[:5], cut, w1, w3, w2, flags, "silu")
    torch.testing.assert_close(out, keep)


def test_tiles_split_big_groups_without_changing_results(monkeypatch):
    case = make_case(1, tokens=40, loads=(33, 0, 29))
    cot = torch.randn(40, 8)
    out, grads = grads_of(lambda *a: ops.routed_ffn(*a, "silu"), case, cot)
    monkeypatch.setattr(expert_ffn_cpu, "tile_rows", lambda ffn, dtype: 5)  # tiles of 5 rows: 7 and 6 per group
    out2, grads2 = grads_of(lambda *a: ops.routed_ffn(*a, "silu"), case, cot)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_grad_call_saves_nothing(monkeypatch):
    seen = []
    real = expert_ffn_cpu.expert_ffn
    monkeypatch.setattr(expert_ffn_cpu, "expert_ffn", lambda *a: seen.append(a[-1]) or real(*a))
    x, index, weight, offsets, w1, w3, w2, flags = make_case(1)
    with torch.no_grad():
        ops.routed_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu")
    ops.routed_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu")
    assert seen == [False, True]


def test_opcheck_fake_and_autograd_registrations():
    x, index, weight, offsets, w1, w3, w2, flags = make_case(1)
    torch.library.opcheck(torch.ops.moecc.expert_ffn.default,
                          (x, index, weight, offsets, w1, w3, w2, flags, "silu", True))


def test_weights_that_do_not_chain_are_refused():
    x, index, weight, offsets, w1, w3, w2, _ = make_case(1)
    with pytest.raises(ValueError, match="first-layer weight"):
        ops.routed_ffn(x, index, weight, offsets, w1, w3, w2, [1, 1, 0, 2], "silu")  # w1 is not [gate | up]


def test_pooled_memory_is_reused_only_when_free():
    expert_ffn_cpu.clear_pool()
    like = torch.empty(0)
    first = expert_ffn_cpu.pooled_empty(64, 32, like)
    second = expert_ffn_cpu.pooled_empty(64, 32, like)
    assert first.data_ptr() != second.data_ptr()  # the first is still alive: never handed out twice
    ptr = first.data_ptr()
    del first
    third = expert_ffn_cpu.pooled_empty(64, 32, like)
    assert third.data_ptr() == ptr
    view = third[3:5]
    del third
    assert expert_ffn_cpu.pooled_empty(64, 32, like).data_ptr() != ptr  # a view keeps it alive too
    del view


class ClampedExpert(zoo.SwiGLUExpert):
    """SwiGLU-like, but the gate is clamped: random probes may not see the clamp, so it must not be fused."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).clamp(max=50.0)) * self.w3(x))


class GeGLUTanhExpert(zoo.SwiGLUExpert):
    def forward(self, x):
        return self.w2(F.gelu(self.w3(x), approximate="tanh") * self.w1(x))  # gate is w3 here


@pytest.mark.parametrize("expert_cls, kernel", [
    (zoo.SwiGLUExpert, "fused glu-silu"),
    (GeGLUTanhExpert, "fused glu-gelu_tanh"),
    (ClampedExpert, "grouped GEMM"),
    (zoo.GeluExpert, "grouped GEMM"),  # biases
])
def test_pass_fuses_exactly_the_ffns_the_op_computes(expert_cls, kernel):
    model = zoo.LoopMoE(expert_cls=expert_cls)
    compiled, records = compile_and_records(model, torch.randn(2, 5, 16))
    assert records[0].rewritten and records[0].kernel == kernel
    assert_same_forward_backward(model, compiled, torch.randn(2, 5, 16))


def test_fused_ffn_option_off_keeps_grouped_gemms():
    torch._dynamo.reset()
    model = zoo.LoopMoE()
    compiled = torch.compile(model, backend="moecc", options={"moecc.fused_ffn": False})
    import moecc

    compiled(torch.randn(2, 5, 16))
    assert moecc.report(model).blocks[0].kernel == "grouped GEMM"


def test_a_fused_rewrite_that_fails_its_check_falls_back_to_grouped_gemms(monkeypatch):
    from moecc.passes import moe_pass

    real = moe_pass.check_equivalent

    def picky(original, candidate, *args, **kwargs):
        if any(n.target is ops.routed_ffn for n in candidate.graph.nodes):
            return "forced mismatch"
        return real(original, candidate, *args, **kwargs)

    monkeypatch.setattr(moe_pass, "check_equivalent", picky)
    model = zoo.LoopMoE()
    compiled, records = compile_and_records(model, torch.randn(2, 5, 16))
    assert records[0].rewritten and records[0].kernel == "grouped GEMM"
    assert_same_forward_backward(model, compiled, torch.randn(2, 5, 16))


class DropoutExpert(nn.Module):
    """T5/Switch style: relu MLP without biases, with dropout between the layers."""

    def __init__(self, dim, ffn, p=0.0):
        super().__init__()
        self.wi = nn.Linear(dim, ffn, bias=False)
        self.wo = nn.Linear(ffn, dim, bias=False)
        self.p = p

    def forward(self, x):
        return self.wo(F.dropout(F.relu(self.wi(x)), self.p, self.training))


def test_dropout_that_changes_nothing_is_fused_and_real_dropout_is_not():
    model = zoo.LoopMoE(expert_cls=DropoutExpert)
    compiled, records = compile_and_records(model, torch.randn(2, 5, 16))
    assert records[0].kernel == "fused mlp-relu"
    assert_same_forward_backward(model, compiled, torch.randn(2, 5, 16))
    noisy = zoo.LoopMoE(expert_cls=lambda d, f: DropoutExpert(d, f, p=0.5))
    _, records = compile_and_records(noisy, torch.randn(2, 5, 16))
    assert not records[0].kernel.startswith("fused")  # random in training: falls back, never fused


def test_pooled_saved_tensors_survive_two_pending_backwards_and_retain_graph():
    """Two forwards before any backward (micro-batches), then a backward kept for a second one: each backward must
    read its own forward's saved pre-activations, never a buffer the pool handed out again."""
    model = zoo.LoopMoE()
    compiled, records = compile_and_records(model, torch.randn(2, 5, 16))
    assert records[0].kernel == "fused glu-silu"
    params = list(model.parameters())
    xa, xb = torch.randn(2, 5, 16), torch.randn(2, 5, 16) * 3
    ref = [torch.autograd.grad(model(x)[0].square().sum(), params) for x in (xa, xb)]
    loss_a, loss_b = compiled(xa)[0].square().sum(), compiled(xb)[0].square().sum()  # both graphs pending
    got_b = torch.autograd.grad(loss_b, params, retain_graph=True)
    compiled(torch.randn(2, 5, 16))[0].sum().backward()  # more pool traffic while loss_b's graph is retained
    got_b_again = torch.autograd.grad(loss_b, params)
    got_a = torch.autograd.grad(loss_a, params)
    for want, got in ((ref[0], got_a), (ref[1], got_b), (ref[1], got_b_again)):
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)

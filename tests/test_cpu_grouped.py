"""The grouped CPU expert kernel (all experts in one parallel region): results, choice of path, fallback."""
import pytest
import torch
from test_fused_ffn import grads_of, reference_ffn

from moecc.backends import cpu_grouped, cpu_native, expert_ffn_cpu, ops

needs_kernel = pytest.mark.skipif(cpu_grouped.kernels("silu") is None,
                                  reason="no C++ compiler or no MKL: the grouped kernel is not built")


def make_case(glu, flags=(1, 1, 0), loads=(5, 0, 7, 1), dim=8, ffn=12, tokens=9, stacked=False):
    """Random rows for len(loads) experts, weights in the layout ``flags`` = (t1, t3, t2) says, listed or stacked."""
    t1, t3, t2 = flags
    groups, rows = len(loads), sum(loads)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, dim, generator=gen, requires_grad=True)
    index = torch.cat([torch.randperm(tokens, generator=gen)[:n] for n in loads])
    weight = torch.rand(rows, generator=gen, requires_grad=True)
    offsets = torch.tensor(loads).cumsum(0).to(torch.int32)

    def weights(width_out, width_in, transposed):
        shape = (groups, width_out, width_in) if transposed else (groups, width_in, width_out)
        w = (torch.randn(*shape, generator=gen) / width_in**0.5).requires_grad_(True)
        return [w] if stacked else [t.detach().requires_grad_(True) for t in w.unbind(0)]

    w1 = weights(2 * ffn if glu in (2, 3) else ffn, dim, t1)
    w3 = weights(ffn, dim, t3) if glu == 1 else []
    w2 = weights(dim, ffn, t2)
    return x, index, weight, offsets, w1, w3, w2, [t1, t3, t2, glu]


def per_group(ws):
    return list(ws[0].unbind(0)) if len(ws) == 1 and ws[0].dim() == 3 else ws


def reference(case, activation):
    def fn(x, index, weight, offsets, w1, w3, w2, flags):
        return reference_ffn(x, index, weight, offsets, per_group(w1), per_group(w3), per_group(w2), flags,
                             activation)
    return fn


def routed(activation):
    return lambda *a: ops.routed_ffn(*a, activation)



def assert_same(got, want, rtol=1e-4):
    """Outputs and every gradient of (output, gradients) pairs agree within fp32 tolerance."""
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=rtol)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=rtol)

@needs_kernel
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("flags", [(1, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("glu", [0, 1, 2, 3])
def test_grouped_kernel_equals_the_row_by_row_definition(monkeypatch, glu, flags, stacked):
    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    case = make_case(glu, flags, stacked=stacked)
    cot = torch.randn(case[0].shape[0], 8)
    before = cpu_grouped.runs["grouped"]
    out, grads = grads_of(routed("silu"), case, cot)
    assert cpu_grouped.runs["grouped"] == before + 2  # forward and backward both ran the grouped kernel
    ref, ref_grads = grads_of(reference(case, "silu"), case, cot)
    assert_same((out, grads), (ref, ref_grads))


@needs_kernel
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_every_activation_of_the_grouped_kernel(monkeypatch, activation):
    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    case = make_case(1)
    cot = torch.randn(case[0].shape[0], 8)
    out, grads = grads_of(routed(activation), case, cot)
    ref, ref_grads = grads_of(reference(case, activation), case, cot)
    assert_same((out, grads), (ref, ref_grads))


@needs_kernel
def test_both_paths_agree_when_experts_span_several_tiles(monkeypatch):
    """Work items of 5 rows: forward tiles run on either thread, backward tiles accumulate weight gradients."""
    monkeypatch.setattr(expert_ffn_cpu, "tile_rows", lambda ffn, dtype: 5)
    case = make_case(1, loads=(33, 0, 29, 1, 12), tokens=40)
    cot = torch.randn(40, 8)
    results = {}
    for path in cpu_grouped.PATHS:
        monkeypatch.setenv("MOECC_CPU_EXPERTS", path)
        results[path] = grads_of(routed("silu"), case, cot)
    (out, grads), (out2, grads2) = results.values()
    assert_same((out, grads), (out2, grads2), rtol=1e-5)


@needs_kernel
def test_decode_rows_and_dropped_rows(monkeypatch):
    """One token's k rows over many experts (most empty), and rows past the last offset left out."""
    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    case = make_case(1, loads=(0,) * 13 + (1, 0, 1, 1) + (0,) * 15, tokens=1)
    cot = torch.randn(1, 8)
    out, grads = grads_of(routed("silu"), case, cot)
    ref, ref_grads = grads_of(reference(case, "silu"), case, cot)
    assert_same((out, grads), (ref, ref_grads))
    x, index, weight, _, w1, w3, w2, flags = make_case(1, loads=(3, 2, 2))
    cut = torch.tensor([3, 5, 5], dtype=torch.int32)
    out = ops.routed_ffn(x, index, weight, cut, w1, w3, w2, flags, "silu")
    torch.testing.assert_close(out, reference_ffn(x, index[:5], weight[:5], cut, w1, w3, w2, flags, "silu"))


def test_calibration_gives_each_path_its_calls_then_keeps_the_faster():
    key = ("forward", 64, 8, 12, True, 1)
    cpu_grouped.reset()
    seen = []
    calls = 2 * (1 + cpu_grouped.CALIBRATION_CALLS)
    for i in range(calls):  # the grouped path is called first and is slower, except on its dropped first call
        path = cpu_grouped.choose(key)
        seen.append(path)
        cpu_grouped.record(key, path, (0.001 if i == 0 else 0.2) if path == "grouped" else 0.1)
    assert sorted(seen) == sorted(list(cpu_grouped.PATHS) * (1 + cpu_grouped.CALIBRATION_CALLS))
    assert seen[:2] == ["grouped", "per_expert"]  # alternating: a slow spell of the machine hits both
    assert cpu_grouped.decisions() == {key: "per_expert"}
    assert cpu_grouped.choose(key) == "per_expert"
    cpu_grouped.reset()


def test_buckets_separate_rows_per_expert_widths_and_direction():
    b = cpu_grouped.bucket
    assert b("forward", 2048, 8, 512, 1024, 1) != b("forward", 2048, 64, 512, 1024, 1)  # 256 vs 32 rows each
    assert b("forward", 2048, 8, 512, 1024, 1) == b("forward", 1900, 8, 512, 1024, 1)  # same power of two
    assert b("forward", 16, 8, 512, 1024, 1) != b("backward", 16, 8, 512, 1024, 1)
    assert b("forward", 16, 8, 512, 1024, 1) != b("forward", 16, 8, 512, 256, 1)


@needs_kernel
def test_real_calls_calibrate_a_bucket(monkeypatch):
    monkeypatch.delenv("MOECC_CPU_EXPERTS", raising=False)
    cpu_grouped.reset()
    case = make_case(1)
    before = dict(cpu_grouped.runs)
    calibration = 2 * (1 + cpu_grouped.CALIBRATION_CALLS)
    with torch.no_grad():
        for _ in range(calibration + 2):
            ops.routed_ffn(*case, "silu")
    ran = {p: cpu_grouped.runs[p] - before.get(p, 0) for p in cpu_grouped.PATHS}
    (key, winner), = cpu_grouped.decisions().items()
    assert key[0] == "forward" and winner in cpu_grouped.PATHS
    assert ran[winner] == calibration // 2 + 2
    assert sum(ran.values()) == calibration + 2
    cpu_grouped.reset()


def test_float64_and_non_contiguous_weights_use_the_per_expert_path(monkeypatch):
    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    x, index, weight, offsets, w1, w3, w2, flags = make_case(1)
    before = cpu_grouped.runs["per_expert"]
    w1_strided = [w.detach().t().contiguous().t() for w in w1]  # same values, column-major
    out = ops.routed_ffn(x, index, weight, offsets, w1_strided, w3, w2, flags, "silu")
    torch.testing.assert_close(out, reference_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu"),
                               atol=1e-5, rtol=1e-4)
    double = [t.double() if t.is_floating_point() else t for t in (x, index, weight, offsets)]
    ops.routed_ffn(*double, [w.double() for w in w1], [w.double() for w in w3], [w.double() for w in w2], flags,
                   "silu")
    assert cpu_grouped.runs["per_expert"] == before + 2


def test_without_a_working_compiler_the_per_expert_path_runs(monkeypatch):
    """A compiler that does not exist: the kernel is not built, the op still computes the definition."""
    from torch._inductor import config
    from torch._inductor.utils import fresh_cache

    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    cpu_grouped.kernels.cache_clear()
    cpu_native.sort_kernel.cache_clear()
    try:
        with fresh_cache(), config.patch({"cpp.cxx": ("/nonexistent/bin/g++",)}):
            assert cpu_grouped.kernels("relu") is None
            assert cpu_native.sort_kernel() is None
            order_N, _, offsets_S = ops.sort_by_slot(torch.tensor([2, 0, 2, 1]), 3)  # the torch-ops sort
            assert order_N.tolist() == [1, 3, 0, 2] and offsets_S.tolist() == [1, 2, 4]
            case = make_case(1)
            cot = torch.randn(case[0].shape[0], 8)
            before = cpu_grouped.runs["per_expert"]
            out, grads = grads_of(routed("relu"), case, cot)
            assert cpu_grouped.runs["per_expert"] == before + 2
    finally:
        cpu_grouped.kernels.cache_clear()
        cpu_native.sort_kernel.cache_clear()
    ref, ref_grads = grads_of(reference(case, "relu"), case, cot)
    assert_same((out, grads), (ref, ref_grads))


@needs_kernel
def test_weights_moved_to_new_memory_are_read_from_there(monkeypatch):
    """The address table of a weight list is remembered; a parameter given new storage must not be read stale."""
    monkeypatch.setenv("MOECC_CPU_EXPERTS", "grouped")
    x, index, weight, offsets, w1, w3, w2, flags = make_case(1)
    with torch.no_grad():
        ops.routed_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu")
        w1[0].data = torch.randn_like(w1[0])  # what loading a checkpoint with assign=True does
        out = ops.routed_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu")
    torch.testing.assert_close(out, reference_ffn(x, index, weight, offsets, w1, w3, w2, flags, "silu"),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rows,slots", [(0, 4), (1, 256), (37, 5), (5000, 64)])
def test_slot_sort_is_the_stable_argsort_its_inverse_and_end_offsets(rows, slots):
    slot_N = torch.randint(0, slots, (rows,), generator=torch.Generator().manual_seed(rows))
    order_N, inverse_N, offsets_S = ops.sort_by_slot(slot_N, slots)
    expected = torch.argsort(slot_N, stable=True)
    assert torch.equal(order_N, expected)
    assert torch.equal(order_N[inverse_N], torch.arange(rows))
    assert offsets_S.dtype == torch.int32
    assert torch.equal(offsets_S, torch.bincount(slot_N, minlength=slots).cumsum(0).to(torch.int32))


def test_slot_sort_refuses_ids_outside_the_slots_by_name():
    with pytest.raises(ValueError, match=r"slot ids must lie in \[0, 4\), got ids from 0 to 5"):
        ops.sort_by_slot(torch.tensor([0, 5, 1]), 4)
    with pytest.raises(ValueError, match="got ids from -1 to 1"):
        ops.sort_by_slot(torch.tensor([1, -1]), 4)

"""The Triton kernels of the expert-slot ops, run on CPU by Triton's interpreter against ``kernels_cpu``.

Shapes are tiny (the interpreter runs each program in Python) but chosen so that every masking path runs: several
m-tiles per group, widths that are not multiples of the tile, empty groups first, in the middle and last, rows past
the last offset. Kernel configs are passed explicitly where a test needs more than one tile.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its @jit decorators read it

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton",
                    reason="triton is not installed: pip install triton (the kernels run under its interpreter)")

from moecc.backends import kernels_cpu, kernels_cuda, ops  # noqa: E402
from moecc.backends import kernels_triton as kt  # noqa: E402

SMALL = kt.KernelConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def make_weight(groups: int, width_in: int, width_out: int, transpose_w: bool, dtype=torch.float32) -> torch.Tensor:
    shape = (groups, width_out, width_in) if transpose_w else (groups, width_in, width_out)
    return torch.randn(shape, dtype=dtype) / width_in ** 0.5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# grouped_mm forward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose_w", [True, False])
@pytest.mark.parametrize("counts", [[7, 0, 33, 1], [0, 20, 0], [1], [0, 0, 41]],
                         ids=["ragged_with_empty", "empty_first_and_last", "single_row", "all_rows_in_last_group"])
def test_grouped_mm_matches_reference(counts, transpose_w):
    width_in, width_out = 24, 40
    x = torch.randn(sum(counts), width_in)
    w = make_weight(len(counts), width_in, width_out, transpose_w)
    offsets = offsets_of(counts)
    y = kt.grouped_mm_triton(x, [w], offsets, transpose_w, SMALL)
    assert_close(y, kernels_cpu.grouped_mm(x, [w], offsets, transpose_w))


@pytest.mark.parametrize("transpose_w", [True, False])
def test_grouped_mm_list_weights_read_through_pointer_table(transpose_w):
    counts = [9, 0, 18]
    x = torch.randn(sum(counts), 32)
    weights = list(make_weight(3, 32, 20, transpose_w).unbind(0))
    weights = [w.clone() for w in weights]  # separate allocations, as a ModuleList's are
    offsets = offsets_of(counts)
    y = kt.grouped_mm_triton(x, weights, offsets, transpose_w, SMALL)
    assert_close(y, kernels_cpu.grouped_mm(x, weights, offsets, transpose_w))


def test_grouped_mm_list_weights_with_mixed_strides_are_stacked():
    counts = [5, 6]
    x = torch.randn(11, 16)
    weights = [torch.randn(16, 16), torch.randn(16, 16).t()]  # same shape, different strides
    offsets = offsets_of(counts)
    y = kt.grouped_mm_triton(x, weights, offsets, True, SMALL)
    assert_close(y, kernels_cpu.grouped_mm(x, weights, offsets, True))


def test_grouped_mm_rows_past_last_offset_are_zero():
    x = torch.randn(30, 16)
    w = make_weight(2, 16, 16, True)
    offsets = offsets_of([4, 9])  # rows 13..29 belong to no group
    y = torch.full((30, 16), float("nan"))
    kt._launch_grouped_mm(x, [w], offsets, True, y, 16, SMALL)
    assert torch.all(y[13:] == 0)
    assert_close(y, kernels_cpu.grouped_mm(x, [w], offsets, True))


def test_grouped_mm_reads_strided_input():
    counts = [10, 12]
    x = torch.randn(24, sum(counts)).t()  # column-major [N, I]
    w = make_weight(2, 24, 16, False)
    offsets = offsets_of(counts)
    assert_close(kt.grouped_mm_triton(x, [w], offsets, False, SMALL), kernels_cpu.grouped_mm(x, [w], offsets, False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose_w", [True, False])
def test_grouped_mm_half_precision_accumulates_in_fp32(dtype, transpose_w):
    counts = [12, 0, 21]
    x = torch.randn(sum(counts), 48, dtype=dtype)
    w = make_weight(3, 48, 32, transpose_w, dtype)
    offsets = offsets_of(counts)
    y = kt.grouped_mm_triton(x, [w], offsets, transpose_w, SMALL)
    assert y.dtype == dtype
    assert_close(y, kernels_cpu.grouped_mm(x.float(), [w.float()], offsets, transpose_w), dtype)


def test_grouped_mm_with_no_rows_returns_empty():
    w = make_weight(2, 16, 16, True)
    y = kt.grouped_mm_triton(torch.randn(0, 16), [w], offsets_of([0, 0]), True, SMALL)
    assert y.shape == (0, 16)


# ---------------------------------------------------------------------------------------------------------------
# grouped_mm_wgrad and the backward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose_w", [True, False])
@pytest.mark.parametrize("counts", [[7, 0, 33, 1], [0, 0, 19]], ids=["ragged_with_empty", "all_rows_in_last_group"])
def test_grouped_mm_wgrad_matches_reference(counts, transpose_w):
    x = torch.randn(sum(counts), 24)
    dy = torch.randn(sum(counts), 40)
    offsets = offsets_of(counts)
    dw = kt.grouped_mm_wgrad_triton(x, dy, offsets, transpose_w, SMALL)
    assert_close(dw, kernels_cpu.grouped_mm_wgrad(x, dy, offsets, transpose_w))


def test_grouped_mm_wgrad_of_empty_group_is_zero():
    x, dy = torch.randn(10, 16), torch.randn(10, 16)
    dw = kt.grouped_mm_wgrad_triton(x, dy, offsets_of([10, 0]), True, SMALL)
    assert torch.all(dw[1] == 0)
    assert dw[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_mm_wgrad_half_precision(dtype):
    counts = [20, 0, 13]
    x, dy = torch.randn(33, 32, dtype=dtype), torch.randn(33, 16, dtype=dtype)
    offsets = offsets_of(counts)
    dw = kt.grouped_mm_wgrad_triton(x, dy, offsets, True, SMALL)
    assert dw.dtype == dtype
    assert_close(dw, kernels_cpu.grouped_mm_wgrad(x.float(), dy.float(), offsets, True), dtype)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
@pytest.mark.parametrize("transpose_w", [True, False])
def test_backward_by_triton_kernels_matches_op_autograd(transpose_w, stacked):
    """ops.py's backward is grouped_mm with the layout flipped plus grouped_mm_wgrad: both by Triton here."""
    counts = [6, 0, 17, 3]
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 24, requires_grad=True)
    w = make_weight(4, 24, 16, transpose_w)
    weights = [w.clone().requires_grad_()] if stacked else [wg.clone().requires_grad_() for wg in w.unbind(0)]
    dy = torch.randn(sum(counts), 16)
    ops.grouped_mm(x, weights, offsets, transpose_w).backward(dy)
    dw_expected = weights[0].grad if stacked else torch.stack([wg.grad for wg in weights])

    dx = kt.grouped_mm_triton(dy, [wg.detach() for wg in weights], offsets, not transpose_w, SMALL)
    dw = kt.grouped_mm_wgrad_triton(x.detach(), dy, offsets, transpose_w, SMALL)
    assert_close(dx, x.grad)
    assert_close(dw, dw_expected)


# ---------------------------------------------------------------------------------------------------------------
# ScatterMoE-style fused variants
# ---------------------------------------------------------------------------------------------------------------


def routed_rows(num_tokens: int, top_k: int, num_experts: int):
    """(token of each sorted row, routing weight of each sorted row, expert end offsets) of a random top-k routing."""
    expert_TK = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    expert_TK[expert_TK == 1] = 0  # leave expert 1 empty
    weight_TK = torch.softmax(torch.randn(num_tokens, top_k), -1)
    expert_N = expert_TK.flatten()
    order_N = torch.argsort(expert_N, stable=True)
    offsets = torch.bincount(expert_N, minlength=num_experts).cumsum(0).to(torch.int32)
    return order_N // top_k, weight_TK.flatten()[order_N], offsets, order_N


@pytest.mark.parametrize("transpose_w", [True, False])
def test_gather_grouped_mm_equals_grouped_mm_of_gathered_rows(transpose_w):
    token_N, _, offsets, _ = routed_rows(num_tokens=13, top_k=2, num_experts=4)
    x_TI = torch.randn(13, 24)
    w = make_weight(4, 24, 20, transpose_w)
    y = kt.gather_grouped_mm(x_TI, token_N, [w], offsets, transpose_w, SMALL)
    assert_close(y, kernels_cpu.grouped_mm(x_TI[token_N], [w], offsets, transpose_w))


def test_grouped_mm_scatter_add_combines_weighted_rows_per_token():
    token_N, weight_N, offsets, _ = routed_rows(num_tokens=13, top_k=2, num_experts=4)
    h_NI = torch.randn(token_N.shape[0], 24)
    w = make_weight(4, 24, 20, True)
    out = kt.grouped_mm_scatter_add(h_NI, [w], offsets, True, token_N, weight_N, 13, SMALL)
    y_NO = kernels_cpu.grouped_mm(h_NI, [w], offsets, True)
    expected = torch.zeros(13, 20).index_add_(0, token_N, y_NO * weight_N[:, None])
    assert_close(out, expected)


def test_grouped_mm_scatter_add_ignores_rows_past_last_offset():
    h_NI = torch.randn(10, 16)
    w = make_weight(1, 16, 16, True)
    token_N = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    offsets = offsets_of([6])  # rows 6..9 are padding
    out = kt.grouped_mm_scatter_add(h_NI, [w], offsets, True, token_N, None, 4, SMALL)
    expected = torch.zeros(4, 16).index_add_(0, token_N[:6], h_NI[:6] @ w[0].t())
    assert_close(out, expected)


def test_grouped_mm_scatter_writes_each_row_to_its_destination():
    token_N, weight_N, offsets, order_N = routed_rows(num_tokens=9, top_k=2, num_experts=4)
    h_NI = torch.randn(18, 16)
    w = make_weight(4, 16, 24, False)
    y = kt.grouped_mm_scatter(h_NI, [w], offsets, False, order_N, 18, weight_N, SMALL)
    expected = torch.empty(18, 24)
    expected[order_N] = kernels_cpu.grouped_mm(h_NI, [w], offsets, False) * weight_N[:, None]
    assert_close(y, expected)


def swiglu_reference(x_ND, w13, offsets):
    gate_up = ops.grouped_mm(x_ND, [w13], offsets, True)
    width_ffn = w13.shape[1] // 2
    return torch.nn.functional.silu(gate_up[:, :width_ffn]) * gate_up[:, width_ffn:]


@pytest.mark.parametrize("gather", [False, True], ids=["sorted_rows", "gathered_rows"])
def test_grouped_swiglu_forward(gather):
    token_N, _, offsets, _ = routed_rows(num_tokens=11, top_k=2, num_experts=4)
    x_TD = torch.randn(11, 24)
    w13 = make_weight(4, 24, 2 * 20, True)
    if gather:
        h = kt.grouped_swiglu(x_TD, [w13], offsets, token_N, SMALL)
    else:
        h = kt.grouped_swiglu(x_TD[token_N], [w13], offsets, None, SMALL)
    assert h.shape == (22, 20)
    assert_close(h, swiglu_reference(x_TD[token_N], w13, offsets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_swiglu_half_precision(dtype):
    token_N, _, offsets, _ = routed_rows(num_tokens=11, top_k=2, num_experts=4)
    x_TD = torch.randn(11, 32, dtype=dtype)
    w13 = make_weight(4, 32, 2 * 16, True, dtype)
    h = kt.grouped_swiglu(x_TD, [w13], offsets, token_N, SMALL)
    assert_close(h, swiglu_reference(x_TD.float()[token_N], w13.float(), offsets), dtype)


def test_wgrad_with_gathered_rows_equals_wgrad_of_gathered_copy():
    token_N, _, offsets, _ = routed_rows(num_tokens=10, top_k=2, num_experts=4)
    x_TI, dy_NO = torch.randn(10, 24), torch.randn(20, 16)
    dw = kt.grouped_mm_wgrad_triton(x_TI, dy_NO, offsets, True, SMALL, row_src_N=token_N)
    assert_close(dw, kernels_cpu.grouped_mm_wgrad(x_TI[token_N], dy_NO, offsets, True))


def moe_ffn_reference(x_TD, token_N, weight_N, offsets, w13, w2):
    h = swiglu_reference(x_TD[token_N], w13, offsets)
    y_ND = ops.grouped_mm(h, [w2], offsets, True)
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * weight_N[:, None])


def test_fused_moe_ffn_forward_and_backward_match_reference():
    token_N, weight_N, offsets, _ = routed_rows(num_tokens=12, top_k=2, num_experts=4)
    x_TD = torch.randn(12, 16)
    w13, w2 = make_weight(4, 16, 2 * 24, True), make_weight(4, 24, 16, True)
    dout = torch.randn(12, 16)
    leaves = [t.clone().requires_grad_() for t in (x_TD, weight_N, w13, w2)]
    ref_leaves = [t.clone().requires_grad_() for t in (x_TD, weight_N, w13, w2)]

    x, wn, a, b = leaves
    out = kt.fused_moe_ffn(x, token_N, wn, offsets, a, b)
    out.backward(dout)
    x, wn, a, b = ref_leaves
    expected = moe_ffn_reference(x, token_N, wn, offsets, a, b)
    expected.backward(dout)

    assert_close(out, expected)
    for name, got, want in zip(["x", "row_weight", "w13", "w2"], leaves, ref_leaves):
        assert got.grad is not None, name
        assert_close(got.grad, want.grad)


# ---------------------------------------------------------------------------------------------------------------
# Clean-up kernels used after torch._grouped_mm
# ---------------------------------------------------------------------------------------------------------------


def test_zero_tail_rows_zeroes_only_rows_past_last_offset():
    y = torch.full((40, 24), float("nan"))
    y[:21] = 1.0
    kt.zero_tail_rows(y, offsets_of([5, 16]), block_m=16, block_n=16)
    assert torch.all(y[:21] == 1.0) and torch.all(y[21:] == 0)


def test_zero_empty_groups_zeroes_only_empty_groups():
    dw = torch.full((3, 4, 8), float("nan"))
    dw[1] = 2.0
    kt.zero_empty_groups(dw, offsets_of([0, 5, 0]), block=16)
    assert torch.all(dw[0] == 0) and torch.all(dw[2] == 0) and torch.all(dw[1] == 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Tuned-config cache and selection
# ---------------------------------------------------------------------------------------------------------------


def test_tune_key_buckets_rows_to_a_power_of_two():
    key = kt.tune_key("grouped_mm", 8, 4096, 14336, 30000, torch.bfloat16, "NVIDIA H100", "stacked_t")
    assert key == kt.tune_key("grouped_mm", 8, 4096, 14336, 32768, torch.bfloat16, "NVIDIA H100", "stacked_t")
    assert key != kt.tune_key("grouped_mm", 8, 4096, 14336, 32769, torch.bfloat16, "NVIDIA H100", "stacked_t")
    assert "N<=32768" in key and "bfloat16" in key


def test_choose_fastest_picks_least_time_and_drops_failing_candidates():
    def fails():
        raise RuntimeError("out of shared memory")

    times = {"a": 3.0, "b": 1.5, "c": 2.0}
    candidates = {"a": lambda: "a", "b": lambda: "b", "c": lambda: "c", "broken": fails}
    best, measured = kt.choose_fastest(candidates, lambda fn: times[fn()] if fn() in times else 0.0)
    assert best == "b"
    assert set(measured) == {"a", "b", "c"}


def test_tune_cache_round_trips_through_json(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setattr(kt, "TUNE_CACHE", {"k": {"impl": "triton", "config": {"block_m": 128}, "times_ms": {}}})
    kt.save_tune_cache(str(path))
    assert json.loads(path.read_text())["k"]["config"]["block_m"] == 128
    monkeypatch.setattr(kt, "TUNE_CACHE", {})
    kt.load_tune_cache(str(path))
    assert kt.TUNE_CACHE["k"]["impl"] == "triton"


def test_untuned_shape_runs_conservative_config_without_measuring(monkeypatch):
    seen = []
    monkeypatch.setattr(kt, "choose_fastest", lambda *a: pytest.fail("must not measure on CPU / interpreter"))
    monkeypatch.setattr(kt, "grouped_mm_triton", lambda *a: seen.append(a[4]) or a[0])
    kt.grouped_mm(torch.randn(4, 16), [make_weight(1, 16, 16, True)], offsets_of([4]), True)
    assert seen == [None]  # None: grouped_mm_triton's default (DEFAULT_CONFIG on CUDA)


def test_cached_choice_is_used(monkeypatch):
    x, w, offsets = torch.randn(4, 16), make_weight(1, 16, 16, True), offsets_of([4])
    key = kt.tune_key("grouped_mm", 1, 16, 16, 4, torch.float32, "cpu", "stacked_t")
    monkeypatch.setattr(kt, "TUNE_CACHE", {key: {"impl": "triton", "config": kt.asdict(SMALL), "times_ms": {}}})
    seen = []
    monkeypatch.setattr(kt, "grouped_mm_triton", lambda *a: seen.append(a[4]) or a[0])
    kt.grouped_mm(x, [w], offsets, True)
    assert seen == [SMALL]


def test_first_use_measures_records_winner_and_writes_cache_file(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("MOECC_TUNE_CACHE", str(path))
    monkeypatch.setattr(kt, "TUNE_CACHE", {})
    monkeypatch.setattr(kt, "_autotune_enabled", lambda x: True)
    measured = []

    def fake_time_ms(fn):  # config 2 is "fastest"; nothing is launched
        measured.append(fn)
        return 1.0 if len(measured) == 3 else 5.0

    monkeypatch.setattr(kt, "cuda_time_ms", fake_time_ms)
    seen = []
    monkeypatch.setattr(kt, "grouped_mm_triton", lambda *a: seen.append(a[4]) or a[0])
    x, w, offsets = torch.randn(4, 16), make_weight(1, 16, 16, True), offsets_of([4])
    kt.grouped_mm(x, [w], offsets, True)
    assert len(measured) == len(kt.TUNE_CONFIGS)  # fp32: no torch._grouped_mm candidate
    assert seen == [kt.TUNE_CONFIGS[2]]
    (entry,) = json.loads(path.read_text()).values()
    assert entry["impl"] == "triton" and kt.KernelConfig(**entry["config"]) == kt.TUNE_CONFIGS[2]

    kt.grouped_mm(x, [w], offsets, True)
    assert len(measured) == len(kt.TUNE_CONFIGS)  # second call: from the cache, no measuring
    assert seen == [kt.TUNE_CONFIGS[2]] * 2


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


def test_cuda_kernels_are_registered_on_the_ops():
    assert ops.CUDA_KERNELS
    for name in ("moecc::grouped_mm", "moecc::grouped_mm_wgrad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


def test_cuda_entry_points_run_the_triton_kernels():
    counts = [3, 0, 14]
    x, dy = torch.randn(17, 16), torch.randn(17, 24)
    w, offsets = make_weight(3, 16, 24, True), offsets_of(counts)
    assert_close(kernels_cuda.grouped_mm_cuda(x, [w], offsets, True), kernels_cpu.grouped_mm(x, [w], offsets, True))
    assert_close(kernels_cuda.grouped_mm_wgrad_cuda(x, dy, offsets, True),
                 kernels_cpu.grouped_mm_wgrad(x, dy, offsets, True))


def test_import_moecc_does_not_import_the_triton_kernels():
    """Only the first CUDA call imports them. (torch._dynamo itself imports triton when it is installed.)"""
    code = "import sys, moecc.backends.ops; assert 'moecc.backends.kernels_triton' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed: Triton's bundled ptxas)
# ---------------------------------------------------------------------------------------------------------------

AOT_CHECK = """
import json, sys, warnings, torch
warnings.filterwarnings("ignore")
from moecc.backends import kernels_triton as kt
out = {}
big = max(kt.TUNE_CONFIGS, key=lambda c: c.block_m * c.block_n * c.block_k * c.num_stages)
for name, kernel, config, flags in [
    ("default", "grouped_mm", kt.DEFAULT_CONFIG, {}),
    ("largest_tuned", "grouped_mm", big, {}),
    ("gather_swiglu", "grouped_mm", kt.DEFAULT_CONFIG, {"GATHER": True, "SWIGLU": True}),
    ("scatter_add", "grouped_mm", kt.DEFAULT_CONFIG, {"STORE_MODE": kt.STORE_SCATTER_ADD, "SCALE_ROWS": True}),
    ("pointer_table", "grouped_mm", kt.DEFAULT_CONFIG, {"W_LIST": True}),
    ("wgrad", "grouped_mm_wgrad", kt.DEFAULT_CONFIG, {}),
]:
    out[name] = kt.compile_for_target(kernel, torch.bfloat16, config, 90, **flags)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_pipelined_and_within_shared_memory():
    """Every variant lowers to sm_90 code with a software-pipelined K loop, and the largest tuned config fits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, meta in compiled.items():
        assert meta["pipelined"], name
        assert meta["shared"] <= kt.SHARED_MEMORY_LIMIT[90], (name, meta["shared"])
    # Weights read through the pointer table are still vectorised and pipelined like stacked ones.
    assert compiled["pointer_table"]["async_copies"] == compiled["default"]["async_copies"]

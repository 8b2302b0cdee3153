"""Triton kernels of the expert-slot ops (CUDA), and their Python launchers.

Legend for shape suffixes: T tokens, D model dim, F ffn dim, G weight groups (one per slot), N routed rows (sorted
by group), I/O a grouped GEMM's input/output width, K the contraction of a tile loop.

This module imports triton at import time; ``backends/kernels_cuda.py`` imports it lazily, on the first CUDA call,
so that ``import moecc`` on a CPU-only machine never pays for triton. The same kernels run on CPU tensors under
``TRITON_INTERPRET=1``: that is how ``tests/test_triton_kernels.py`` checks them without a GPU.

Kernels
-------
- ``_grouped_mm_kernel``: one launch for all groups. Its m-tiles are laid over the ragged groups *on the device*:
  each program reads the G end offsets, computes how many BLOCK_M tiles each group needs, and finds its own group by
  a prefix sum, so the host never reads the offsets (no sync, CUDA-graph safe). The grid is the upper bound
  ``cdiv(N, BLOCK_M) + G + 1`` m-tiles; programs past the last tile return at once. One virtual group past the last
  offset covers rows ``offsets[-1]:N`` and writes zeros there (the op's contract). Optional, by constexpr flags:
  A rows gathered through an index (ScatterMoE's gather: no permuted copy of x), a per-row scale and a scatter or
  atomic scatter-add of the result rows (ScatterMoE's scatter: no un-permuted copy of y), and a SwiGLU epilogue that
  computes gate and up from the two halves of one ``[G, 2F, D]`` weight and stores ``silu(gate) * up``.
- ``_grouped_wgrad_kernel``: ``dw[g] = x[rows of g].T @ dy[rows of g]``, one program per (g, output tile), looping
  over the group's rows; an empty group stores zeros. Optionally gathers x rows through an index.
- ``_zero_tail_kernel`` / ``_zero_empty_groups_kernel``: clean up after ``torch._grouped_mm``, which leaves rows
  past ``offsets[-1]`` (and, on some GPUs, the weight gradients of empty groups) uninitialised (pytorch#154557,
  pytorch#172439).

All accumulate in fp32 and store in the output's dtype (bf16, fp16 or fp32).

Choosing an implementation
--------------------------
``grouped_mm`` and ``grouped_mm_wgrad`` pick, per (op, groups, I, O, row bucket, dtype, device name, weight
layout), between Triton tile configurations and ``torch._grouped_mm``, by timing each once on the first call with
that key, and keep the winner in an in-process dict (optionally a JSON file named by ``MOECC_TUNE_CACHE``). Until a
key is tuned, or where tuning is off (``MOECC_AUTOTUNE=0``, CUDA-graph capture, the interpreter), the conservative
``DEFAULT_CONFIG`` runs: never the fastest, never a cliff.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels_cpu import is_stacked

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Scatter modes of the grouped GEMM epilogue.
STORE_ROWS = 0  # y[r] = acc (row r of the sorted layout)
STORE_SCATTER = 1  # y[dest[r]] = acc (un-permute; deterministic)
STORE_SCATTER_ADD = 2  # y[dest[r]] += acc (combine over top-k; fp32 atomics, order not deterministic)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _group_of_tile(offsets_ptr, pid_m, N, G, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """(group, first row, end row) of m-tile ``pid_m``; group G is the tail past the last offset, > G is no tile.

    Group g owns rows ``[offsets[g-1], offsets[g])`` and ``cdiv(rows, BLOCK_M)`` m-tiles, laid out in group order.
    """
    idx = tl.arange(0, BLOCK_G)
    ends = tl.load(offsets_ptr + idx, mask=idx < G, other=0)
    ends = tl.minimum(tl.where(idx < G, ends, N), N)
    starts = tl.load(offsets_ptr + idx - 1, mask=(idx >= 1) & (idx <= G), other=0)
    starts = tl.minimum(tl.where(idx <= G, starts, N), N)
    counts = tl.maximum(ends - starts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    g = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    is_g = idx == g
    tile_begin = tl.sum(tl.where(is_g, tile_end - tiles, 0), 0)
    row_begin = tl.sum(tl.where(is_g, starts, 0), 0) + (pid_m - tile_begin) * BLOCK_M
    row_end = tl.sum(tl.where(is_g, ends, 0), 0)
    return g, row_begin, row_end


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, w_ptrs_ptr, offsets_ptr, y_ptr,
    row_src_ptr, row_dest_ptr, row_scale_ptr,
    N, I, O, G, num_m_tiles,
    stride_xn, stride_xi,
    stride_wg, stride_wk, stride_wo, half_offset_w,
    stride_yn, stride_yo,
    W_LIST: tl.constexpr, GATHER: tl.constexpr, SCALE_ROWS: tl.constexpr, STORE_MODE: tl.constexpr,
    SWIGLU: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[rows of g] = x[src(rows)] @ B_g, with B_g[k, o] = *(w_g + k * stride_wk + o * stride_wo).

    The strides encode the layout: stacked ``[G, O, I]`` (transpose_w) and ``[G, I, O]`` differ only in which of
    stride_wk / stride_wo is 1, and the backward's flipped call reuses the same kernel.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(O, BLOCK_N)
    # Grouped ordering (as in Triton's matmul tutorial): consecutive programs share B columns, for L2 reuse.
    pids_per_band = GROUP_M * num_n_tiles
    band = pid // pids_per_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    g, row_begin, row_end = _group_of_tile(offsets_ptr, pid_m, N, G, BLOCK_G, BLOCK_M)
    if g > G:
        return
    rows = row_begin + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < O
    if g == G:
        # Rows past the last offset: zeros in the sorted layout; they belong to no token when scattering.
        if STORE_MODE == 0:
            y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :] * stride_yo
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
            tl.store(y_ptrs, zeros, mask=row_mask[:, None] & col_mask[None, :])
        return

    if GATHER:
        src = tl.load(row_src_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    if W_LIST:
        w_base = tl.load(w_ptrs_ptr + g).to(tl.pointer_type(w_ptr.dtype.element_ty))
        # The launcher admits only 16-byte aligned tables; without this hint B's loads are not vectorised and the
        # K loop pipelines only A (checked with compile_for_target).
        w_base = tl.multiple_of(w_base, 16)
    else:
        w_base = w_ptr + g.to(tl.int64) * stride_wg

    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * stride_xn + ks[None, :] * stride_xi
    b_ptrs = w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(I, BLOCK_K)):
        k_mask = ks < I - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_F32:
            # The interpreter's bf16 dot is wrong (numpy has no bf16); only ever set under TRITON_INTERPRET.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if SWIGLU:
            b_up = tl.load(b_ptrs + half_offset_w, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_F32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_xi
        b_ptrs += BLOCK_K * stride_wk

    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if SCALE_ROWS:
        scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if STORE_MODE == 0:
        dest = rows.to(tl.int64)
    else:
        dest = tl.load(row_dest_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    y_ptrs = y_ptr + dest[:, None] * stride_yn + cols[None, :] * stride_yo
    if STORE_MODE == 2:
        tl.atomic_add(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, offsets_ptr, dw_ptr, row_src_ptr,
    I, O,
    stride_xn, stride_xi, stride_dyn, stride_dyo,
    stride_dwg, stride_dwi, stride_dwo,
    GATHER: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[g][i, o] = sum over rows r of group g of x[src(r), i] * dy[r, o]; zeros for an empty group."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_n_tiles = tl.cdiv(O, BLOCK_N)
    pid_m = pid // num_n_tiles
    pid_n = pid % num_n_tiles
    start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offsets_ptr + g)

    i_idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i_idx < I
    o_mask = o_idx < O
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < end
        if GATHER:
            src = tl.load(row_src_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        a = tl.load(x_ptr + i_idx[:, None] * stride_xi + src[None, :] * stride_xn,
                    mask=i_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dyn + o_idx[None, :] * stride_dyo,
                    mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + i_idx[:, None] * stride_dwi + o_idx[None, :] * stride_dwo
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_mask[:, None] & o_mask[None, :])


@triton.jit
def _zero_tail_kernel(y_ptr, offsets_ptr, N, O, G, stride_yn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[offsets[G-1]:N] = 0, reading the end on the device; tiles wholly before it return at once."""
    end = tl.load(offsets_ptr + G - 1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M + BLOCK_M <= end:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows >= end)[:, None] & (rows < N)[:, None] & (cols < O)[None, :]
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :], zeros, mask=mask)


@triton.jit
def _zero_empty_groups_kernel(dw_ptr, offsets_ptr, group_numel, BLOCK: tl.constexpr):
    """dw[g] = 0 for each group g with no rows (dw contiguous, ``group_numel`` elements per group)."""
    g = tl.program_id(1)
    start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offsets_ptr + g)
    if end > start:
        return
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    zeros = tl.zeros((BLOCK,), dtype=dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + g.to(tl.int64) * group_numel + idx, zeros, mask=idx < group_numel)


# --------------------------------------------------------------------------------------------------------------------
# Configurations and the tuned-config cache
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tile shape and launch parameters of one Triton grouped-GEMM launch."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Fits every GPU from sm80 on (about 36 KiB of shared memory at 3 stages in bf16), keeps 64-row tiles so that a
# small group wastes at most 63 rows, and loses to a tuned config by a small factor, not by an order of magnitude.
DEFAULT_CONFIG = KernelConfig()
# Under the interpreter each program runs in Python: small tiles, and tests pick their own to cover the masking.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=32, block_k=16, group_m=4, num_warps=1, num_stages=1)

# Candidates timed on first use of a key. 128x256x64 at 3 stages needs about 144 KiB of shared memory (sm80, sm90).
TUNE_CONFIGS = (
    DEFAULT_CONFIG,
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
    KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
)
TUNE_CONFIGS_WGRAD = (
    KernelConfig(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=3),
    KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=4),
    KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
)

TUNE_CACHE: dict[str, dict] = {}
"""key -> {"impl": "triton" | "torch_grouped_mm", "config": KernelConfig fields, "times_ms": {...}}."""
_cache_file_loaded = False


def tune_key(op: str, groups: int, width_in: int, width_out: int, rows: int, dtype: torch.dtype, device: str,
             layout: str) -> str:
    """Key of the tuned-config cache. Rows are bucketed to a power of two: a new batch size reuses its bucket."""
    bucket = 1 << max(int(rows) - 1, 0).bit_length()
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{op}|G={groups}|I={width_in}|O={width_out}|N<={bucket}|{dtype_name}|{device}|{layout}"


def _cache_path() -> str | None:
    return os.environ.get("MOECC_TUNE_CACHE") or None


def load_tune_cache(path: str | None = None) -> None:
    """Merge a JSON cache file (written by ``save_tune_cache``) into ``TUNE_CACHE``; a missing file is no error."""
    path = path or _cache_path()
    if path and os.path.exists(path):
        with open(path) as f:
            TUNE_CACHE.update(json.load(f))


def save_tune_cache(path: str | None = None) -> None:
    path = path or _cache_path()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(TUNE_CACHE, f, indent=1, sort_keys=True)


def choose_fastest(candidates: dict[str, Callable[[], object]], time_ms: Callable[[Callable[[], object]], float]
                   ) -> tuple[str, dict[str, float]]:
    """Name of the fastest candidate and every candidate's time; one that raises is dropped, not fatal."""
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = float(time_ms(fn))
        except Exception:  # a config that does not fit this GPU's shared memory, an unsupported _grouped_mm layout
            continue
    if not times:
        raise RuntimeError("moecc: no grouped-GEMM candidate ran")
    return min(times, key=times.get), times


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median time of ``fn`` in milliseconds, by CUDA events after warm-up (the first call compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _autotune_enabled(x: Tensor) -> bool:
    return (x.is_cuda and not INTERPRET and os.environ.get("MOECC_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def _device_name(x: Tensor) -> str:
    return _cuda_device_name(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else x.device.type


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _config_of(entry: dict) -> KernelConfig:
    return KernelConfig(**entry["config"]) if entry.get("config") else DEFAULT_CONFIG


def _lookup_or_tune(key: str, candidates: Callable[[], dict[str, Callable[[], object]]], x: Tensor) -> dict | None:
    """The cached choice for ``key``; tunes it now when allowed, else None (the caller runs the default)."""
    global _cache_file_loaded
    if not _cache_file_loaded:
        _cache_file_loaded = True
        load_tune_cache()
    if key in TUNE_CACHE:
        return TUNE_CACHE[key]
    if not _autotune_enabled(x):
        return None
    best, times = choose_fastest(candidates(), cuda_time_ms)
    impl, _, index = best.partition(":")
    entry = {"impl": impl, "config": asdict(TUNE_CONFIGS_OF[key.split("|")[0]][int(index)]) if index else None,
             "times_ms": times}
    TUNE_CACHE[key] = entry
    save_tune_cache()
    return entry


TUNE_CONFIGS_OF = {"grouped_mm": TUNE_CONFIGS, "grouped_mm_wgrad": TUNE_CONFIGS_WGRAD}


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 keeps torch's default (no TF32 unless the user allowed it), so Triton and the reference agree.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dot_f32(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


_POINTER_TABLES: dict[tuple, Tensor] = {}


def _weight_operand(weights: list[Tensor], transpose_w: bool) -> tuple[Tensor, Tensor | None, tuple[int, int, int]]:
    """(first weight, table of group pointers or None, (stride_g, stride_k, stride_o)) of a weight argument.

    A list of per-expert 2-D weights (ModuleList) is read through a device table of their addresses instead of a
    ``torch.stack`` per call (which would copy every expert weight each step). The table is cached by the
    addresses, so steady state costs no host-to-device copy. Lists with mixed strides, or a weight not 16-byte
    aligned (the kernel promises the compiler aligned bases), fall back to one stack.
    """
    if is_stacked(weights):
        w = weights[0]
        stride_g, s1, s2 = w.stride()
        return w, None, (stride_g, s2, s1) if transpose_w else (stride_g, s1, s2)
    w0 = weights[0]
    if any(w.stride() != w0.stride() or w.shape != w0.shape or w.dtype != w0.dtype or w.data_ptr() % 16
           for w in weights):
        return _weight_operand([torch.stack(weights)], transpose_w)
    key = (w0.device, tuple(w.data_ptr() for w in weights))
    table = _POINTER_TABLES.get(key)
    if table is None:
        if len(_POINTER_TABLES) > 256:
            _POINTER_TABLES.clear()
        table = torch.tensor(key[1], dtype=torch.int64).to(w0.device, non_blocking=True)
        _POINTER_TABLES[key] = table
    s1, s2 = w0.stride()
    return w0, table, (0, s2, s1) if transpose_w else (0, s1, s2)


def _launch_grouped_mm(x: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool, y: Tensor,
                       width_out: int, config: KernelConfig, *, row_src: Tensor | None = None,
                       row_dest: Tensor | None = None, row_scale: Tensor | None = None,
                       store_mode: int = STORE_ROWS, swiglu: bool = False, rows: int | None = None) -> Tensor:
    """One launch of ``_grouped_mm_kernel`` over ``rows`` sorted rows (x's rows unless gathering)."""
    num_rows = x.shape[0] if rows is None else rows
    groups = offsets_S.shape[0]
    width_in = x.shape[1]
    if num_rows == 0 or width_out == 0:
        return y
    w0, table, (stride_g, stride_k, stride_o) = _weight_operand(weights, transpose_w)
    # SwiGLU: gate is output columns [0, F) of the weight and up is [F, 2F); the kernel reads up at this offset.
    half_offset = width_out * stride_o if swiglu else 0
    num_m_tiles = triton.cdiv(num_rows, config.block_m) + groups + 1
    grid = (num_m_tiles * triton.cdiv(width_out, config.block_n),)
    dummy = offsets_S
    _grouped_mm_kernel[grid](
        x, w0, table if table is not None else dummy, offsets_S, y,
        row_src if row_src is not None else dummy, row_dest if row_dest is not None else dummy,
        row_scale if row_scale is not None else dummy,
        num_rows, width_in, width_out, groups, num_m_tiles,
        x.stride(0), x.stride(1),
        stride_g, stride_k, stride_o, half_offset,
        y.stride(0), y.stride(1),
        W_LIST=table is not None, GATHER=row_src is not None, SCALE_ROWS=row_scale is not None,
        STORE_MODE=store_mode, SWIGLU=swiglu, DOT_F32=_dot_f32(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_G=triton.next_power_of_2(groups + 1), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def _out_width(weights: list[Tensor], transpose_w: bool) -> int:
    w0 = weights[0][0] if is_stacked(weights) else weights[0]
    return w0.shape[0] if transpose_w else w0.shape[1]


def grouped_mm_triton(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool,
                      config: KernelConfig | None = None) -> Tensor:
    """``moecc::grouped_mm`` by one Triton launch (the op's contract: rows past the last offset are zero)."""
    width_out = _out_width(weights, transpose_w)
    y_NO = x_NI.new_empty((x_NI.shape[0], width_out))
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    return _launch_grouped_mm(x_NI, weights, offsets_S, transpose_w, y_NO, width_out, config)


def grouped_mm_torch(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm`` by ``torch._grouped_mm`` (stacked weights only), with the tail rows zeroed on device."""
    w = weights[0]
    y_NO = torch._grouped_mm(x_NI, w.transpose(-2, -1) if transpose_w else w, offs=offsets_S)
    zero_tail_rows(y_NO, offsets_S)
    return y_NO


def zero_tail_rows(y_NO: Tensor, offsets_S: Tensor, block_m: int = 64, block_n: int = 128) -> Tensor:
    """Zero rows ``offsets[-1]:N`` of ``y_NO`` in place without reading the offsets on the host."""
    rows, width = y_NO.shape
    if rows and width:
        assert y_NO.stride(1) == 1
        grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_n))
        _zero_tail_kernel[grid](y_NO, offsets_S, rows, width, offsets_S.shape[0], y_NO.stride(0),
                                BLOCK_M=block_m, BLOCK_N=block_n)
    return y_NO


def grouped_mm(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm`` on CUDA: the tuned choice for this key (Triton config or ``torch._grouped_mm``)."""
    stacked = is_stacked(weights)
    width_out = _out_width(weights, transpose_w)
    key = tune_key("grouped_mm", offsets_S.shape[0], x_NI.shape[1], width_out, x_NI.shape[0], x_NI.dtype,
                   _device_name(x_NI), ("stacked" if stacked else "list") + ("_t" if transpose_w else ""))

    def candidates() -> dict[str, Callable[[], object]]:
        out = {f"triton:{i}": (lambda c=c: grouped_mm_triton(x_NI, weights, offsets_S, transpose_w, c))
               for i, c in enumerate(TUNE_CONFIGS)}
        if stacked and x_NI.dtype in (torch.bfloat16, torch.float16):
            out["torch_grouped_mm"] = lambda: grouped_mm_torch(x_NI, weights, offsets_S, transpose_w)
        return out

    entry = _lookup_or_tune(key, candidates, x_NI)
    if entry is not None and entry["impl"] == "torch_grouped_mm":
        return grouped_mm_torch(x_NI, weights, offsets_S, transpose_w)
    return grouped_mm_triton(x_NI, weights, offsets_S, transpose_w, _config_of(entry) if entry else None)


def grouped_mm_wgrad_triton(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool,
                            config: KernelConfig | None = None, row_src_N: Tensor | None = None) -> Tensor:
    """``moecc::grouped_mm_wgrad`` by one Triton launch; ``row_src_N`` gathers x's rows (x is then ``x_TI``)."""
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    groups = offsets_S.shape[0]
    width_in, width_out = x_NI.shape[1], dy_NO.shape[1]
    shape = (groups, width_out, width_in) if transpose_w else (groups, width_in, width_out)
    dw = x_NI.new_empty(shape)
    if dw.numel() == 0:
        return dw
    stride_dwg, s1, s2 = dw.stride()
    stride_dwi, stride_dwo = (s2, s1) if transpose_w else (s1, s2)
    grid = (triton.cdiv(width_in, config.block_m) * triton.cdiv(width_out, config.block_n), groups)
    _grouped_wgrad_kernel[grid](
        x_NI, dy_NO, offsets_S, dw, row_src_N if row_src_N is not None else offsets_S,
        width_in, width_out,
        x_NI.stride(0), x_NI.stride(1), dy_NO.stride(0), dy_NO.stride(1),
        stride_dwg, stride_dwi, stride_dwo,
        GATHER=row_src_N is not None, DOT_F32=_dot_f32(x_NI.dtype), INPUT_PRECISION=_input_precision(x_NI.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dw


def grouped_mm_wgrad_torch(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm_wgrad`` by ``torch._grouped_mm`` (k-grouped form), empty groups zeroed on device."""
    dw = torch._grouped_mm(dy_NO.t(), x_NI, offs=offsets_S) if transpose_w else \
        torch._grouped_mm(x_NI.t(), dy_NO, offs=offsets_S)
    dw = dw.contiguous()
    zero_empty_groups(dw, offsets_S)
    return dw


def zero_empty_groups(dw: Tensor, offsets_S: Tensor, block: int = 1024) -> Tensor:
    """Zero ``dw[g]`` in place for every empty group g, reading the offsets on the device."""
    assert dw.is_contiguous()
    group_numel = dw[0].numel() if dw.shape[0] else 0
    if group_numel:
        _zero_empty_groups_kernel[(triton.cdiv(group_numel, block), dw.shape[0])](dw, offsets_S, group_numel,
                                                                                   BLOCK=block)
    return dw


def grouped_mm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_S: Tensor, transpose_w: bool) -> Tensor:
    """``moecc::grouped_mm_wgrad`` on CUDA: the tuned choice for this key."""
    key = tune_key("grouped_mm_wgrad", offsets_S.shape[0], x_NI.shape[1], dy_NO.shape[1], x_NI.shape[0],
                   x_NI.dtype, _device_name(x_NI), "stacked_t" if transpose_w else "stacked")

    def candidates() -> dict[str, Callable[[], object]]:
        out = {f"triton:{i}": (lambda c=c: grouped_mm_wgrad_triton(x_NI, dy_NO, offsets_S, transpose_w, c))
               for i, c in enumerate(TUNE_CONFIGS_WGRAD)}
        if x_NI.dtype in (torch.bfloat16, torch.float16):
            out["torch_grouped_mm"] = lambda: grouped_mm_wgrad_torch(x_NI, dy_NO, offsets_S, transpose_w)
        return out

    entry = _lookup_or_tune(key, candidates, x_NI)
    if entry is not None and entry["impl"] == "torch_grouped_mm":
        return grouped_mm_wgrad_torch(x_NI, dy_NO, offsets_S, transpose_w)
    return grouped_mm_wgrad_triton(x_NI, dy_NO, offsets_S, transpose_w, _config_of(entry) if entry else None)


# --------------------------------------------------------------------------------------------------------------------
# ScatterMoE-style fused variants (kernel level; see docs/gpu.md for the op signatures that would wire them)
# --------------------------------------------------------------------------------------------------------------------


def gather_grouped_mm(x_TI: Tensor, row_token_N: Tensor, weights: list[Tensor], offsets_S: Tensor,
                      transpose_w: bool, config: KernelConfig | None = None) -> Tensor:
    """``grouped_mm(x_TI[row_token_N], ...)`` without materialising the gathered ``[N, I]`` copy.

    Row r of the sorted layout reads its A row from ``x_TI[row_token_N[r]]``; rows past the last offset are zero.
    """
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    width_out = _out_width(weights, transpose_w)
    rows = row_token_N.shape[0]
    y_NO = x_TI.new_empty((rows, width_out))
    return _launch_grouped_mm(x_TI, weights, offsets_S, transpose_w, y_NO, width_out, config,
                              row_src=row_token_N, rows=rows)


def grouped_mm_scatter_add(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool,
                           row_token_N: Tensor, row_weight_N: Tensor | None, num_tokens: int,
                           config: KernelConfig | None = None) -> Tensor:
    """``out_TO[row_token_N[r]] += row_weight_N[r] * (x_NI[r] @ W_g)``: the MoE combine in the GEMM epilogue.

    No ``[N, O]`` expert output is written. Accumulates with fp32 atomics into an fp32 buffer (bf16 atomics are
    not portable), so the sum over a token's top-k rows is in no fixed order: results can differ in the last bits
    from run to run. Rows past the last offset contribute nothing. Returns ``out_TO`` in x's dtype.
    """
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    width_out = _out_width(weights, transpose_w)
    out_TO = torch.zeros((num_tokens, width_out), dtype=torch.float32, device=x_NI.device)
    _launch_grouped_mm(x_NI, weights, offsets_S, transpose_w, out_TO, width_out, config, row_dest=row_token_N,
                       row_scale=row_weight_N, store_mode=STORE_SCATTER_ADD)
    return out_TO.to(x_NI.dtype)


def grouped_mm_scatter(x_NI: Tensor, weights: list[Tensor], offsets_S: Tensor, transpose_w: bool,
                       row_dest_N: Tensor, num_dest_rows: int, row_weight_N: Tensor | None = None,
                       config: KernelConfig | None = None) -> Tensor:
    """``y[row_dest_N[r]] = row_weight_N[r] * (x_NI[r] @ W_g)``: un-permute in the epilogue, deterministically.

    With ``row_dest_N`` the inverse of the sort order (``dest = token * K + k``) the caller's combine is a plain
    ``y.view(T, K, O).sum(1)``, which Inductor fuses; destination rows no sorted row maps to are zero.
    """
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    width_out = _out_width(weights, transpose_w)
    y = x_NI.new_zeros((num_dest_rows, width_out))
    return _launch_grouped_mm(x_NI, weights, offsets_S, transpose_w, y, width_out, config, row_dest=row_dest_N,
                              row_scale=row_weight_N, store_mode=STORE_SCATTER)


def grouped_swiglu(x_TD: Tensor, w13: list[Tensor], offsets_S: Tensor, row_token_N: Tensor | None = None,
                   config: KernelConfig | None = None) -> Tensor:
    """``h_NF = silu(x @ W13[g][:F].T) * (x @ W13[g][F:].T)`` for ``W13`` stacked ``[G, 2F, D]`` (or G ``[2F, D]``).

    Gate and up are two accumulators of one tile loop over the shared A tile, and the activation is the epilogue:
    the ``[N, 2F]`` pre-activation is never written. With ``row_token_N`` the A rows are gathered from ``x_TD``.
    """
    config = config or (INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG)
    width_ffn = _out_width(w13, True) // 2
    rows = row_token_N.shape[0] if row_token_N is not None else x_TD.shape[0]
    h_NF = x_TD.new_empty((rows, width_ffn))
    return _launch_grouped_mm(x_TD, w13, offsets_S, True, h_NF, width_ffn, config, row_src=row_token_N,
                              swiglu=True, rows=rows)


class _FusedMoEFFN(torch.autograd.Function):
    """The routed expert FFN with gather, SwiGLU and combine fused into two grouped GEMMs (ScatterMoE's layout).

    Forward: ``h = swiglu(x[token] @ W13[g].T)`` (gather + SwiGLU epilogue) and ``out[token] += w * (h @ W2[g].T)``
    (scatter-add epilogue). Backward recomputes the gate/up pre-activation instead of saving ``[N, 2F]``, and uses
    ``d row_weight = <dout[token] @ W2[g], h>``, so the ``[N, D]`` expert output is never needed.
    """

    @staticmethod
    def forward(ctx, x_TD, row_token_N, row_weight_N, offsets_S, w13_GxD, w2_GDF):
        h_NF = grouped_swiglu(x_TD, [w13_GxD], offsets_S, row_token_N)
        out_TD = grouped_mm_scatter_add(h_NF, [w2_GDF], offsets_S, True, row_token_N, row_weight_N, x_TD.shape[0])
        ctx.save_for_backward(x_TD, row_token_N, row_weight_N, offsets_S, w13_GxD, w2_GDF, h_NF)
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, row_token_N, row_weight_N, offsets_S, w13, w2, h_NF = ctx.saved_tensors
        dout_TD = dout_TD.contiguous()
        width_ffn = h_NF.shape[1]
        # dh without the routing weight (one gathered grouped GEMM), then the weight's gradient and the scaled dh.
        dh_unscaled_NF = gather_grouped_mm(dout_TD, row_token_N, [w2], offsets_S, False)
        drow_weight_N = (dh_unscaled_NF.float() * h_NF.float()).sum(1).to(row_weight_N.dtype)
        dh_NF = (dh_unscaled_NF * row_weight_N[:, None]).to(h_NF.dtype)
        dy_ND = dout_TD[row_token_N] * row_weight_N[:, None].to(dout_TD.dtype)
        dw2 = grouped_mm_wgrad_triton(h_NF, dy_ND, offsets_S, True)
        gate_up_N2F = gather_grouped_mm(x_TD, row_token_N, [w13], offsets_S, True).float()
        gate, up = gate_up_N2F[:, :width_ffn], gate_up_N2F[:, width_ffn:]
        sig = torch.sigmoid(gate)
        dh = dh_NF.float()
        dgate = dh * up * sig * (1 + gate * (1 - sig))
        dup = dh * gate * sig
        dgate_up_N2F = torch.cat([dgate, dup], 1).to(x_TD.dtype)
        dx_TD = grouped_mm_scatter_add(dgate_up_N2F, [w13], offsets_S, False, row_token_N, None, x_TD.shape[0])
        dw13 = grouped_mm_wgrad_triton(x_TD, dgate_up_N2F, offsets_S, True, row_src_N=row_token_N)
        return dx_TD, None, drow_weight_N, None, dw13, dw2


def fused_moe_ffn(x_TD: Tensor, row_token_N: Tensor, row_weight_N: Tensor, offsets_S: Tensor, w13_GxD: Tensor,
                  w2_GDF: Tensor) -> Tensor:
    """``out_TD = sum_k weight * FFN_e(x)`` over sorted routed rows, forward and backward by the fused kernels.

    ``row_token_N``/``row_weight_N``: token and routing weight of each row in slot-sorted order (``offsets_S`` are
    the slots' end offsets); ``w13_GxD`` is ``[G, 2F, D]`` (gate rows then up rows), ``w2_GDF`` is ``[G, D, F]``.
    """
    return _FusedMoEFFN.apply(x_TD, row_token_N, row_weight_N, offsets_S, w13_GxD, w2_GDF)


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check (no GPU needed)
# --------------------------------------------------------------------------------------------------------------------

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_target(kernel: str, dtype: torch.dtype, config: KernelConfig, arch: int = 90,
                       transpose_w: bool = True, **flags) -> dict:
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (Triton to PTX to cubin with the bundled ptxas).

    Specialises arguments the way a JIT launch on contiguous, 16-aligned tensors does (unit strides become
    constants, pointers and the other integers are marked divisible by 16), since that decides vectorised and
    pipelined (``cp.async``) loads. Returns shared memory bytes, warps, whether the K loop was software-pipelined
    and how many asynchronous copies it issues (an operand that loses vectorisation drops out of that count),
    so a CPU-only machine can check that every variant lowers for real hardware and that each tuned config fits
    the target's shared memory (``SHARED_MEMORY_LIMIT``). Not usable under ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*" + _TRITON_TYPE[dtype]
    if kernel == "grouped_mm":
        fn = _grouped_mm_kernel
        types = dict(x_ptr=ptr, w_ptr=ptr, w_ptrs_ptr="*i64", offsets_ptr="*i32", y_ptr=ptr, row_src_ptr="*i64",
                     row_dest_ptr="*i64", row_scale_ptr=ptr)
        if flags.get("STORE_MODE", STORE_ROWS) == STORE_SCATTER_ADD:
            types["y_ptr"] = "*fp32"
        unit_strides = ["stride_xi", "stride_yo", "stride_wk" if transpose_w else "stride_wo"]
        constexprs = dict(W_LIST=False, GATHER=False, SCALE_ROWS=False, STORE_MODE=STORE_ROWS, SWIGLU=False,
                          BLOCK_G=16, GROUP_M=config.group_m)
    elif kernel == "grouped_mm_wgrad":
        fn = _grouped_wgrad_kernel
        types = dict(x_ptr=ptr, dy_ptr=ptr, offsets_ptr="*i32", dw_ptr=ptr, row_src_ptr="*i64")
        unit_strides = ["stride_xi", "stride_dyo", "stride_dwi" if transpose_w else "stride_dwo"]
        constexprs = dict(GATHER=False)
    else:
        raise ValueError(kernel)
    constexprs.update({name: 1 for name in unit_strides})
    constexprs.update(DOT_F32=False, INPUT_PRECISION=_input_precision(dtype), BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    constexprs.update(flags)
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    scalar_int = {"N", "G", "num_m_tiles"}  # row counts are arbitrary; widths and strides are multiples of 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n] != "constexpr" and n not in scalar_int}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"],
            "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local")}


# Usable shared memory per block (bytes): sm80 (A100) 163 KiB, sm90 (H100/H200) 227 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

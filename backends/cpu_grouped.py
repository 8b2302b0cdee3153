"""Many small experts in one parallel region: the routed FFN's GEMMs as (expert, row tile) work items.

With fine-grained experts (E=64 top-8, ffn 256: ~256 rows per expert at 2048 tokens) the per-expert path of
``expert_ffn_cpu`` makes ~3 GEMMs per expert forward and ~8 backward, each a ``torch.mm`` with its own Python
dispatch and MKL fork/join over the threads, and each too small for MKL to keep both cores busy. Here one OpenMP
region runs every expert's work: a thread takes a work item, runs single-threaded MKL ``sgemm`` on it
(``mkl_set_num_threads_local(1)``: MKL would otherwise try to thread inside the region) and the fused
elementwise pass between the GEMMs while the tile is still in cache.

- forward item = (expert, row tile): ``h = x W1 [| x W3]``, ``a = act(gate) * up``, ``y = weight * (a W2)``;
- backward item = one expert (its weight gradients accumulate over its rows, so no two threads share one), its
  rows in tiles: ``da = gy W2^T``, the routing-weight gradient and ``dh`` (one pass), ``dW2 += a^T (w gy)``,
  ``dW1 [dW3] += x^T dh``, ``dx = dh W1^T [+ ...]``. An expert with no rows gets zero weight gradients.

Items go out largest first with dynamic scheduling. Gather and combine (``index_select``/``index_add_``) stay in
the caller, as for the per-expert path.

The GEMM is MKL's Fortran ``sgemm_``, called through its address in ``libtorch_cpu`` (torch's wheels link MKL
statically and export it): the kernel links nothing, and is built by Inductor's C++ toolchain like
``cpu_native``. Without MKL symbols, a compiler, or for non-fp32 the caller keeps its torch-ops path
(:func:`available` is False).

Which path runs is decided per shape by measurement (:func:`choose`), because the winner depends on the rows per
expert and the widths: MKL's own threading is best for a few large experts, this kernel for many small ones.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import logging
import math
import os
import time

import torch
from torch import Tensor

from . import cpu_native
from .kernels_cpu import is_stacked

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <vector>
using Vec = at::vec::Vectorized<float>;
static constexpr int64_t W = Vec::size();

static inline Vec act(Vec g) { const Vec one(1.0f), half(0.5f); return ACT; }
static inline Vec dact(Vec g) { const Vec one(1.0f), half(0.5f); return DACT; }

typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
typedef int (*setlocal_t)(int);

// Row-major C[n x m] = A @ B (+ C if beta = 1). ta: A is stored [k x n] (use its transpose), else [n x k];
// tb: B is stored [m x k], else [k x m]. Column-major sgemm computes C^T = op(B)^T op(A)^T.
static inline void gemm(sgemm_t f, bool ta, bool tb, int64_t n, int64_t m, int64_t k, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (n <= 0 || m <= 0) return;
    if (k <= 0) {
        if (beta == 0.0f) for (int64_t r = 0; r < n; ++r) std::memset(C + r * ldc, 0, m * sizeof(float));
        return;
    }
    int M = (int)m, N = (int)n, K = (int)k, LA = (int)ldb, LB = (int)lda, LC = (int)ldc;
    const float alpha = 1.0f;
    const char oa = tb ? 'T' : 'N', ob = ta ? 'T' : 'N';
    f(&oa, &ob, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
}

static inline const float* wp(const int64_t* table, int64_t stride, int64_t g) {
    return stride ? reinterpret_cast<const float*>(table[0]) + g * stride : reinterpret_cast<const float*>(table[g]);
}
static inline float* wpm(const int64_t* table, int64_t stride, int64_t g) {
    return const_cast<float*>(wp(table, stride, g));
}

// a[r] = act(h[r, gate]) * h[r, up]
static inline void activate(const float* h, float* a, int64_t n, int64_t ffn, int64_t ld, int64_t gate_off,
                            int64_t up_off) {
    for (int64_t r = 0; r < n; ++r) {
        const float* gr = h + r * ld + gate_off;
        float* ar = a + r * ffn;
        for (int64_t c = 0; c < ffn; c += W) {
            int64_t k = std::min(W, ffn - c);
            Vec v = act(Vec::loadu(gr + c, k));
            if (up_off >= 0) v = v * Vec::loadu(h + r * ld + up_off + c, k);
            v.store(ar + c, k);
        }
    }
}

struct Item { int64_t g, s, e; };

static std::vector<Item> make_items(const int32_t* offsets, int64_t groups, int64_t tile, bool split, bool empty) {
    std::vector<Item> items;
    int64_t start = 0;
    for (int64_t g = 0; g < groups; ++g) {
        int64_t end = offsets[g], rows = end - start;
        if (rows == 0) { if (empty) items.push_back({g, start, end}); }
        else if (!split) items.push_back({g, start, end});
        else {
            int64_t pieces = (rows + tile - 1) / tile;
            for (int64_t i = 0; i < pieces; ++i)
                items.push_back({g, start + rows * i / pieces, start + rows * (i + 1) / pieces});
        }
        start = end;
    }
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.e - a.s > b.e - b.s; });
    return items;
}

extern "C" void grouped_forward(const float* xs, float* ys, float* saved, float* ws, const float* rw,
        const int32_t* offsets, const int64_t* w1t, const int64_t* w3t, const int64_t* w2t,
        int64_t groups, int64_t d, int64_t ffn, int64_t dout, int64_t t1, int64_t t3, int64_t t2, int64_t glu,
        int64_t save, int64_t s1, int64_t s3, int64_t s2, int64_t threads, int64_t tile,
        int64_t sgemm_addr, int64_t setlocal_addr) {
    sgemm_t f = reinterpret_cast<sgemm_t>(sgemm_addr);
    setlocal_t setlocal = reinterpret_cast<setlocal_t>(setlocal_addr);
    const int64_t width = glu ? 2 * ffn : ffn;
    const int64_t gate_off = glu == 3 ? ffn : 0, up_off = glu == 0 ? -1 : (glu == 3 ? 0 : ffn);
    std::vector<Item> items = make_items(offsets, groups, tile, true, false);
    const int64_t per_thread = tile * (width + ffn);
    #pragma omp parallel num_threads(threads)
    {
        int previous = setlocal(1);
        float* hb = ws + omp_get_thread_num() * per_thread;
        float* ab = hb + tile * width;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < (int64_t)items.size(); ++i) {
            const Item it = items[i];
            const int64_t n = it.e - it.s, g = it.g;
            const float* x = xs + it.s * d;
            float* h = save ? saved + it.s * width : hb;
            if (glu == 1) {
                gemm(f, false, t1, n, ffn, d, x, d, wp(w1t, s1, g), t1 ? d : ffn, 0.0f, h, width);
                gemm(f, false, t3, n, ffn, d, x, d, wp(w3t, s3, g), t3 ? d : ffn, 0.0f, h + ffn, width);
            } else {
                gemm(f, false, t1, n, width, d, x, d, wp(w1t, s1, g), t1 ? d : width, 0.0f, h, width);
            }
            activate(h, ab, n, ffn, width, gate_off, up_off);
            float* y = ys + it.s * dout;
            gemm(f, false, t2, n, dout, ffn, ab, ffn, wp(w2t, s2, g), t2 ? ffn : dout, 0.0f, y, dout);
            for (int64_t r = 0; r < n; ++r) {
                const Vec wr(rw[it.s + r]);
                float* yr = y + r * dout;
                for (int64_t c = 0; c < dout; c += W) {
                    int64_t k = std::min(W, dout - c);
                    (Vec::loadu(yr + c, k) * wr).store(yr + c, k);
                }
            }
        }
        setlocal(previous);
    }
}

extern "C" void grouped_backward(const float* xs, float* gs, const float* saved, float* ws, const float* rw,
        float* dweight, float* dxs, const int32_t* offsets, const int64_t* w1t, const int64_t* w3t,
        const int64_t* w2t, const int64_t* d1t, const int64_t* d3t, const int64_t* d2t,
        int64_t groups, int64_t d, int64_t ffn, int64_t dout, int64_t t1, int64_t t3, int64_t t2, int64_t glu,
        int64_t s1, int64_t s3, int64_t s2, int64_t threads, int64_t tile, int64_t sgemm_addr,
        int64_t setlocal_addr) {
    sgemm_t f = reinterpret_cast<sgemm_t>(sgemm_addr);
    setlocal_t setlocal = reinterpret_cast<setlocal_t>(setlocal_addr);
    const int64_t width = glu ? 2 * ffn : ffn;
    const int64_t gate_off = glu == 3 ? ffn : 0, up_off = glu == 0 ? -1 : (glu == 3 ? 0 : ffn);
    std::vector<Item> items = make_items(offsets, groups, tile, false, true);
    const int64_t per_thread = tile * (2 * ffn + width);
    #pragma omp parallel num_threads(threads)
    {
        int previous = setlocal(1);
        float* ab = ws + omp_get_thread_num() * per_thread;
        float* dab = ab + tile * ffn;
        float* dhb = dab + tile * ffn;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < (int64_t)items.size(); ++i) {
            const Item it = items[i];
            const int64_t g = it.g;
            float* dw1 = wpm(d1t, s1, g);
            float* dw3 = glu == 1 ? wpm(d3t, s3, g) : nullptr;
            float* dw2 = wpm(d2t, s2, g);
            if (it.e == it.s) {  // no rows: the expert's weights took no part
                std::memset(dw1, 0, d * (glu == 1 ? ffn : width) * sizeof(float));
                if (dw3) std::memset(dw3, 0, d * ffn * sizeof(float));
                std::memset(dw2, 0, ffn * dout * sizeof(float));
                continue;
            }
            const float* w1 = wp(w1t, s1, g);
            const float* w3 = glu == 1 ? wp(w3t, s3, g) : nullptr;
            const float* w2 = wp(w2t, s2, g);
            for (int64_t s0 = it.s; s0 < it.e; s0 += tile) {
                const int64_t n = std::min(tile, it.e - s0);
                const float beta = s0 == it.s ? 0.0f : 1.0f;
                const float* h = saved + s0 * width;
                const float* x = xs + s0 * d;
                float* gy = gs + s0 * dout;
                activate(h, ab, n, ffn, width, gate_off, up_off);
                gemm(f, false, !t2, n, ffn, dout, gy, dout, w2, t2 ? ffn : dout, 0.0f, dab, ffn);
                for (int64_t r = 0; r < n; ++r) {
                    const float* dar = dab + r * ffn;
                    const float* ar = ab + r * ffn;
                    Vec acc(0.0f);
                    for (int64_t c = 0; c < ffn; c += W) {
                        int64_t k = std::min(W, ffn - c);
                        acc = at::vec::fmadd(Vec::loadu(dar + c, k), Vec::loadu(ar + c, k), acc);
                    }
                    dweight[s0 + r] = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc);
                    const Vec wr(rw[s0 + r]);
                    const float* gr = h + r * width + gate_off;
                    float* dhr = dhb + r * width;
                    for (int64_t c = 0; c < ffn; c += W) {
                        int64_t k = std::min(W, ffn - c);
                        Vec gv = Vec::loadu(gr + c, k);
                        Vec dv = Vec::loadu(dar + c, k) * wr;
                        if (up_off >= 0) {
                            Vec u = Vec::loadu(h + r * width + up_off + c, k);
                            (dv * act(gv)).store(dhr + up_off + c, k);
                            dv = dv * u;
                        }
                        (dv * dact(gv)).store(dhr + gate_off + c, k);
                    }
                    float* gyr = gy + r * dout;
                    for (int64_t c = 0; c < dout; c += W) {
                        int64_t k = std::min(W, dout - c);
                        (Vec::loadu(gyr + c, k) * wr).store(gyr + c, k);
                    }
                }
                if (t2) gemm(f, true, false, dout, ffn, n, gy, dout, ab, ffn, beta, dw2, ffn);
                else gemm(f, true, false, ffn, dout, n, ab, ffn, gy, dout, beta, dw2, dout);
                float* dx = dxs + s0 * d;
                if (glu == 1) {
                    if (t1) gemm(f, true, false, ffn, d, n, dhb, width, x, d, beta, dw1, d);
                    else gemm(f, true, false, d, ffn, n, x, d, dhb, width, beta, dw1, ffn);
                    if (t3) gemm(f, true, false, ffn, d, n, dhb + ffn, width, x, d, beta, dw3, d);
                    else gemm(f, true, false, d, ffn, n, x, d, dhb + ffn, width, beta, dw3, ffn);
                    gemm(f, false, !t1, n, d, ffn, dhb, width, w1, t1 ? d : ffn, 0.0f, dx, d);
                    gemm(f, false, !t3, n, d, ffn, dhb + ffn, width, w3, t3 ? d : ffn, 1.0f, dx, d);
                } else {
                    if (t1) gemm(f, true, false, width, d, n, dhb, width, x, d, beta, dw1, d);
                    else gemm(f, true, false, d, width, n, x, d, dhb, width, beta, dw1, width);
                    gemm(f, false, !t1, n, d, width, dhb, width, w1, t1 ? d : width, 0.0f, dx, d);
                }
            }
        }
        setlocal(previous);
    }
}
"""

_FORWARD_ARGS = (["const float*", "float*", "float*", "float*", "const float*", "const int32_t*"]
                 + ["const int64_t*"] * 3 + ["int64_t"] * 16)
_BACKWARD_ARGS = (["const float*", "float*", "const float*", "float*", "const float*", "float*", "float*",
                   "const int32_t*"] + ["const int64_t*"] * 6 + ["int64_t"] * 15)


@functools.cache
def _mkl() -> tuple[int, int] | None:
    """Addresses of MKL's ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` in the loaded libtorch_cpu, or None.

    The C interface is the mixed-case name: ``mkl_set_num_threads_local`` is the Fortran one (takes a pointer).
    """
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        return (ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
                ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value)
    except (OSError, AttributeError):
        return None


@functools.cache
def kernels(activation: str):
    """``(grouped_forward, grouped_backward)`` for ``activation``, compiled once per process; None if unavailable."""
    if activation not in cpu_native._ACTIVATIONS or _mkl() is None:
        return None
    forward_expr, derivative_expr = cpu_native._ACTIVATIONS[activation]
    source = _SOURCE.replace("DACT", derivative_expr).replace("ACT", forward_expr)
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        fwd = CppPythonBindingsCodeCache.load_pybinding(_FORWARD_ARGS, source.replace(
            "extern \"C\" void grouped_forward", "extern \"C\" void kernel"))
        bwd = CppPythonBindingsCodeCache.load_pybinding(_BACKWARD_ARGS, source.replace(
            "extern \"C\" void grouped_backward", "extern \"C\" void kernel"))
    except Exception as exc:  # no compiler, or a toolchain Inductor cannot drive: the per-expert path still works
        log.warning("moecc: grouped CPU expert kernel unavailable (%s: %s); using per-expert GEMMs",
                    type(exc).__name__, exc)
        return None
    return fwd, bwd


def _fits(w: Tensor) -> bool:
    return w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()


_TABLES: dict[tuple[int, ...], tuple[Tensor, bool]] = {}
_TABLES_MAX = 4096  # distinct weight lists remembered (a 64-layer model has 192); cleared whole when full


def _table(weights: list[Tensor], cache: bool = True) -> tuple[Tensor, int, bool]:
    """A weight argument as (int64 address table, elements between groups, usable by the kernel).

    A stacked tensor is its base address and group stride (nothing per expert). A list is one address per
    expert; checking each tensor's layout costs ~0.6 ms a call at E=256 (three lists), so a list's table and
    verdict are remembered by its addresses (14 us to read), which is what the kernel depends on. Gradient
    lists are new every call: ``cache=False``.
    """
    if not weights:
        return _EMPTY_TABLE, 0, True
    if is_stacked(weights):
        w = weights[0]
        return torch.tensor([w.data_ptr()], dtype=torch.int64), w.stride(0), _fits(w)
    key = tuple([w.data_ptr() for w in weights])
    hit = _TABLES.get(key) if cache else None
    if hit is None:
        hit = (torch.tensor(key, dtype=torch.int64), all(_fits(w) for w in weights))
        if cache:
            if len(_TABLES) >= _TABLES_MAX:
                _TABLES.clear()
            _TABLES[key] = hit
    return hit[0], 0, hit[1] and _fits(weights[0])


def tables(x: Tensor, weights: list[list[Tensor]]) -> list[tuple[Tensor, int]] | None:
    """Each weight argument's (address table, group stride) if the kernel can take them: fp32 CPU tensors with
    contiguous weights (gradients made by ``empty_like`` then match too); else None."""
    if not _fits(x):
        return None
    out = []
    for ws in weights:
        table, stride, ok = _table(ws)
        if not ok:
            return None
        out.append((table, stride))
    return out


def supported(x: Tensor, weights: list[list[Tensor]]) -> bool:
    return tables(x, weights) is not None


_EMPTY_TABLE = torch.zeros(1, dtype=torch.int64)


def threads() -> int:
    return torch.get_num_threads()


ITEM_BYTES = 4 << 20  # a thread's workspace per item; measured (E=8/64/256 at d=384-512): 1 MB tiles (64 rows at
#                      ffn=1024) ran the E=8 layer 1.8x slower than 4 MB, 16 MB no faster than 4 MB


def tile_rows(ffn: int, width: int, cap: int) -> int:
    """Most rows per work item: ``ITEM_BYTES`` of workspace per thread, at least 16 rows, at most ``cap``."""
    return max(1, min(cap, max(16, ITEM_BYTES // (4 * (width + 2 * ffn)))))


def _tiling(xs: Tensor, w2, t2: int, glu: int, cap: int) -> tuple[int, int, int, int]:
    """(ffn, saved width, rows per work item, threads) of one call, the same for both directions."""
    ffn = w2[0].shape[-1] if t2 else w2[0].shape[-2]
    width = 2 * ffn if glu else ffn
    return ffn, width, tile_rows(ffn, width, min(cap, max(1, xs.shape[0]))), threads()


def forward(xs: Tensor, ys: Tensor, saved: Tensor | None, weight_N: Tensor, offsets_S: Tensor, w1, w3, w2,
            flags, activation: str, workspace, cap: int, weight_tables=None) -> None:
    """``ys[n] = weight[n] * ffn_g(xs[n])`` for every computed row, and with ``saved`` its pre-activations.
    ``weight_tables``: :func:`tables` of (w1, w3, w2) if the caller has them."""
    t1, t3, t2, glu = (int(f) for f in flags)
    fwd, _ = kernels(activation)
    ffn, width, tile, nt = _tiling(xs, w2, t2, glu, cap)
    d, dout = xs.shape[1], ys.shape[1]
    ws = workspace(nt * tile * (width + ffn))
    (p1, s1), (p3, s3), (p2, s2) = weight_tables or tables(xs, [w1, w3, w2])
    sg, sl = _mkl()
    offsets = offsets_S.to(torch.int32).contiguous()
    fwd(xs, ys, saved if saved is not None else ys, ws, weight_N.contiguous(), offsets, p1, p3, p2, offsets.numel(),
        d, ffn, dout, t1, t3, t2, glu, int(saved is not None), s1, s3, s2, nt, tile, sg, sl)


def backward(xs: Tensor, gs: Tensor, saved: Tensor, weight_N: Tensor, dweight: Tensor, dxs: Tensor,
             offsets_S: Tensor, w1, w3, w2, dw1, dw3, dw2, flags, activation: str, workspace, cap: int,
             weight_tables=None) -> None:
    """Per expert: ``dweight``, ``dxs`` (rows in slot order) and the weight gradients ``dw*`` (written whole, zero
    for an expert without rows); ``gs`` is scaled by the row weights in place."""
    t1, t3, t2, glu = (int(f) for f in flags)
    _, bwd = kernels(activation)
    ffn, width, tile, nt = _tiling(xs, w2, t2, glu, cap)
    d, dout = xs.shape[1], gs.shape[1]
    ws = workspace(nt * tile * (width + 2 * ffn))
    (p1, s1), (p3, s3), (p2, s2) = weight_tables or tables(xs, [w1, w3, w2])
    (q1, _, _), (q3, _, _), (q2, _, _) = _table(dw1, False), _table(dw3, False), _table(dw2, False)
    sg, sl = _mkl()
    offsets = offsets_S.to(torch.int32).contiguous()
    bwd(xs, gs, saved, ws, weight_N.contiguous(), dweight, dxs, offsets, p1, p3, p2, q1, q3, q2, offsets.numel(),
        d, ffn, dout, t1, t3, t2, glu, s1, s3, s2, nt, tile, sg, sl)


# --- choosing the path per shape ------------------------------------------------------------------------------
#
# Measured on this 2-core machine (see benchmarks/moe_sweep.py): the winner flips with rows per expert and the
# widths, and the crossover moves with the machine's core count, MKL version and load, so no constant is
# written down. Each new bucket (direction, rows per non-empty expert rounded up to a power of two, d, ffn, gated,
# threads) is decided on its first real calls: they alternate the two paths (both compute the same result), the
# first call of each path is dropped (pool and cache warm-up, and in a compile it runs while Inductor is busy),
# and after CALIBRATION_CALLS more of each the faster *minimum* wins for the rest of the process (on a shared
# machine interference only adds time; medians flipped decisions in repeated runs). A decision costs no extra
# work, only a few calls on the slower path. MOECC_CPU_EXPERTS=grouped|per_expert forces one path.

CALIBRATION_CALLS = 3
PATHS = ("grouped", "per_expert")
runs: collections.Counter[str] = collections.Counter()  # calls per path in this process (reports, tests)
_samples: dict[tuple, dict[str, list[float]]] = {}
_decided: dict[tuple, str] = {}


def bucket(direction: str, rows: int, groups_used: int, d: int, ffn: int, glu: int) -> tuple:
    per = rows / max(1, groups_used)
    return (direction, 1 << max(0, math.ceil(math.log2(max(per, 1)))), d, ffn, bool(glu), threads())


def choose(key: tuple) -> str:
    """The path for this bucket: forced by MOECC_CPU_EXPERTS, decided, or the next one to calibrate."""
    forced = os.environ.get("MOECC_CPU_EXPERTS", "auto")
    if forced in PATHS:
        return forced
    if key in _decided:
        return _decided[key]
    samples = _samples.setdefault(key, {p: [] for p in PATHS})
    return min(PATHS, key=lambda p: len(samples[p]))


def record(key: tuple, path: str, seconds: float) -> None:
    """One calibration sample; decides the bucket once every path has 1 + CALIBRATION_CALLS of them."""
    samples = _samples.get(key)  # None once decided (possibly by another thread's call)
    if samples is None or key in _decided:
        return
    samples[path].append(seconds)
    if all(len(v) > CALIBRATION_CALLS for v in samples.values()):
        _decided[key] = min(PATHS, key=lambda p: min(samples[p][1:]))
        log.info("moecc: CPU experts bucket %s -> %s (best s: %s)", key, _decided[key],
                 {p: min(v[1:]) for p, v in samples.items()})
        _samples.pop(key, None)


def decisions() -> dict[tuple, str]:
    """Decided buckets of this process (for reports and tests)."""
    return dict(_decided)


def reset() -> None:
    _samples.clear()
    _decided.clear()


class Timer:
    """Times a call while its bucket is being calibrated (nothing otherwise)."""

    def __init__(self, key: tuple, path: str):
        self.key, self.path = key, path
        self.active = key in _samples and key not in _decided

    def __enter__(self):
        if self.active:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.active and exc[0] is None:
            record(self.key, self.path, time.perf_counter() - self.start)

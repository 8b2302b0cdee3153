"""Fused elementwise CPU kernels of the routed FFN (and the slot sort), compiled on first use with Inductor's own
C++ toolchain.

Between its GEMMs a tile of the routed FFN does elementwise work: the gated activation in the forward, and in
the backward the routing weight's gradient (a row dot product), the scaled activation gradient and the gate/up
gradients. As torch ops that is two passes over a ``[rows, ffn]`` tile forward and nine backward; here it is one
each. The source is C++ over ``at::vec::Vectorized<float>`` (the SIMD layer Inductor's generated kernels use),
``#pragma omp`` over rows, built and cached by ``torch._inductor.codecache`` with Inductor's flags and OpenMP
runtime (so no second thread pool competes with torch's). fp32 only; where no C++ compiler works the caller
keeps its torch-ops path (:func:`kernels` returns None).

Kernel arguments, all row-major, ``h`` holding ``[.., gate | up ..]`` columns at ``gate_off``/``up_off`` of rows
``ld`` apart (``up_off < 0``: not gated):
- ``glu_forward(h, a, rows, ffn, ld, gate_off, up_off)``: ``a = act(gate) * up``;
- ``glu_backward(h, da, a, w, dweight, dh, rows, ffn, ld, gate_off, up_off)``: with ``da`` the unweighted output
  gradient of ``a``: ``dweight = rowsum(da * a)``, then for ``d = w * da`` the gradients ``dh[up] = d * act(gate)``
  and ``dh[gate] = d * up * act'(gate)``, ``dh`` laid out as ``h``.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

# Vectorized expressions of g (the gate pre-activation): the activation and its derivative, as aten writes them.
_ACTIVATIONS = {
    "silu": ("g / (one + g.neg().exp())",
             "[&]{ auto s = one / (one + g.neg().exp()); return s * (one + g * (one - s)); }()"),
    "gelu": ("g * half * (one + (g * Vec(M_SQRT1_2)).erf())",
             ("half * (one + (g * Vec(M_SQRT1_2)).erf()) + "
              "g * (g * g * Vec(-0.5f)).exp() * Vec(M_2_SQRTPI * M_SQRT1_2 * 0.5)")),
    "gelu_tanh": ("half * g * (one + (Vec(M_SQRT2 * M_2_SQRTPI * 0.5) * (g + Vec(0.044715f) * g * g * g)).tanh())",
                  ("[&]{ auto t = (Vec(M_SQRT2 * M_2_SQRTPI * 0.5) * (g + Vec(0.044715f) * g * g * g)).tanh();"
                   " return half * (one + t) + half * g * (one - t * t) * Vec(M_SQRT2 * M_2_SQRTPI * 0.5)"
                   " * (one + Vec(3.0f * 0.044715f) * g * g); }()")),
    "relu": ("at::vec::maximum(g, Vec(0.0f))", "Vec::blendv(Vec(0.0f), one, g > Vec(0.0f))"),
}

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
using Vec = at::vec::Vectorized<float>;
static constexpr int64_t W = Vec::size();

static inline Vec act(Vec g) { const Vec one(1.0f), half(0.5f); return ACT; }
static inline Vec dact(Vec g) { const Vec one(1.0f), half(0.5f); return DACT; }

extern "C" void glu_forward(const float* h, float* a, int64_t rows, int64_t ffn, int64_t ld, int64_t gate_off,
                            int64_t up_off) {
    #pragma omp parallel for
    for (int64_t r = 0; r < rows; ++r) {
        const float* gr = h + r * ld + gate_off;
        float* ar = a + r * ffn;
        for (int64_t c = 0; c < ffn; c += W) {
            int64_t n = std::min(W, ffn - c);
            Vec v = act(Vec::loadu(gr + c, n));
            if (up_off >= 0) v = v * Vec::loadu(h + r * ld + up_off + c, n);
            v.store(ar + c, n);
        }
    }
}

extern "C" void glu_backward(const float* h, const float* da, const float* a, const float* w, float* dweight,
                             float* dh, int64_t rows, int64_t ffn, int64_t ld, int64_t gate_off, int64_t up_off) {
    #pragma omp parallel for
    for (int64_t r = 0; r < rows; ++r) {
        const float* dar = da + r * ffn;
        const float* ar = a + r * ffn;
        Vec acc(0.0f);
        for (int64_t c = 0; c < ffn; c += W) {
            int64_t n = std::min(W, ffn - c);
            acc = at::vec::fmadd(Vec::loadu(dar + c, n), Vec::loadu(ar + c, n), acc);
        }
        dweight[r] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
        const Vec wr(w[r]);
        const float* gr = h + r * ld + gate_off;
        float* dgr = dh + r * ld + gate_off;
        for (int64_t c = 0; c < ffn; c += W) {
            int64_t n = std::min(W, ffn - c);
            Vec g = Vec::loadu(gr + c, n);
            Vec d = Vec::loadu(dar + c, n) * wr;
            if (up_off >= 0) {
                Vec u = Vec::loadu(h + r * ld + up_off + c, n);
                (d * act(g)).store(dh + r * ld + up_off + c, n);
                d = d * u;
            }
            (d * dact(g)).store(dgr + c, n);
        }
    }
}
"""

_FORWARD_ARGS = ["const float*", "float*"] + ["int64_t"] * 5
_BACKWARD_ARGS = ["const float*"] * 4 + ["float*", "float*"] + ["int64_t"] * 5


@functools.cache
def kernels(activation: str):
    """``(glu_forward, glu_backward)`` for ``activation``, compiled once per process; None if unavailable."""
    if activation not in _ACTIVATIONS:
        return None
    forward_expr, derivative_expr = _ACTIVATIONS[activation]
    source = _SOURCE.replace("DACT", derivative_expr).replace("ACT", forward_expr)
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        fwd = CppPythonBindingsCodeCache.load_pybinding(_FORWARD_ARGS, source.replace(
            "extern \"C\" void glu_forward", "extern \"C\" void kernel"))
        bwd = CppPythonBindingsCodeCache.load_pybinding(_BACKWARD_ARGS, source.replace(
            "extern \"C\" void glu_backward", "extern \"C\" void kernel"))
    except Exception as exc:  # no compiler, or a toolchain Inductor cannot drive: the torch-ops path still works
        log.warning("moecc: fused CPU FFN kernels unavailable (%s: %s); using torch ops", type(exc).__name__, exc)
        return None
    return fwd, bwd


_SORT_SOURCE = r"""
#include <cstdint>
#include <vector>
// Stable counting sort of n slot ids in [0, s): order (rows grouped by slot), its inverse, int32 end offsets.
// status = {0} on success, {1, bad id} when an id lies outside [0, s) (nothing else is written then).
extern "C" void kernel(const int64_t* slot, int64_t* order, int64_t* inverse, int32_t* offsets, int64_t* status,
                       int64_t n, int64_t s) {
    std::vector<int64_t> start(s + 1, 0);
    status[0] = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = slot[i];
        if (v < 0 || v >= s) { status[0] = 1; status[1] = v; return; }
        ++start[v + 1];
    }
    for (int64_t g = 0; g < s; ++g) { start[g + 1] += start[g]; offsets[g] = (int32_t)start[g + 1]; }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t p = start[slot[i]]++;
        order[p] = i;
        inverse[i] = p;
    }
}
"""


@functools.cache
def sort_kernel():
    """``kernel(slot, order, inverse, offsets, status, n, s)``: the slot sort as one O(n + s) pass, or None.

    As torch ops the sort is eight calls (range check, stable argsort, inverse scatter, bincount, cumsum, cast):
    ~0.1 ms a decode step whatever the rows, and O(n log n) at large n; this is one call.
    """
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(
            ["const int64_t*", "int64_t*", "int64_t*", "int32_t*", "int64_t*", "int64_t", "int64_t"], _SORT_SOURCE)
    except Exception as exc:  # as for kernels(): the torch-ops sort still works
        log.warning("moecc: native slot sort unavailable (%s: %s); using torch ops", type(exc).__name__, exc)
        return None

"""TFLOP/s of one MoE layer on a GPU: moecc against eager, stock torch.compile, HF-style grouped_mm and dense.

    python benchmarks/gpu_moe_layer.py                 # on a CUDA machine: the table, and JSON in benchmarks/results/
    python benchmarks/gpu_moe_layer.py --cpu-smoke     # tiny shapes through the same code on CPU (Triton interpreted)

Legend: T tokens, D model dim, F ffn dim (per expert), E experts, K top-k, N = T*K routed rows.

Shapes (bf16, 16384 tokens):
- ``mixtral``: D=4096, F=14336, E=8, K=2.
- ``fine``: D=4096, E=64, K=8, F=3584 = 14336*2/8, sized so that a token costs the same FLOPs as in ``mixtral``;
  the two rows then differ only in granularity (8x the groups, 1/4 the GEMM width), which is what it measures.

FLOPs counted: the expert FFNs only, ``2 * N * D * F * 3`` forward (gate, up, down) and three times that forward +
backward (input and weight gradients); the router GEMM (``2 * T * D * E``) is run by every row but not counted.
Recomputation (the fused path's backward recomputes gate/up) is not counted either: the numbers are useful FLOPs.

Rows, all on the same weights (stacked ``w13 [E, 2F, D]`` gate-then-up and ``w2 [E, D, F]``) and routing:
- ``moecc ops``: sort rows by expert, gather, ``moecc::grouped_mm`` (Triton or ``torch._grouped_mm``, chosen by
  measurement at first use), SwiGLU, ``moecc::grouped_mm``, weighted ``index_add`` combine; eager, no compile.
- ``moecc compile``: ``torch.compile(eager layer, backend="moecc")`` (the compile path's rewrite of the loop).
- ``moecc fused triton``: ``kernels_triton.fused_moe_ffn``: gather + SwiGLU in one grouped GEMM, combine as the
  scatter-add epilogue of the second.
- ``eager loop``: the Mixtral-style per-expert loop (``torch.where`` + ``index_add_``).
- ``torch.compile``: stock ``torch.compile`` (Inductor) of the same loop.
- ``hf grouped_mm``: sort + ``torch._grouped_mm`` per projection (what transformers' ``grouped_mm`` experts do).
- ``dense``: a dense SwiGLU MLP on N rows of width F: the same FLOPs as dense GEMMs, the reference for the peak.

Timing: CUDA events around each call, warm-up calls first (compiles, autotuning), the median of ``--repeats``.
Each row's output is checked against the eager loop before it is timed (the ``err`` column: max abs error
relative to the output's max abs value).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused row then runs on CPU

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Dense bf16 tensor-core peak of the spec sheet (no sparsity), TFLOP/s: printed next to the measured dense GEMM.
SPEC_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    tokens: int
    dim: int
    ffn: int
    experts: int
    top_k: int

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    def forward_flops(self) -> float:
        return 2.0 * self.rows * self.dim * self.ffn * 3


SHAPES = {
    "mixtral": Shape("mixtral", tokens=16384, dim=4096, ffn=14336, experts=8, top_k=2),
    "fine": Shape("fine", tokens=16384, dim=4096, ffn=3584, experts=64, top_k=8),
}
SMOKE_SHAPES = {
    "mixtral": Shape("mixtral-smoke", tokens=64, dim=32, ffn=48, experts=8, top_k=2),
    "fine": Shape("fine-smoke", tokens=64, dim=32, ffn=16, experts=16, top_k=4),
}


# ---------------------------------------------------------------------------------------------------------------
# The layer and its implementations
# ---------------------------------------------------------------------------------------------------------------


class LoopMoE(nn.Module):
    """Mixtral-style MoE layer over stacked weights: router, then a per-expert loop (the eager baseline)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: str):
        super().__init__()
        self.num_experts, self.top_k = shape.experts, shape.top_k
        kw = dict(dtype=dtype, device=device)
        self.gate = nn.Linear(shape.dim, shape.experts, bias=False, **kw)
        self.gate_up_proj = nn.Parameter(torch.randn(shape.experts, 2 * shape.ffn, shape.dim, **kw) / shape.dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(shape.experts, shape.dim, shape.ffn, **kw) / shape.ffn**0.5)

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        probs_TE = F.softmax(self.gate(x_TD), dim=-1, dtype=torch.float)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        return (weights_TK / weights_TK.sum(-1, keepdim=True)).to(x_TD.dtype), experts_TK

    def forward(self, x_TD: Tensor) -> Tensor:
        weights_TK, experts_TK = self.route(x_TD)
        out_TD = torch.zeros_like(x_TD)
        mask_ETK = F.one_hot(experts_TK, self.num_experts).permute(2, 0, 1)
        for e in range(self.num_experts):
            t_idx, k_idx = torch.where(mask_ETK[e])
            gate, up = F.linear(x_TD[t_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out_TD.index_add_(0, t_idx, y * weights_TK[t_idx, k_idx].unsqueeze(-1))
        return out_TD


def sorted_routing(layer: LoopMoE, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token of each expert-sorted row, its routing weight, int32 end offset of each expert's rows)."""
    weights_TK, experts_TK = layer.route(x_TD)
    expert_N = experts_TK.reshape(-1)
    order_N = torch.argsort(expert_N, stable=True)
    offsets_E = torch.bincount(expert_N, minlength=layer.num_experts).cumsum(0).to(torch.int32)
    return order_N // layer.top_k, weights_TK.reshape(-1)[order_N], offsets_E


def moecc_ops_layer(layer: LoopMoE) -> Callable[[Tensor], Tensor]:
    from moecc.backends import ops

    def run(x_TD: Tensor) -> Tensor:
        token_N, weight_N, offsets_E = sorted_routing(layer, x_TD)
        gate_up_N2F = ops.grouped_mm(x_TD[token_N], [layer.gate_up_proj], offsets_E, True)
        gate, up = gate_up_N2F.chunk(2, dim=-1)
        y_ND = ops.grouped_mm(F.silu(gate) * up, [layer.down_proj], offsets_E, True)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * weight_N[:, None])

    return run


def moecc_fused_layer(layer: LoopMoE) -> Callable[[Tensor], Tensor]:
    from moecc.backends import kernels_triton

    def run(x_TD: Tensor) -> Tensor:
        token_N, weight_N, offsets_E = sorted_routing(layer, x_TD)
        return kernels_triton.fused_moe_ffn(x_TD, token_N, weight_N, offsets_E, layer.gate_up_proj, layer.down_proj)

    return run


def hf_grouped_mm_layer(layer: LoopMoE) -> Callable[[Tensor], Tensor]:
    def run(x_TD: Tensor) -> Tensor:
        token_N, weight_N, offsets_E = sorted_routing(layer, x_TD)
        gate_up_N2F = torch._grouped_mm(x_TD[token_N], layer.gate_up_proj.transpose(-2, -1), offs=offsets_E)
        gate, up = gate_up_N2F.chunk(2, dim=-1)
        y_ND = torch._grouped_mm(F.silu(gate) * up, layer.down_proj.transpose(-2, -1), offs=offsets_E)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * weight_N[:, None])

    return run


def moecc_compiled_layer(layer: LoopMoE) -> Callable[[Tensor], Tensor]:
    import moecc

    moecc.register()
    return torch.compile(layer, backend="moecc")


def dense_mlp(shape: Shape, dtype: torch.dtype, device: str) -> tuple[Callable[[Tensor], Tensor], list[Tensor]]:
    """A dense SwiGLU MLP on N rows: the same GEMM FLOPs as the MoE layer, with no routing at all."""
    kw = dict(dtype=dtype, device=device)
    w13 = (torch.randn(2 * shape.ffn, shape.dim, **kw) / shape.dim**0.5).requires_grad_()
    w2 = (torch.randn(shape.dim, shape.ffn, **kw) / shape.ffn**0.5).requires_grad_()

    def run(x_ND: Tensor) -> Tensor:
        gate, up = F.linear(x_ND, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    return run, [w13, w2]


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds per call: CUDA events on a GPU (the kernels' own timer), wall clock on CPU (smoke runs
    only)."""
    if device == "cuda":
        from moecc.backends import kernels_triton

        return kernels_triton.cuda_time_ms(fn, warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_backward(run: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], dout: Tensor
                     ) -> Callable[[], object]:
    inputs = [x, *params]
    return lambda: torch.autograd.grad(run(x), inputs, dout, allow_unused=True)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def bench_shape(shape: Shape, rows: list[str], dtype: torch.dtype, device: str, warmup: int, repeats: int,
                log: Callable[[str], None]) -> list[dict]:
    torch.manual_seed(0)
    layer = LoopMoE(shape, dtype, device)
    params = [layer.gate_up_proj, layer.down_proj]
    x_TD = torch.randn(shape.tokens, shape.dim, dtype=dtype, device=device, requires_grad=True)
    dout_TD = torch.randn_like(x_TD)
    with torch.no_grad():
        expected = layer(x_TD)

    builders: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
        "moecc ops": lambda: moecc_ops_layer(layer),
        "moecc compile": lambda: moecc_compiled_layer(layer),
        "moecc fused triton": lambda: moecc_fused_layer(layer),
        "eager loop": lambda: layer,
        "torch.compile": lambda: torch.compile(layer),
        "hf grouped_mm": lambda: hf_grouped_mm_layer(layer),
    }
    results = []
    for name in rows:
        result = {"shape": shape.name, "impl": name, **asdict(shape)}
        try:
            if name == "dense":
                run, dense_params = dense_mlp(shape, dtype, device)
                x = torch.randn(shape.rows, shape.dim, dtype=dtype, device=device, requires_grad=True)
                fwd = lambda: run(x)  # noqa: E731
                fwd_bwd = forward_backward(run, x, dense_params, torch.randn_like(x))
                result["err"] = None
            else:
                run = builders[name]()
                fwd = lambda: run(x_TD)  # noqa: E731
                fwd_bwd = forward_backward(run, x_TD, params, dout_TD)
                with torch.no_grad():
                    result["err"] = relative_error(run(x_TD), expected)
            with torch.no_grad():
                result["fwd_ms"] = time_ms(fwd, device, warmup, repeats)
            result["fwd_bwd_ms"] = time_ms(fwd_bwd, device, warmup, repeats)
            result["fwd_tflops"] = shape.forward_flops() / result["fwd_ms"] / 1e9
            result["fwd_bwd_tflops"] = 3 * shape.forward_flops() / result["fwd_bwd_ms"] / 1e9
        except Exception as exc:  # one failing row (an OOM, a compile error) must not hide the others
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log(f"{shape.name:>14} {name:<20} " + (result.get("error") or
            f"fwd {result['fwd_ms']:.3f} ms  fwd+bwd {result['fwd_bwd_ms']:.3f} ms"))
        results.append(result)
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def spec_peak(device_name: str) -> float | None:
    return next((peak for key, peak in SPEC_PEAK_BF16.items() if key in device_name), None)


def print_table(results: list[dict], device_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    peak = spec_peak(device_name)
    dense = {r["shape"]: r for r in results if r["impl"] == "dense" and "error" not in r}
    table = Table(title=f"MoE layer TFLOP/s on {device_name}"
                  + (f" (spec bf16 dense peak {peak:.0f})" if peak else ""))
    for col in ("shape", "impl", "fwd ms", "fwd TFLOP/s", "% dense", "fwd+bwd ms", "fwd+bwd TFLOP/s", "% dense",
                "err"):
        table.add_column(col, justify="left" if col in ("shape", "impl") else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["shape"], r["impl"], "[red]" + r["error"], *[""] * 6)
            continue
        ref = dense.get(r["shape"])
        def pct(key, r=r, ref=ref):
            return f"{100 * r[key] / ref[key]:.0f}%" if ref else ""

        table.add_row(r["shape"], r["impl"], f"{r['fwd_ms']:.2f}", f"{r['fwd_tflops']:.1f}", pct("fwd_tflops"),
                      f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_tflops']:.1f}", pct("fwd_bwd_tflops"),
                      "" if r["err"] is None else f"{r['err']:.1e}")
    Console(width=max(Console().width, 160)).print(table)


ROWS = ["moecc ops", "moecc compile", "moecc fused triton", "eager loop", "torch.compile", "hf grouped_mm", "dense"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to check the script runs")
    parser.add_argument("--shapes", default="mixtral,fine", help="comma-separated subset of: " + ",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the implementations")
    parser.add_argument("--tokens", type=int, default=None, help="override the number of tokens")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_moe_layer-*.json)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, shapes = "cpu", torch.bfloat16, SMOKE_SHAPES
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    elif torch.cuda.is_available():
        device, dtype, shapes = "cuda", torch.bfloat16, SHAPES
    else:
        print("gpu_moe_layer: no CUDA device here; nothing to measure. On a GPU machine run "
              "`python benchmarks/gpu_moe_layer.py`; `--cpu-smoke` checks that the script runs, on CPU.")
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: not a measurement)"
    results = []
    for key in args.shapes.split(","):
        shape = shapes[key.strip()]
        if args.tokens:
            shape = Shape(shape.name, args.tokens, shape.dim, shape.ffn, shape.experts, shape.top_k)
        results += bench_shape(shape, rows, dtype, device, args.warmup, args.repeats,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    print_table(results, device_name)

    out = Path(args.out) if args.out else RESULTS_DIR / (
        f"gpu_moe_layer-{'cpu-smoke' if args.cpu_smoke else device_name.replace(' ', '_')}-"
        f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "warmup": args.warmup,
            "repeats": args.repeats, "spec_peak_bf16_tflops": spec_peak(device_name)}
    if device == "cuda":
        from moecc.backends import kernels_triton

        meta["tune_cache"] = kernels_triton.TUNE_CACHE
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

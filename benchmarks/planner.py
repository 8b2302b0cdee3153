"""Planner and cost-model benchmark (issue 3).

1. Planner: E in {8, 64, 256} x ranks in {4, 16, 64} on skewed drifting traces (Zipf 1.0 -> 1.5 over the trace,
   the hot set moving every ``--drift`` steps), H100 profile, pool of 4: solve time, status and gap, expected step
   time of static round-robin EP, the greedy (LPT) pool and the planned pool, and the pool's speedups.
2. Cost model against measurement on this machine: ``moecc calibrate`` fits a CPU profile, then the real
   single-device expert kernel (``moecc.backends.kernels_cpu.grouped_mm``, SwiGLU: gate, up, down) runs over
   varied load distributions; predicted vs measured seconds and the mean absolute error.

    python benchmarks/planner.py            # both, a few minutes on 2 cores
    python benchmarks/planner.py --only kernel | planner

Writes benchmarks/results/planner.json (planner-<part>.json with --only) and prints rich tables.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moecc.costmodel.compare import compare
from moecc.costmodel.formulas import ExpertDims, compile_cost_model
from moecc.costmodel.placement import SlotLayout
from moecc.costmodel.profile import builtin_profile, save_profile
from moecc.costmodel.workload import zipf_probabilities, zipf_trace

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=200)


def bench_planner(args) -> list[dict]:
    profile = builtin_profile("h100-sxm-8x")
    dims = ExpertDims(d_model=2048, d_ffn=1408)  # a DeepSeek-MoE-sized expert, bf16, Adam state on switches
    rows_out = []
    for E in args.experts:
        for R in args.ranks:
            S = math.ceil(E / R) + 1  # one spare slot per rank for replicas
            trace = zipf_trace(E, R * args.rows_per_rank, args.steps, s_start=1.0, s_end=1.5, drift_period=args.drift,
                               drift_stride=max(1, E // 16), seed=E * 1000 + R)
            model = compile_cost_model(profile, dims, R)
            layout = SlotLayout(ranks=R, slots_per_rank=S)
            started = time.perf_counter()
            result = compare(trace.layer(), layout, args.pool, model, window=args.window, time_limit_s=args.time_limit)
            row = {"experts": E, "ranks": R, "slots_per_rank": S, "pool": len(result.plan.pool),
                   "solve_s": result.plan.solve_s, "status": result.plan.status, "gap": result.plan.gap,
                   "static_ms": 1e3 * result.static_step_s, "greedy_ms": 1e3 * result.greedy_step_s,
                   "pool_ms": 1e3 * result.pool_expected_step_s,
                   "speedup_vs_static": result.static_step_s / result.pool_expected_step_s,
                   "speedup_vs_greedy": result.greedy_step_s / result.pool_expected_step_s,
                   "pool_online_ms": 1e3 * result.pool_online_step_s,
                   "greedy_online_ms": 1e3 * result.greedy_online_step_s,
                   "online_speedup_vs_static": result.static_step_s / result.pool_online_step_s,
                   "online_speedup_vs_greedy": result.greedy_online_step_s / result.pool_online_step_s,
                   "switches": result.switches, "wall_s": time.perf_counter() - started}
            rows_out.append(row)
            console.log(f"E={E} R={R}: {row['status']} {row['solve_s']:.2f}s, {row['speedup_vs_static']:.2f}x static, "
                        f"{row['speedup_vs_greedy']:.2f}x greedy")
    table = Table(title=f"planner on skewed drifting traces (Zipf 1.0-1.5, hot set moves every {args.drift} steps), "
                        f"h100-sxm-8x, pool of {args.pool}, window {args.window} steps")
    for col in ("E", "ranks", "slots/rank", "solve s", "status", "gap", "static ms", "greedy ms", "pool ms",
                "vs static", "vs greedy", "switches", "online pool ms", "online vs static", "online vs greedy"):
        table.add_column(col, justify="right")
    for r in rows_out:
        table.add_row(str(r["experts"]), str(r["ranks"]), str(r["slots_per_rank"]), f"{r['solve_s']:.2f}", r["status"],
                      f"{100 * r['gap']:.1f}%", f"{r['static_ms']:.3f}", f"{r['greedy_ms']:.3f}", f"{r['pool_ms']:.3f}",
                      f"{r['speedup_vs_static']:.2f}x", f"{r['speedup_vs_greedy']:.2f}x", str(r["switches"]),
                      f"{r['pool_online_ms']:.3f}", f"{r['online_speedup_vs_static']:.2f}x",
                      f"{r['online_speedup_vs_greedy']:.2f}x")
    console.print(table)
    return rows_out


def load_cases(G: int, total: int, rng: random.Random) -> dict[str, list[int]]:
    """Varied tokens-per-expert distributions for the single-device kernel."""
    def split(probs, tokens):
        counts = [int(p * tokens) for p in probs]
        counts[0] += tokens - sum(counts)
        return counts

    zipf = lambda s: split(sorted(zipf_probabilities(G, s), key=lambda _: rng.random()), total)  # noqa: E731
    return {
        "balanced": split([1 / G] * G, total),
        "zipf 1.0": zipf(1.0),
        "zipf 1.5": zipf(1.5),
        "one hot (80%)": split([0.8] + [0.2 / (G - 1)] * (G - 1), total),
        "half empty": split([2 / G] * (G // 2) + [0.0] * (G - G // 2), total),
        "one expert only": split([1.0] + [0.0] * (G - 1), total),
        "few tokens": split([1 / G] * G, 8 * G),
        "small zipf": zipf(1.2)[:G] if total < 0 else split(zipf_probabilities(G, 1.2), max(G, total // 16)),
    }


def bench_kernel(args) -> dict:
    import torch
    import torch.nn.functional as nnf

    from moecc.backends.kernels_cpu import grouped_mm
    from moecc.costmodel.calibrate import calibrate, timeit

    torch.set_num_threads(1)
    console.log("calibrating this machine (moecc calibrate, 1 thread)")
    profile, fit_error = calibrate(builtin_profile("cpu"), name="cpu-bench", threads=1, show_progress=False)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_profile(profile, RESULTS / "cpu-calibrated.json")
    D, F, G = args.d_model, args.d_ffn, args.kernel_experts
    dims = ExpertDims(d_model=D, d_ffn=F, act_bytes=4, training=False)
    model = compile_cost_model(profile, dims, 1)
    torch.manual_seed(0)
    w_gate = torch.randn(G, F, D) / D ** 0.5
    w_up = torch.randn(G, F, D) / D ** 0.5
    w_down = torch.randn(G, D, F) / F ** 0.5
    rng = random.Random(0)
    rows = []
    for total in args.kernel_tokens:
        for name, counts in load_cases(G, total, rng).items():
            n = sum(counts)
            x = torch.randn(n, D)
            offsets = torch.tensor(counts).cumsum(0).to(torch.int32)

            def expert_ffn():
                h = nnf.silu(grouped_mm(x, [w_gate], offsets, True)) * grouped_mm(x, [w_up], offsets, True)
                return grouped_mm(h, [w_down], offsets, True)

            measured = timeit(expert_ffn, min_time_s=0.5, repeats=5)
            predicted = sum(model.ffn_s(c) for c in counts)
            rows.append({"tokens": n, "case": name, "counts": counts, "measured_ms": 1e3 * measured,
                         "predicted_ms": 1e3 * predicted, "error": (predicted - measured) / measured})
    mae = statistics.fmean(abs(r["error"]) for r in rows)
    table = Table(title=f"cost model vs measured CPU expert kernel (SwiGLU D={D} F={F}, {G} experts, fp32, 1 thread); "
                        f"GEMM fit error {100 * fit_error:.1f}%")
    for col in ("tokens", "load", "measured ms", "predicted ms", "error"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["tokens"]), r["case"], f"{r['measured_ms']:.3f}", f"{r['predicted_ms']:.3f}",
                      f"{100 * r['error']:+.1f}%")
    table.add_row("", "mean abs", "", "", f"{100 * mae:.1f}%")
    console.print(table)
    return {"gemm_fit_error": fit_error, "mean_abs_error": mae, "cases": rows, "profile": profile.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("planner", "kernel"))
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--drift", type=int, default=100)
    parser.add_argument("--rows-per-rank", type=int, default=8192, help="routed rows per rank per step")
    parser.add_argument("--time-limit", type=float, default=2.0)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ffn", type=int, default=1024)
    parser.add_argument("--kernel-experts", type=int, default=8)
    parser.add_argument("--kernel-tokens", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    out = {}
    if args.only in (None, "kernel"):
        out["kernel"] = bench_kernel(args)
    if args.only in (None, "planner"):
        out["planner"] = bench_planner(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"planner-{args.only}.json" if args.only else "planner.json")
    path.write_text(json.dumps(out, indent=2))
    console.log(f"wrote {path}")


if __name__ == "__main__":
    main()

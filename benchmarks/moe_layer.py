"""One MoE layer on this CPU: moecc against eager, stock torch.compile, HF grouped_mm, and the dense-FLOP limit.

Mixtral-style layer (d=512, ffn=1024, E=8, top-2, 4096 tokens, fp32), forward and forward+backward, with balanced
routing and with one expert carrying 3x the mean load. The limit is the best same-FLOP matmul schedule with no
routing at all: one dense SwiGLU chain over all T*K rows, or the same rows in E balanced chunks.

    python benchmarks/moe_layer.py            # full size (a few minutes on 2 cores)
    python benchmarks/moe_layer.py --quick    # small shapes, to check it runs

Prints a rich table of milliseconds and ratios (time / moecc time; < 1 would mean faster than moecc) and writes
benchmarks/results/moe_layer.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import moe_zoo  # noqa: E402  (the Mixtral-style loop layer users write)


def hf_grouped_mm_block(dim, ffn, num_experts, top_k):
    """transformers' own MixtralSparseMoeBlock with the grouped_mm experts implementation, or None."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=dim, intermediate_size=ffn, num_local_experts=num_experts,
                        num_experts_per_tok=top_k)
    cfg._experts_implementation = "grouped_mm"
    return MixtralSparseMoeBlock(cfg)


def copy_weights_to_hf(loop: moe_zoo.LoopMoE, hf: nn.Module) -> None:
    with torch.no_grad():
        hf.gate.weight.copy_(loop.router.gate.weight)
        for e, expert in enumerate(loop.experts):
            hf.experts.gate_up_proj[e].copy_(torch.cat([expert.w1.weight, expert.w3.weight]))
            hf.experts.down_proj[e].copy_(expert.w2.weight)


class DenseLimit(nn.Module):
    """The same FLOPs as the routed experts, without routing: SwiGLU over all T*K rows, in ``chunks`` pieces."""

    def __init__(self, dim, ffn, chunks):
        super().__init__()
        self.chunks = chunks
        self.w13 = nn.Parameter(torch.randn(chunks, dim, 2 * ffn) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(chunks, ffn, dim) / ffn**0.5)

    def forward(self, rows_ND):
        outs = []
        for c, part in enumerate(rows_ND.chunk(self.chunks)):
            gate, up = (part @ self.w13[c]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.w2[c])
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def skew_inputs(model: moe_zoo.LoopMoE, x_BSD: torch.Tensor, hot_share: float) -> torch.Tensor:
    """Push ``hot_share`` of the tokens towards expert 0, so it carries 3x the mean load under top-2."""
    direction = model.router.gate.weight[0].detach()
    direction = direction / direction.norm()
    x = x_BSD.clone().view(-1, x_BSD.shape[-1])
    hot = torch.rand(x.shape[0]) < hot_share
    x[hot] += 4.0 * direction
    return x.view_as(x_BSD)


def loads(model: moe_zoo.LoopMoE, x_BSD: torch.Tensor) -> list[int]:
    with torch.no_grad():
        _, _, experts = model.router(x_BSD.view(-1, x_BSD.shape[-1]))
    return torch.bincount(experts.flatten(), minlength=len(model.experts)).tolist()


def first(y):
    return y[0] if isinstance(y, tuple) else y


def make_step(fn_model, x, backward: bool):
    if not backward:
        def step():
            with torch.no_grad():
                fn_model(x)
    else:
        xg = x.detach().requires_grad_(True)

        def step():
            first(fn_model(xg)).sum().backward()
    return step


def measure_rounds(steps: dict, reps: int, warmup: int, burst: int = 3) -> dict[str, list[float]]:
    """Ms per step of each row in each of ``reps`` rounds that visit every row in turn.

    Rounds interleave the rows, so that a slow spell of the (shared) machine hits all of them alike. Within a
    round a row runs one untimed step and then ``burst`` timed ones back to back, as a training loop runs one
    model: a single cold step after another model ran measures the other model's cache footprint instead.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            step()
            start = time.perf_counter()
            for _ in range(burst):
                step()
            samples[name].append((time.perf_counter() - start) / burst * 1e3)
    return samples


def measure_interleaved(steps: dict, reps: int, warmup: int, burst: int = 3) -> dict[str, float]:
    """Median ms per step of each row (see :func:`measure_rounds`)."""
    return {name: statistics.median(v) for name, v in measure_rounds(steps, reps, warmup, burst).items()}


def paired_ratios(rounds: dict[str, list[float]], ref: str) -> dict[str, tuple[float, float, float]]:
    """Per row, the quartiles (25%, 50%, 75%) of ``ref``'s time over the row's time in the same round: rounds
    pair the rows in time, so a slow spell of the machine cancels out of each ratio."""
    out = {}
    for name, times in rounds.items():
        ratios = sorted(r / t for r, t in zip(rounds[ref], times))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[name] = (q[0], statistics.median(ratios), q[-1])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, to check the script runs")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shape", default="512,1024,8,2,4096",
                        help="dim,ffn,experts,top_k,tokens (default: the Mixtral-style layer of issue 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads (1 gives stable numbers on a machine shared with other jobs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "moe_layer.json"))
    args = parser.parse_args(argv)
    if args.out == parser.get_default("out") and args.threads != (os.cpu_count() or 1):
        args.out = args.out.replace(".json", f"_{args.threads}t.json")
    dim, ffn, experts, top_k, tokens = (64, 128, 8, 2, 256) if args.quick else map(int, args.shape.split(","))
    reps, warmup = (2, 1) if args.quick else (args.reps, 1)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    loop = moe_zoo.LoopMoE(dim, ffn, experts, top_k)
    hf = hf_grouped_mm_block(dim, ffn, experts, top_k)
    if hf is not None:
        copy_weights_to_hf(loop, hf)
    rows = tokens * top_k
    x_bal = torch.randn(1, tokens, dim)
    # Expert 0 must appear in 3x its fair share of tokens (3K/E); untouched tokens still pick it K/E of the time.
    fair = top_k / experts
    x_skew = skew_inputs(loop, x_bal, hot_share=2 * fair / (1 - fair))

    import moecc  # noqa: F401  (for the report below; the backend itself is found by name)

    candidates = {
        "eager (loop)": loop,
        "torch.compile (loop)": torch.compile(copy.deepcopy(loop)),
        "torch.compile (HF grouped_mm)": torch.compile(hf) if hf is not None else None,
        "moecc": torch.compile(copy.deepcopy(loop), backend="moecc"),
    }
    limits = {f"dense limit ({c} chunk{'s' if c > 1 else ''})": DenseLimit(dim, ffn, c) for c in (1, experts)}
    results = {"shape": dict(dim=dim, ffn=ffn, experts=experts, top_k=top_k, tokens=tokens, dtype="float32",
                             threads=torch.get_num_threads()), "cases": {}}
    paired: dict[str, dict] = {}
    for case, x in (("balanced", x_bal), ("skewed", x_skew)):
        load = loads(loop, x)
        case_rows = {}
        for mode, backward in (("forward", False), ("forward+backward", True)):
            dense_in = torch.randn(rows, dim)
            steps = {name: make_step(model, x, backward) for name, model in candidates.items() if model is not None}
            steps.update({name: make_step(m, dense_in, backward) for name, m in limits.items()})
            rounds = measure_rounds(steps, reps, warmup)
            times = {name: statistics.median(v) for name, v in rounds.items()}
            times["dense limit (best)"] = min(times[name] for name in limits)
            case_rows[mode] = times
            paired.setdefault(case, {})[mode] = paired_ratios(rounds, "moecc")
        results["cases"][case] = {"loads": load, "ms": case_rows, "moecc_over_row_quartiles": paired[case]}

    table = Table(title=f"MoE layer on CPU: d={dim} ffn={ffn} E={experts} top-{top_k} T={tokens} fp32, "
                        f"{torch.get_num_threads()} threads (ms, and time / moecc)")
    table.add_column("row")
    for case in results["cases"]:
        for mode in ("forward", "forward+backward"):
            table.add_column(f"{case} {mode}", justify="right")
    names = list(results["cases"]["balanced"]["ms"]["forward"])
    for name in names:
        cells = []
        for case in results["cases"].values():
            for mode in ("forward", "forward+backward"):
                t = case["ms"][mode][name]
                cells.append(f"{t:.1f} ({t / case['ms'][mode]['moecc']:.2f}x)")
        table.add_row(name, *cells)
    console = Console(width=170)
    console.print(table)
    for case, data in results["cases"].items():
        for mode, times in data["ms"].items():
            others = {k: v for k, v in times.items() if k != "moecc" and not k.startswith("dense")}
            ratio_limit = times["moecc"] / times["dense limit (best)"]
            results["cases"][case].setdefault("moecc_vs_limit", {})[mode] = ratio_limit
            fastest = all(times["moecc"] < v for v in others.values())
            quartiles = data["moecc_over_row_quartiles"][mode]
            pairs = ", ".join(f"{k.split(' (')[0] if k.startswith('eager') else k}: {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]"
                              for k, q in quartiles.items() if k in others)
            console.print(f"{case:9s} {mode:17s}: moecc / dense limit = {ratio_limit:.2f}x; "
                          f"faster than every other row: {fastest}; loads {data['loads']}")
            console.print(f"{'':28s}moecc / row, paired by round, median [quartiles]: {pairs}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    console.print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

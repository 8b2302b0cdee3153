"""One MoE layer at every shape: tokens from decode to large batches, few large experts to many small ones.

Cells: tokens in {1, 16, 256, 4096, 32768} x (experts, top-k, ffn) in {(8, 2, 1024), (64, 8, 256), (256, 8, 128)}
at d=512, fp32, forward, and forward+backward from 256 tokens up. Rows (benchmarks/moe_layer.py's helpers):
  eager            the Mixtral-style loop layer users write (tests/moe_zoo.LoopMoE)
  compile loop     stock torch.compile of that loop
  compile grouped  stock torch.compile of transformers' MixtralSparseMoeBlock, experts_implementation="grouped_mm"
  moecc            torch.compile(loop, backend="moecc")
  limit            the larger of two lower bounds. Memory: the touched experts' weights read once (forward; and
                   read again plus their gradients written in the backward, 3x) at this machine's memory bandwidth,
                   measured in the same run as a plain sum over 1 GiB (past the L3 cache). Compute, from 256 tokens:
                   the same FLOPs as one dense SwiGLU chain over all T*K rows or the same rows in E balanced chunks,
                   no routing (moe_layer.DenseLimit, measured in the rounds). Neither is a hard floor: the dense
                   chain is torch ops that materialise [rows, ffn] intermediates which moecc's fused kernel never
                   writes (moecc / limit < 1 at large T), and this VM reports a 480 MB L3, so weights a decode loop
                   keeps hot read faster than the memory bound.
One compiled model per (experts, top-k, ffn) serves every token count (as in serving: Dynamo goes dynamic on the
second size). Rows are measured in rounds that visit every row in turn (moe_layer.measure_rounds), and the ratios
to moecc are paired by round, so a slow spell of the shared machine cancels out; moecc is warmed up past its
per-shape calibration (backends/cpu_grouped.py) before any timed round.

    flock /tmp/moecc-bench.lock python benchmarks/moe_sweep.py --quick             # smoke: two small cells
    flock /tmp/moecc-bench.lock python benchmarks/moe_sweep.py --configs 64,8,256   # one config, ~10 min

Each run updates its cells in benchmarks/results/moe_sweep.json (``_1t.json`` with ``--threads 1``; other cells
are kept), then prints the table of every cell there.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import types

# Inductor's parallel compile workers (subprocesses importing torch) compete with the timed rows for the 2 cores
# for seconds after each compile: measured 3 s eager steps at 16 tokens right after a compile, 8 ms later.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer  # noqa: E402  (rows, limit, paired rounds; it puts tests/ on the path for moe_zoo)
import moe_zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_sweep.json")
DIM = 512
TOKENS = (1, 16, 256, 4096, 32768)
CONFIGS = ((8, 2, 1024), (64, 8, 256), (256, 8, 128))
BACKWARD_FROM = 256  # tokens: decode-sized cells are inference only
ROWS = ("eager", "compile loop", "compile grouped", "moecc")


def memory_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes per second of the best of ``reps`` plain sums over ``gib`` GiB (larger than the L3 cache)."""
    buf = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


def cell_bytes(tokens: int, experts: int, top_k: int, ffn: int) -> int:
    """A rough peak of one row at this cell, to skip cells that would not fit in memory (and say so): per routed
    row the gathered input, gate/up, activation and output (2d + 3 ffn fp32 values), twice with the backward."""
    return tokens * top_k * (2 * DIM + 3 * ffn) * 4 * 2


def own_code(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a forward of its own code object (same source and behaviour).

    Dynamo keeps per-code state: stock torch.compile meets the graph break inside the loop's ``for e`` and marks
    ``LoopMoE.forward``'s code to be skipped, and from then on every model of that class runs the frame eagerly,
    the moecc one included (its profile then shows stock per-expert frames and no moecc op: measured 2.8 ms a
    decode step instead of 1.0). The stock row gets its own code object so the rows do not interfere.
    """
    fn = type(model).forward
    code = fn.__code__.replace(co_qualname=fn.__code__.co_qualname + "_stock")  # a distinct code object
    clone = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    model.forward = types.MethodType(clone, model)
    return model


def build(experts: int, top_k: int, ffn: int) -> dict:
    loop = moe_zoo.LoopMoE(DIM, ffn, experts, top_k)
    hf = moe_layer.hf_grouped_mm_block(DIM, ffn, experts, top_k)
    if hf is not None:
        moe_layer.copy_weights_to_hf(loop, hf)
    return {"eager": loop, "compile loop": torch.compile(own_code(copy.deepcopy(loop))),
            "compile grouped": torch.compile(hf) if hf is not None else None,
            "moecc": torch.compile(copy.deepcopy(loop), backend="moecc")}


def settle_moecc(step, limit_calls: int = 16) -> None:
    """Run moecc until its per-shape calibration (first calls alternate two kernels) is decided: until a call
    neither adds a calibration sample nor decides a bucket."""
    from moecc.backends import cpu_grouped

    def state():
        return {k: sum(map(len, v.values())) for k, v in cpu_grouped._samples.items()}

    for _ in range(limit_calls):
        before = state()
        step()
        if state() == before:
            return


def measure_cell(models: dict, experts: int, top_k: int, ffn: int, tokens: int, backward: bool, reps: int,
                 bandwidth: float) -> dict:
    from moecc.backends import cpu_grouped

    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, DIM)
    load = moe_layer.loads(models["eager"], x)
    touched = sum(1 for n in load if n)
    weight_bytes = touched * 3 * DIM * ffn * 4
    memory_s = (3 if backward else 1) * weight_bytes / bandwidth
    steps = {name: moe_layer.make_step(m, x, backward) for name, m in models.items() if m is not None}
    failed = {}
    for name in list(steps):  # the first call compiles (or recompiles for this size); a row that fails is named
        try:
            steps[name]()
        except Exception as exc:  # noqa: BLE001  (a stock row failing is a result, not a crash of the sweep)
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            del steps[name]
    if "moecc" in steps:
        settle_moecc(steps["moecc"])
    rows = tokens * top_k
    if tokens >= BACKWARD_FROM:
        # E chunks' backward through DenseLimit's w[c] indexing writes a zero [E, ., .] gradient per chunk (moe_layer:
        # 1124 ms against 142 ms for one chunk at E=64): with many experts it never is the best, only slow.
        for chunks in (1, experts) if not backward or experts <= 8 else (1,):
            dense = moe_layer.DenseLimit(DIM, ffn, chunks)
            steps[f"dense {chunks}"] = moe_layer.make_step(dense, torch.randn(rows, DIM), backward)
    start = time.perf_counter()
    for step in steps.values():
        step()
    one_round = time.perf_counter() - start
    burst = 1 if one_round > 1.0 else 3
    reps = min(reps, max(3, int(120 / max(one_round * (burst + 1), 1e-3))))  # a cell within ~2-3 minutes
    rounds = moe_layer.measure_rounds(steps, reps, warmup=0, burst=burst)
    ms = {name: statistics.median(v) for name, v in rounds.items()}
    dense = {k: ms.pop(k) for k in list(ms) if k.startswith("dense")}
    compute_ms = min(dense.values()) if dense else 0.0
    ms["limit"] = max(memory_s * 1e3, compute_ms)
    paired = moe_layer.paired_ratios({k: v for k, v in rounds.items() if not k.startswith("dense")}, "moecc") \
        if "moecc" in rounds else {}
    return {"tokens": tokens, "experts": experts, "top_k": top_k, "ffn": ffn, "dim": DIM,
            "mode": "forward+backward" if backward else "forward", "ms": ms, "failed": failed,
            "limit_parts_ms": {"memory": memory_s * 1e3, "compute": compute_ms, **dense},
            "touched_experts": touched, "touched_weight_mb": weight_bytes / 1e6,
            "moecc_over_row_quartiles": paired, "reps": reps, "burst": burst, "round_s": one_round,
            "moecc_kernel": [cpu_grouped.decisions().get(cpu_grouped.bucket(direction, rows, touched, DIM, ffn, 1), "-")
                             for direction in (("forward", "backward") if backward else ("forward",))],
            "threads": torch.get_num_threads()}


def cell_key(c: dict) -> str:
    return f"E{c['experts']}-k{c['top_k']}-ffn{c['ffn']}-T{c['tokens']}-{c['mode']}"


def print_table(results: dict, console: Console) -> None:
    table = Table(title=f"MoE layer sweep on CPU: d={DIM} fp32, {results.get('threads')} threads, ms (median of "
                        "paired rounds); moecc/limit; best other/moecc paired by round (>1: moecc faster)")
    for col in ("E, k, ffn", "tokens", "mode", *ROWS, "limit", "moecc/limit", "best other/moecc", "moecc kernel"):
        table.add_column(col, justify="right" if col not in ("mode", "moecc kernel") else "left")
    for key in sorted(results["cells"], key=lambda k: (results["cells"][k]["experts"], results["cells"][k]["tokens"],
                                                       results["cells"][k]["mode"])):
        c = results["cells"][key]
        head = (f"{c['experts']}, {c['top_k']}, {c['ffn']}", str(c["tokens"]), c["mode"])
        if "skipped" in c:
            table.add_row(*head, *["[yellow]skipped"] * (len(ROWS) + 1), "", "", "")
            continue
        ms = c["ms"]
        cells = [f"{ms[r]:.2f}" if r in ms else ("failed" if r in c["failed"] else "-") for r in ROWS]
        ratio = ms["moecc"] / ms["limit"] if "moecc" in ms and ms["limit"] > 0 else float("nan")
        others = [c["moecc_over_row_quartiles"][r][1] for r in ROWS[:3] if r in c["moecc_over_row_quartiles"]]
        # quartiles are moecc time / row time: the best other row has the largest such ratio
        best = 1 / max(others) if others else float("nan")
        table.add_row(*head, *cells, f"{ms['limit']:.2f}", f"{ratio:.2f}", f"{best:.2f}",
                      ",".join(c.get("moecc_kernel", [])))
    console.print(table)
    for key, c in results["cells"].items():
        if "skipped" in c:
            console.print(f"{key}: skipped: {c['skipped']}")
        for row, why in c.get("failed", {}).items():
            console.print(f"{key}: {row} failed: {why}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cells, few rounds: to check the script runs")
    parser.add_argument("--configs", default=None, help="experts,top_k,ffn[;...] (default: all three)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default: all five)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--mem-fraction", type=float, default=0.5,
                        help="skip a cell whose estimated peak exceeds this share of available memory")
    parser.add_argument("--cell-budget-s", type=float, default=240.0,
                        help="skip a forward+backward cell estimated (from its forward) to take longer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads (1 stays meaningful while other jobs oversubscribe the cores: a "
                             "2-thread OpenMP region then waits for a descheduled thread at every barrier)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.out == parser.get_default("out") and args.threads != (os.cpu_count() or 1):
        args.out = args.out.replace(".json", f"_{args.threads}t.json")
    torch.set_num_threads(args.threads)
    configs = [tuple(map(int, c.split(","))) for c in args.configs.split(";")] if args.configs else list(CONFIGS)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(TOKENS)
    reps = args.reps
    if args.quick:
        configs, tokens, reps = configs[1:2], [16, 256], 3
    import moecc  # noqa: F401  (the backend is found by name; imported for its kernels' calibration state)

    # Three compiled models of one class share its code objects' caches, each token count adds entries: the
    # default limit (8) sends later sizes to eager silently.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096

    results = {"cells": {}}
    if os.path.exists(args.out) and not args.quick:
        with open(args.out) as f:
            results = json.load(f)
    results["threads"] = torch.get_num_threads()
    bandwidth = memory_bandwidth()
    results.setdefault("bandwidth_gbs", {})[time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())] = bandwidth / 1e9
    console = Console(width=200)
    console.print(f"memory bandwidth (sum over 1 GiB, {torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for experts, top_k, ffn in configs:
        torch.manual_seed(0)
        models = build(experts, top_k, ffn)
        for t in tokens:
            forward_round = None
            for backward in (False, True):
                if backward and t < BACKWARD_FROM:
                    continue
                mode = "forward+backward" if backward else "forward"
                cell = {"tokens": t, "experts": experts, "top_k": top_k, "ffn": ffn, "mode": mode}
                need = cell_bytes(t, experts, top_k, ffn)
                # fwd+bwd costs ~3 forwards; 3 paired rounds of (1 untimed + 1 timed) step per row, plus warm-up
                estimate = 3 * forward_round * 8 if backward and forward_round else 0.0
                if need > args.mem_fraction * available:
                    cell["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
                elif estimate > args.cell_budget_s:
                    cell["skipped"] = (f"~{estimate:.0f} s for 3 paired rounds (forward round {forward_round:.1f} s), "
                                       f"over --cell-budget-s {args.cell_budget_s:.0f}")
                else:
                    start = time.perf_counter()
                    cell = measure_cell(models, experts, top_k, ffn, t, backward, reps, bandwidth)
                    cell["wall_s"] = time.perf_counter() - start
                    forward_round = forward_round or cell["round_s"]
                results["cells"][cell_key(cell)] = cell
                console.print(f"{cell_key(cell)}: " + (cell.get("skipped") or
                              " ".join(f"{k} {v:.2f}" for k, v in cell["ms"].items()) + f" ({cell['wall_s']:.0f} s)"))
                if not args.quick:  # after every cell: a long run stopped half-way keeps what it measured
                    save(results, args.out)
                gc.collect()
        del models
        torch._dynamo.reset()
        gc.collect()
    print_table(results, console)
    if not args.quick:
        console.print(f"wrote {args.out}")
    return results


def save(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()

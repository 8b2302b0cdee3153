"""HF transformers MoE families at bench size: eager, stock torch.compile per experts implementation, and moecc.

    python benchmarks/hf_families.py [--families mixtral,gpt_oss] [--reps 3] [--size bench]

Each model (tests/hf_zoo.py, size "bench": hidden 512, expert ffn 1024, 8 experts, top-2, 2 layers, batch 4 x 512
tokens, fp32, CPU) runs as:
  eager/<impl>      the HF model as is, experts implementation <impl> ("eager" loop or "grouped_mm")
  inductor/<impl>   torch.compile(model) (stock Inductor) with that implementation
  moecc/<impl>      torch.compile(model, backend="moecc") with that implementation
Switch Transformers has one implementation (its own loop), so three rows. "forward" is inference (no_grad);
"fwd+bwd" is forward, a sum loss and backward. Best of --reps timed runs after a warm-up (which also compiles);
the median is kept in the JSON.
Compiled rows list the graphs Dynamo made and its graph breaks. Every row runs in a fresh process. Results: a
table on stdout and benchmarks/results/hf_families.json. Timings on a shared machine are noisy: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import hf_zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_families.json")


def _timed(fn, reps: int) -> tuple[float, float, float]:
    """(best wall, median wall, best process CPU) seconds of ``reps`` calls after a warm-up call (which compiles).

    On a machine shared with other jobs interference only adds time, so the best of a few is the table's number;
    process CPU time (all threads) is kept too: it does not count time spent waiting for a core.
    """
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), statistics.median(walls), min(cpus)


def run_row(family: str, impl: str, backend: str | None, size: str, reps: int) -> dict:
    """One row: build the model fresh, optionally compile it, time inference and a training step."""
    from torch._dynamo.utils import counters

    import moecc

    model, make_input = hf_zoo.build(family, impl, size)
    tokens = make_input()
    torch._dynamo.reset()
    counters.clear()
    runner = model if backend is None else torch.compile(model, backend=backend)
    compile_start = time.perf_counter()

    def forward():
        with torch.no_grad():
            runner(tokens)

    def train_step():
        runner(tokens).sum().backward()

    row = {"family": family, "impl": impl, "backend": backend or "eager"}
    row["forward_s"], row["forward_median_s"], row["forward_cpu_s"] = _timed(forward, reps)
    model.zero_grad(set_to_none=True)
    row["fwd_bwd_s"], row["fwd_bwd_median_s"], row["fwd_bwd_cpu_s"] = _timed(train_step, reps)
    row["wall_s"] = time.perf_counter() - compile_start
    if backend is not None:
        row["graphs"] = counters["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(counters["graph_break"].values())
    if backend == "moecc":
        records = moecc.report(model).blocks
        row["blocks"] = len(records)
        row["rewritten"] = sum(r.rewritten for r in records)
        row["fallbacks"] = sorted({r.outcome for r in records if not r.rewritten})
    return row


def _row_in_subprocess(family: str, impl: str, backend: str, args) -> dict:
    """Each row in a fresh process: an earlier row's compiles and checks leave allocator and cache state behind
    that measurably slow the next row down (up to ~10% here), which would favour whichever row runs first."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{family}/{impl}/{backend}", "--size", args.size,
           "--reps", str(args.reps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| family | row | forward ms | fwd+bwd ms | forward CPU ms | fwd+bwd CPU ms | graphs / breaks | "
             "moecc blocks rewritten |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        graphs = f"{r['graphs']} / {r['graph_breaks']}" if "graphs" in r else ""
        blocks = f"{r['rewritten']}/{r['blocks']}" if "blocks" in r else ""
        lines.append(f"| {r['family']} | {r['backend']}/{r['impl']} | {1e3 * r['forward_s']:.0f} | "
                     f"{1e3 * r['fwd_bwd_s']:.0f} | {1e3 * r['forward_cpu_s']:.0f} | {1e3 * r['fwd_bwd_cpu_s']:.0f} | "
                     f"{graphs} | {blocks} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(hf_zoo.FAMILIES))
    parser.add_argument("--backends", default="eager,inductor,moecc")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", default="bench", choices=sorted(hf_zoo.SIZES))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--row", help="FAMILY/IMPL/BACKEND: run one row in this process (used internally)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine two threads wait on "
                             "each other whenever another job takes a core; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.row:  # one row, in this (fresh) process: print it as JSON
        family, impl, backend = args.row.split("/")
        print(json.dumps(run_row(family, impl, None if backend == "eager" else backend, args.size, args.reps)))
        return 0
    rows = []
    for family in args.families.split(","):
        for impl in hf_zoo.IMPLS[family]:
            for backend in args.backends.split(","):
                rows.append(_row_in_subprocess(family, impl, backend, args))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"size": hf_zoo.SIZES[args.size], "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

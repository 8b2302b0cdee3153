"""Expert-parallel step time at 1, 2 and 4 gloo ranks on this machine, beside the whole-step cost model's prediction.

One Mixtral-style MoE layer (d=256, ffn=512, E=8, top-2), a global batch of 2048 tokens split over the ranks,
forward+backward, compiled with backend="moecc" (experts sharded round-robin, all-to-all in the graph), without
and with the chunked overlap of the exchange (``options={"moecc.overlap_chunks": c}``; skipped, said so, while
moecc does not know the option). Each rank runs one thread; this machine has 2 cores, so 4 ranks share them two
by two: the prediction stretches every local computation by ranks / cores (``cpu_share``), not the exchanges,
whose price was measured with the ranks sharing the cores (``step.all_to_all_measured``).

The prediction is ``costmodel.step.step_breakdown`` (docs/costmodel.md, "The whole step") on the profile given
(default: the shipped ``cpu`` profile; pass the one ``moecc calibrate`` wrote on the machine the benchmark runs
on), with the routed loads the run measured. The older model (expert FFNs and the rows' all-to-all only,
``formulas.py``) is printed beside it.

    flock /tmp/moecc-bench.lock python benchmarks/ep_scaling.py [--ranks 1 2 4] [--chunks 1 2] [--steps 10]
                                                                [--profile cpu]

Prints a rich table and writes benchmarks/results/ep_scaling.json (rows, the profile, the load average before and
after each run: how noisy the machine was).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, FFN, EXPERTS, TOP_K, TOKENS = 256, 512, 8, 2, 2048


def worker(rank: int, world: int, port: int, steps: int, chunks: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import moe_zoo

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE(DIM, FFN, EXPERTS, TOP_K)
    # the exchange pinned (the default "auto" lets the cost model choose): flat, ``chunks`` pipelined chunks
    options = {"moecc.overlap_chunks": chunks, "moecc.all_to_all": "flat"} if overlap_option_known() else None
    compiled = torch.compile(model, backend="moecc", options=options)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(TOKENS, DIM, generator=gen)
    x = x_all.view(world, -1, DIM)[rank:rank + 1].clone().requires_grad_(True)
    times = []
    for step in range(steps + 3):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        compiled(x)[0].sum().backward()
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        _, _, chosen = model.router(x_all)
    load = torch.bincount(chosen.flatten(), minlength=EXPERTS).tolist()
    with open(out, "w") as f:
        json.dump({"step_s": statistics.median(times[3:]), "best_step_s": min(times[3:]), "load": load}, f)
    if world > 1:
        dist.destroy_process_group()


def overlap_option_known() -> bool:
    """Whether this moecc has ``moecc.overlap_chunks`` (issue 16, item 1)."""
    from moecc.options import Options

    return "overlap_chunks" in {f.name for f in dataclasses.fields(Options)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, steps: int, chunks: int) -> dict:
    tmp = tempfile.mkdtemp()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(steps),
                               str(chunks), os.path.join(tmp, f"{r}.json")]) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1200) != 0:
            raise RuntimeError(f"rank worker failed (world {world})")
    ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]
    return {"step_s": max(r["step_s"] for r in ranks), "best_step_s": max(r["best_step_s"] for r in ranks),
            "load": ranks[0]["load"]}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def predict(profile, world: int, chunks: int, load: list[int]):
    """(the whole-step breakdown, the older model's FFN + all-to-all) for this run's loads."""
    from moecc.backends.ep import default_placement
    from moecc.costmodel.formulas import ExpertDims, compile_cost_model
    from moecc.costmodel.step import LayerWork, step_breakdown

    share = max(1.0, world / cores())
    placement = default_placement(EXPERTS, world)
    work = LayerWork(tokens=TOKENS // world, d_model=DIM, d_ffn=FFN, top_k=TOP_K, num_experts=EXPERTS, act_bytes=4,
                     param_bytes=4, training=True, accumulate_grads=True)  # the loop never zeroes the gradients
    whole = step_breakdown(profile, work, world, load=load, placement=placement, chunks=chunks, node_size=world,
                           cpu_share=share)
    one_host = dataclasses.replace(profile, devices_per_node=max(world, profile.devices_per_node))
    old = compile_cost_model(one_host, ExpertDims(d_model=DIM, d_ffn=FFN, act_bytes=4, param_bytes=4), world)
    compute = max(old.rank_compute_s(placement, load))
    return whole, compute * share + (old.step_s(placement, load) - compute)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2],
                        help="overlap chunks to run (1: exchange, experts, exchange back to back)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="cpu", help="profile file or shipped name (default: cpu)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, port, steps, chunks, out = args.worker
        worker(int(rank), int(world), int(port), int(steps), int(chunks), out)
        return {}
    from rich.console import Console
    from rich.table import Table

    from moecc.costmodel.profile import load_profile

    console = Console(width=190)
    profile = load_profile(args.profile)
    chunks = sorted(set(args.chunks))
    if any(c > 1 for c in chunks) and not overlap_option_known():
        console.print("[yellow]moecc.overlap_chunks is not a moecc option yet (issue 16, item 1): the overlap rows "
                      "are skipped; run again once it lands.[/]")
        chunks = [1]
    rows = []
    for world in args.ranks:
        for c in chunks:
            if c > 1 and world == 1:
                continue  # nothing to overlap on one rank
            load_before = os.getloadavg()[0]
            measured = run(world, args.steps, c)
            whole, old = predict(profile, world, c, measured["load"])
            rows.append({"ranks": world, "chunks": c, "measured_step_s": measured["step_s"],
                         "measured_best_step_s": measured["best_step_s"],
                         "predicted_step_s": whole.total_s, "error": whole.total_s / measured["step_s"] - 1,
                         "old_model_step_s": old, "breakdown": dataclasses.asdict(whole), "load": measured["load"],
                         "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]})
    base = rows[0]["measured_step_s"]
    table = Table(title=f"EP step time, MoE layer d={DIM} ffn={FFN} E={EXPERTS} top-{TOP_K}, {TOKENS} tokens (global), "
                        f"fwd+bwd, gloo on loopback, 1 thread per rank, {cores()} cores; profile {profile.name}")
    for col in ("ranks", "chunks", "measured ms", "best ms", "speedup", "predicted ms", "error", "old model ms",
                "experts (fwd+bwd)", "exchanges", "hidden", "router+permutes+host", "load avg"):
        table.add_column(col, justify="right")
    for r in rows:
        bd = r["breakdown"]
        hidden = bd["expert_compute_s"] + bd["exchange_s"] - bd["forward_s"] - bd["backward_s"]
        ok = "green" if abs(r["error"]) <= 0.15 else "red"
        table.add_row(str(r["ranks"]), str(r["chunks"]), f"{1e3 * r['measured_step_s']:.1f}",
                      f"{1e3 * r['measured_best_step_s']:.1f}",
                      f"{base / r['measured_step_s']:.2f}x", f"{1e3 * r['predicted_step_s']:.1f}",
                      f"[{ok}]{100 * r['error']:+.1f}%[/]", f"{1e3 * r['old_model_step_s']:.1f}",
                      f"{1e3 * bd['expert_compute_s']:.1f}", f"{1e3 * (bd['exchange_s'] + bd['counts_s']):.1f}",
                      f"{1e3 * hidden:.1f}",
                      f"{1e3 * (bd['router_s'] + bd['permute_s'] + bd['host_s'] + bd['accumulate_s']):.1f}",
                      f"{r['loadavg_before']:.1f}-{r['loadavg_after']:.1f}")
    console.print(table)
    console.print("measured: the median step (the slowest rank's), best: its fastest step; error: predicted / "
                  "measured median - 1 (target within 15%). Load average: of the whole machine around each run "
                  f"({cores()} cores: beyond the ranks themselves, other work shared them and inflated the times).")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "ep_scaling.json")
    with open(path, "w") as f:
        json.dump({"profile": profile.name, "profile_source": profile.source, "cores": cores(), "rows": rows}, f,
                  indent=2)
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

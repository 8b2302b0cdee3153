"""Expert-parallel step time at 1, 2 and 4 gloo ranks on this machine, beside the cost model's prediction.

One Mixtral-style MoE layer (d=256, ffn=512, E=8, top-2), a global batch of 2048 tokens split over the ranks,
forward+backward, compiled with backend="moecc" (experts sharded round-robin, all-to-all in the graph). Each rank
runs one thread; this machine has 2 cores, so 4 ranks share them two by two (the "shared cores" prediction
multiplies compute by ranks / cores for that).

    python benchmarks/ep_scaling.py [--ranks 1 2 4] [--steps 10]

Prints a rich table and writes benchmarks/results/ep_scaling.json.
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


def worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import moe_zoo

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE(DIM, FFN, EXPERTS, TOP_K)
    compiled = torch.compile(model, backend="moecc")
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
        json.dump({"step_s": statistics.median(times[3:]), "load": load}, f)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, steps: int) -> dict:
    tmp = tempfile.mkdtemp()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(steps),
                               os.path.join(tmp, f"{r}.json")]) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1200) != 0:
            raise RuntimeError(f"rank worker failed (world {world})")
    ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]
    return {"step_s": max(r["step_s"] for r in ranks), "load": ranks[0]["load"]}


def predict(world: int, load: list[int]) -> tuple[float, float]:
    """(ranks as independent 1-thread devices, the same with compute scaled for ranks sharing this machine's cores)."""
    from moecc.backends.ep import default_placement
    from moecc.costmodel.formulas import ExpertDims, compile_cost_model
    from moecc.costmodel.profile import builtin_profile

    profile = dataclasses.replace(builtin_profile("cpu"), devices_per_node=8)  # every rank on this one host
    dims = ExpertDims(d_model=DIM, d_ffn=FFN, act_bytes=4, param_bytes=4, training=True)
    model = compile_cost_model(profile, dims, world)
    placement = default_placement(EXPERTS, world)
    compute = max(model.rank_compute_s(placement, load))
    comm = model.step_s(placement, load) - compute
    share = max(1.0, world / (os.cpu_count() or 1))
    return compute + comm, compute * share + comm


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, port, steps, out = args.worker
        worker(int(rank), int(world), int(port), int(steps), out)
        return {}
    from rich.console import Console
    from rich.table import Table

    rows = []
    for world in args.ranks:
        measured = run(world, args.steps)
        pred, pred_shared = predict(world, measured["load"])
        rows.append({"ranks": world, "measured_step_s": measured["step_s"], "predicted_step_s": pred,
                     "predicted_shared_cores_s": pred_shared, "load": measured["load"]})
    base = rows[0]["measured_step_s"]
    table = Table(title=f"EP step time, MoE layer d={DIM} ffn={FFN} E={EXPERTS} top-{TOP_K}, {TOKENS} tokens "
                        f"(global), fwd+bwd, gloo on loopback, 1 thread per rank, {os.cpu_count()} cores")
    for col in ("ranks", "measured ms", "speedup vs 1 rank", "predicted ms (own core each)",
                "predicted ms (shared cores)", "measured / predicted (shared)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["ranks"]), f"{1e3 * r['measured_step_s']:.1f}", f"{base / r['measured_step_s']:.2f}x",
                      f"{1e3 * r['predicted_step_s']:.1f}", f"{1e3 * r['predicted_shared_cores_s']:.1f}",
                      f"{r['measured_step_s'] / r['predicted_shared_cores_s']:.2f}")
    Console(width=170).print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "ep_scaling.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

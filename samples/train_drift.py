"""A small MoE language model trained on real text, whose routing drifts as it learns; moecc switches placement.

The text is the Python documentation's topic pages that ship with the standard library (``pydoc_data.topics``):
real English and code, nothing downloaded. Byte-level, two MoE layers of 16 experts, top-2.

    torchrun --nproc-per-node 4 samples/train_drift.py --switching on  --trace /tmp/moecc_trace.json
    torchrun --nproc-per-node 4 samples/train_drift.py --switching off
    python samples/train_drift.py --compare            # runs both under torchrun, then simulates the trace

Each rank reads its own slices of the text; experts are sharded over the ranks with one spare slot per rank for
a replica of a hot expert. ``moecc.attach(optimizer, check_every=...)`` watches loads on the device and switches
placement when the cost model says it pays; rank 0 prints step times and the switch log, and saves the trace.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERTS, SLOTS_PER_RANK = 16, 5


def corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8", errors="ignore")


def train(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, HERE)
    from demo import TinyMoELM

    import moecc
    from moecc.backends.ep import default_placement

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyMoELM(dim=64, ffn=64, layers=2, num_experts=EXPERTS)
    placement = default_placement(EXPERTS, world, SLOTS_PER_RANK)
    model.compile(backend="moecc", options={"moecc.placement": placement})
    text = torch.tensor(list(corpus()), dtype=torch.long)
    gen = torch.Generator().manual_seed(1000 + rank)

    def batch():
        start = torch.randint(0, text.numel() - 129, (8,), generator=gen)
        return torch.stack([text[s: s + 129] for s in start.tolist()])

    moecc.distribute(model, batch()[:, :-1])  # each rank keeps only its slots
    DDP._set_params_and_buffers_to_ignore_for_model(model, moecc.expert_parameter_names(model))
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    moecc.attach(optimizer, average=True, check_every=args.check_every, switching=args.switching == "on")
    times, losses = [], []
    for step in range(args.steps):
        tokens = batch()
        t = time.perf_counter()
        loss = F.cross_entropy(ddp(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if rank == 0 and step % 20 == 0:
            print(f"step {step}: loss {loss.item():.3f}  {1e3 * times[-1]:.1f} ms", flush=True)
    if rank == 0:
        steady = times[args.steps // 5:]
        result = {"switching": args.switching, "mean_step_s": statistics.mean(steady),
                  "median_step_s": statistics.median(steady), "final_loss": statistics.mean(losses[-10:]),
                  "switches": len(moecc.report(model).switches)}
        print(json.dumps(result))
        if args.trace:
            moecc.save_trace(model, args.trace)
        if args.result:
            with open(args.result, "w") as f:
                json.dump(result, f)
        from rich.console import Console

        Console(width=200).print(moecc.report())
    dist.destroy_process_group()


def compare(args) -> None:
    os.makedirs(os.path.join(HERE, "..", "benchmarks", "results"), exist_ok=True)
    out = os.path.join(HERE, "..", "benchmarks", "results")
    results = {}
    for mode in ("off", "on"):
        res = os.path.join(out, f"drift_{mode}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
               "--master-port", str(29700 + (mode == "on")), __file__, "--switching", mode,
               "--steps", str(args.steps), "--check-every", str(args.check_every), "--result", res]
        if mode == "on":
            cmd += ["--trace", os.path.join(out, "drift_trace.json")]
        subprocess.run(cmd, check=True)
        results[mode] = json.load(open(res))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MoE LM on pydoc text, {args.ranks} gloo ranks, {args.steps} steps (measured)")
    for col in ("placement", "mean step ms", "median step ms", "final loss", "switches"):
        table.add_column(col, justify="right")
    for mode, label in (("off", "static (round-robin)"), ("on", "moecc switching")):
        r = results[mode]
        table.add_row(label, f"{1e3 * r['mean_step_s']:.1f}", f"{1e3 * r['median_step_s']:.1f}",
                      f"{r['final_loss']:.3f}", str(r["switches"]))
    Console(width=150).print(table)
    speedup = results["off"]["mean_step_s"] / results["on"]["mean_step_s"]
    print(f"speedup of switching over static (mean step): {speedup:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switching", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--trace", default="")
    parser.add_argument("--result", default="")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()
    compare(args) if args.compare else train(args)


if __name__ == "__main__":
    main()

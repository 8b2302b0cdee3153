"""What expert parallelism is for: memory. Per-rank expert bytes (weights, gradients, AdamW state) and peak memory
at 1, 2 and 4 gloo ranks, for E=16 and E=64, beside one process.

One Mixtral-style MoE layer (ModuleList SwiGLU experts, d=256, ffn=512, top-2), ``moecc.distribute`` on the ranks,
AdamW built after it, three training steps. Bytes are counted from tensor storages (a freed user parameter counts
zero); "dense" is the router. Peak RSS is the process's high-water mark, which includes the compile and the
user's full model as built before ``distribute`` freed its experts (every rank builds it: see the README).

    python benchmarks/ep_memory.py [--ranks 1 2 4] [--experts 16 64]
    python benchmarks/ep_memory.py --fits-only-sharded   # E=64, d=1024, ffn=2048 on 4 ranks (1.6 GB of experts)

Prints a rich table and writes benchmarks/results/ep_memory.json (``ep_memory_big.json`` for the second form).
Ranks share this machine's 2 cores. ``--fits-only-sharded`` trains a model whose experts' training state (weights,
gradients, AdamW moments: 4x the weights, 6.4 GB) does not fit in one rank's share of this machine's memory
(MemTotal / 4); it never runs the unsharded model on 4 ranks (4 x 6.4 GB would exhaust the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, FFN, TOP_K, TOKENS = 256, 512, 2, 512


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def worker(rank: int, world: int, port: int, experts: int, out: str, dim: int = DIM, ffn: int = FFN,
           tokens: int = TOKENS) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import moe_zoo

    import moecc

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = moe_zoo.LoopMoE(dim, ffn, experts, TOP_K)
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = torch.randn(1, tokens // world, dim, generator=torch.Generator().manual_seed(rank))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        moecc.distribute(model, x)
    else:
        model.compile(backend="moecc")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if world > 1:
        moecc.attach(opt, check_every=10_000)
    for _ in range(3):
        model(x)[0].pow(2).mean().backward()
        opt.step()
    expert_ids = {id(p) for p in model.experts.parameters()}
    if world > 1:
        expert_ids |= {id(p) for layer in moecc.session(model).layers for p in layer.params}
    experts_p = [p for p in model.parameters() if id(p) in expert_ids]
    dense_p = [p for p in model.parameters() if id(p) not in expert_ids]

    def state(params):
        return [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]

    facts = {"weights": _bytes(experts_p), "grads": _bytes(p.grad for p in experts_p if p.grad is not None),
             "optimizer": _bytes(state(experts_p)), "dense": _bytes(dense_p + state(dense_p)),
             "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "built_rss": built_rss,
             "slots": len(moecc.session(model).layers[0].local_experts)}
    with open(out, "w") as f:
        json.dump(facts, f)
    if world > 1:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, experts: int, dim: int = DIM, ffn: int = FFN, tokens: int = TOKENS) -> list[dict]:
    port, tmp = _port(), tempfile.mkdtemp()
    outs = [os.path.join(tmp, f"{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(experts),
                               outs[r], str(dim), str(ffn), str(tokens)]) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1200):
            raise SystemExit(f"a rank failed at world={world}, E={experts}")
    return [json.load(open(o)) for o in outs]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--fits-only-sharded", action="store_true")
    args = parser.parse_args()
    if args.fits_only_sharded:
        return fits_only_sharded()
    rows = []
    for experts in args.experts:
        single = None
        for world in args.ranks:
            ranks = run(world, experts)
            worst = max(ranks, key=lambda f: f["weights"] + f["grads"] + f["optimizer"])
            total = worst["weights"] + worst["grads"] + worst["optimizer"]
            single = single or (total if world == 1 else None)
            rows.append({"experts": experts, "ranks": world, "slots": worst["slots"], **worst,
                         "expert_total": total, "vs_one_process": total / single if single else None,
                         "peak_rss_max": max(f["peak_rss"] for f in ranks)})
    table = Table(title=f"expert memory per rank (d={DIM}, ffn={FFN}, top-{TOP_K}, fp32, AdamW)")
    for col in ("E", "ranks", "slots/rank", "weights MB", "grads MB", "AdamW MB", "experts MB", "vs 1 process",
                "dense MB", "peak RSS MB"):
        table.add_column(col, justify="right")
    mb = 2 ** 20
    for r in rows:
        ratio = f"{r['vs_one_process']:.3f}" if r["vs_one_process"] is not None else "-"
        table.add_row(str(r["experts"]), str(r["ranks"]), str(r["slots"]), f"{r['weights'] / mb:.1f}",
                      f"{r['grads'] / mb:.1f}", f"{r['optimizer'] / mb:.1f}", f"{r['expert_total'] / mb:.1f}", ratio,
                      f"{r['dense'] / mb:.2f}", f"{r['peak_rss_max'] / mb:.0f}")
    Console(width=150).print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ep_memory.json"), "w") as f:
        json.dump(rows, f, indent=1)


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def fits_only_sharded(world: int = 4, experts: int = 64, dim: int = 1024, ffn: int = 2048, tokens: int = 1024):
    """One model whose experts' training state exceeds a rank's share of this machine, trained on 4 ranks."""
    from rich.console import Console
    from rich.table import Table

    weights = experts * 3 * dim * ffn * 4
    share = _mem_total() / world
    ranks = run(world, experts, dim, ffn, tokens)
    gb = 2 ** 30
    table = Table(title=f"a model that fits only when sharded: E={experts}, d={dim}, ffn={ffn}, SwiGLU, fp32, "
                        f"AdamW, {world} gloo ranks; share = MemTotal / {world} = {share / gb:.2f} GB")
    for col in ("rank", "slots", "expert state GB (w+g+AdamW)", "unsharded expert state GB", "RSS after build GB",
                "peak RSS GB", "peak / share"):
        table.add_column(col, justify="right")
    for r, f in enumerate(ranks):
        state = f["weights"] + f["grads"] + f["optimizer"]
        table.add_row(str(r), str(f["slots"]), f"{state / gb:.2f}", f"{4 * weights / gb:.2f}",
                      f"{f['built_rss'] / gb:.2f}", f"{f['peak_rss'] / gb:.2f}", f"{f['peak_rss'] / share:.2f}")
    Console(width=160).print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ep_memory_big.json"), "w") as f:
        json.dump({"experts": experts, "dim": dim, "ffn": ffn, "world": world, "share_bytes": share,
                   "unsharded_state_bytes": 4 * weights, "ranks": ranks}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, experts, out, dim, ffn, tokens = sys.argv[2:10]
        worker(int(rank), int(world), int(port), int(experts), out, int(dim), int(ffn), int(tokens))
    else:
        main()

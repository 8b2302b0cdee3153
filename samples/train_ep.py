"""Expert-parallel training with moecc: launch with torchrun, unchanged on CPUs (gloo) and GPUs (NCCL).

    torchrun --nproc-per-node 4 samples/train_ep.py            # CPU: gloo on loopback
    torchrun --nproc-per-node 8 samples/train_ep.py            # GPUs: NCCL, one GPU per rank

Each rank trains on its own batches (data parallel); every MoE block's experts are sharded over the ranks
(expert parallel, round-robin by default), rows travel by all-to-all inside the compiled graph. The non-expert
parameters are averaged over ranks as DDP does, the expert parameters excluded (their gradients already live on
the rank that hosts them); ``moecc.attach(optimizer, average=True)`` keeps replicas equal and scales expert
gradients like DDP.
Here the dense gradients are averaged by hand (what DDP does); the README shows the DDP wrapping.
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import TinyMoELM  # noqa: E402  (the demo's two-layer Mixtral-style model)

import moecc  # noqa: E402


def main(steps: int = 8) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyMoELM().to(device)
    compiled = torch.compile(model, backend="moecc")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    moecc.attach(optimizer, average=True)

    text = torch.tensor(list(open(__file__, "rb").read()), device=device)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    dense = None
    for step in range(steps):
        start = torch.randint(0, text.numel() - 65, (4,), generator=gen)
        batch = torch.stack([text[s: s + 65] for s in start.tolist()])
        t = time.perf_counter()
        logits = compiled(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        if dense is None:  # expert parameters are known once the first graph is compiled
            ignore = set(moecc.expert_parameter_names(model))
            dense = [p for n, p in model.named_parameters() if n not in ignore]
        for p in dense:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  {1e3 * (time.perf_counter() - t):.0f} ms", flush=True)
    if rank == 0:
        from rich.console import Console

        Console(width=200).print(moecc.report())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

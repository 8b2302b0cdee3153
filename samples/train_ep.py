"""Expert-parallel training with moecc: launch with torchrun, unchanged on CPUs (gloo) and GPUs (NCCL).

    torchrun --nproc-per-node 4 samples/train_ep.py            # CPU: gloo on loopback
    torchrun --nproc-per-node 8 samples/train_ep.py            # GPUs: NCCL, one GPU per rank

Each rank trains on its own batches (data parallel); every MoE block's experts are sharded over the ranks
(expert parallel, round-robin by default) and each rank stores only its slots (``moecc.distribute``); rows travel
by all-to-all inside the compiled graph. The dense parameters are data parallel under DDP, the experts excluded
(their gradients already live on the rank that hosts them); ``moecc.attach(optimizer, average=True)`` keeps
replicas equal and scales expert gradients like DDP. At the end, a DCP checkpoint in logical expert order.
"""
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import TinyMoELM  # noqa: E402  (the demo's two-layer Mixtral-style model)

import moecc  # noqa: E402
import moecc.checkpoint  # noqa: E402


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
    text = torch.tensor(list(open(__file__, "rb").read()), device=device)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data

    def batch():
        start = torch.randint(0, text.numel() - 65, (4,), generator=gen)
        return torch.stack([text[s: s + 65] for s in start.tolist()])

    moecc.distribute(model, batch()[:, :-1])  # compiles in place; this rank keeps only its experts' slots
    DDP._set_params_and_buffers_to_ignore_for_model(model, moecc.expert_parameter_names(model))
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # after distribute: it steps the slots
    moecc.attach(optimizer, average=True)
    for step in range(steps):
        tokens = batch()
        t = time.perf_counter()
        loss = F.cross_entropy(ddp(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  {1e3 * (time.perf_counter() - t):.0f} ms", flush=True)
    moecc.checkpoint.save(model, optimizer, os.path.join(tempfile.gettempdir(), "moecc_train_ep_ckpt"))
    if rank == 0:
        from rich.console import Console

        Console(width=200).print(moecc.report())
        print("expert bytes on rank 0:", moecc.session(model).memory())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

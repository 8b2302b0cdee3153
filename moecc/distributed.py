"""``moecc.distribute``: expert parallelism that saves memory, in one call before the optimizer is built.

    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))   # or a 1-D mesh: all ranks are EP
    compiled = moecc.distribute(model, example_batch, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters())                      # steps exactly this rank's slots

It compiles the model with ``backend="moecc"`` on the example batch (a forward only: the backward compiles at the
first ``backward()``), sharding every rewritten block's experts over the mesh's ``ep`` dim and replicating them
over its ``dp`` dim. Each rank then stores only its slots (``moecc/slot_storage.py``): the slot tensors are
parameters of the block's module (``<block>.moecc_slots_<i>``), the user's expert parameters keep their names and
shapes but hold no bytes. Like ``fully_shard``, it is called on the model before the optimizer is created; an
optimizer built earlier is refused at its first step.
"""
from __future__ import annotations

import torch

from moecc import sessions


def distribute(model: torch.nn.Module, *example_args, mesh=None, **example_kwargs) -> torch.nn.Module:
    """Compile ``model`` (or the ``torch.compile(..., backend="moecc")`` module it already is) on one example
    batch under expert parallelism over ``mesh`` (a ``DeviceMesh``: 1-D, or with dims ``"ep"`` and ``"dp"``;
    default: the whole world is expert-parallel) and return the compiled module. Call it on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("moecc.distribute needs torch.distributed: call dist.init_process_group (torchrun) "
                           "first; on one process, use torch.compile(model, backend='moecc') as it is")
    compiled = model if hasattr(model, "_orig_mod") else torch.compile(model, backend="moecc")
    module = compiled._orig_mod
    owner = sessions.for_module(module)
    if owner.layers:
        raise RuntimeError(f"moecc.distribute: this {type(module).__name__} was already compiled by moecc "
                           "(its experts are placed); call distribute once, before the first compiled call")
    owner.mesh = mesh
    compiled(*example_args, **example_kwargs)
    if not any(layer.sharded for layer in owner.layers):
        reasons = "; ".join(f"{b.spec.path or '<root>'}: {b.outcome}" for b in owner.blocks) or "no MoE block found"
        raise RuntimeError(f"moecc.distribute: no expert block of this {type(module).__name__} was sharded "
                           f"({reasons}); see moecc.report(model)")
    return compiled

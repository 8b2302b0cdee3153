"""``moecc.distribute``: expert parallelism that saves memory, in one call before the optimizer is built.

    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))   # or a 1-D mesh: all ranks are EP
    moecc.distribute(model, example_batch, mesh=mesh)                      # model(x) now runs compiled
    optimizer = torch.optim.AdamW(model.parameters())                      # steps exactly this rank's slots

It compiles the model in place (``model.compile(backend="moecc")``, so DDP can wrap it afterwards) and runs it on
the example batch (a forward only: the backward compiles at the first ``backward()``), sharding every rewritten
block's experts over the mesh's ``ep`` dim and replicating them over its ``dp`` dim. Each rank then stores only
its slots (``moecc/slot_storage.py``): the slot tensors are parameters of the block's module
(``<block>.moecc_slots.<i>``), the user's expert parameters keep their names and shapes but hold no bytes.
Like ``fully_shard``, it is called on the model before the optimizer is created; an optimizer built earlier is
refused at its first step.
"""
from __future__ import annotations

import torch

from moecc import sessions


def distribute(model: torch.nn.Module, *example_args, mesh=None, **example_kwargs) -> torch.nn.Module:
    """Compile ``model`` in place (or use the ``torch.compile(..., backend="moecc")`` module it already is) on one
    example batch under expert parallelism over ``mesh`` (a ``DeviceMesh``: 1-D, or with dims ``"ep"`` and
    ``"dp"``; default: the whole world is expert-parallel); returns it. Call it on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("moecc.distribute needs torch.distributed: call dist.init_process_group (torchrun) "
                           "first; on one process, use torch.compile(model, backend='moecc') as it is")
    _check_same_mesh(mesh)
    compiled = model
    if not hasattr(model, "_orig_mod") and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(backend="moecc")
    module = getattr(model, "_orig_mod", model)
    owner = sessions.for_module(module)
    if owner.layers:
        raise RuntimeError(f"moecc.distribute: this {type(module).__name__} was already compiled by moecc "
                           "(its experts are placed); call distribute once, before the first compiled call")
    owner.mesh = mesh
    compiled(*example_args, **example_kwargs)
    _reshard_fsdp(module)
    if not any(layer.sharded for layer in owner.layers):
        reasons = "; ".join(f"{b.spec.path or '<root>'}: {b.outcome}" for b in owner.blocks) or "no MoE block found"
        raise RuntimeError(f"moecc.distribute: no expert block of this {type(module).__name__} was sharded "
                           f"({reasons}); see moecc.report(model)")
    return compiled


def _check_same_mesh(mesh) -> None:
    """Ranks that shard over different meshes would exchange rows with the wrong peers and hang: refuse on every
    rank, before any collective of the model runs."""
    import torch.distributed as dist

    mine = None if mesh is None else (tuple(mesh.mesh.shape), tuple(mesh.mesh_dim_names or ()),
                                      mesh.mesh.flatten().tolist())
    from moecc.backends.ep import first_disagreeing_rank

    differs = first_disagreeing_rank(mine)
    if differs is not None:
        r, theirs = differs
        raise ValueError(f"moecc.distribute: rank {dist.get_rank()} got mesh {_describe(mine)} but rank {r} got "
                         f"{_describe(theirs)}; pass the same DeviceMesh on every rank")


def _describe(mesh_facts) -> str:
    if mesh_facts is None:
        return "None (the whole world)"
    shape, names, _ = mesh_facts
    return f"shape {shape} dims {names}"


def _reshard_fsdp(module: torch.nn.Module) -> None:
    """FSDP2 keeps a root unit's parameters unsharded after a forward until its backward; an optimizer built now
    would step those temporary tensors. Put every unit back to its sharded parameters (what the optimizer must
    hold), as the next backward would."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()

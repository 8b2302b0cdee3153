"""The runtime side of rewritten MoE layers: their placement tensors, their experts' parameters, gradient upkeep.

Each block rewritten for expert parallelism registers a :class:`SlotLayer` here. Training then needs one call
before ``optimizer.step()`` -- or none, after :func:`attach` hooked it onto the optimizer:

- replicas of an expert (on several ranks) must see the same gradient: the hosts' partial gradients are summed;
- an expert this rank does not host has no gradient here (set to None, so the optimizer leaves its copy alone);
- ``average=True`` divides expert gradients by the world size, matching DDP's averaging of the other parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(eq=False, slots=True)
class SlotLayer:
    """One rewritten block under expert parallelism."""

    path: str
    config: object  # backends.ep.EPConfig
    expert_params: list[list[torch.nn.Parameter]]  # per expert (ModuleList); empty when stacked
    stacked_params: list[torch.nn.Parameter] = field(default_factory=list)  # [E, ...] parameters
    placement_buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def group(self):
        return dist.distributed_c10d._resolve_process_group(self.config.group_name)

    def hosted(self) -> set[int]:
        p = self.config.placement
        return {p.expert_S[s] for s in p.layout.slots_of(self.config.rank) if p.expert_S[s] >= 0}

    def replicated(self) -> list[int]:
        return [e for e, n in enumerate(self.config.placement.replicas()) if n > 1]


_layers: list[SlotLayer] = []


def register(layer: SlotLayer) -> None:
    _layers.append(layer)


def layers() -> list[SlotLayer]:
    """Every EP layer compiled in this process, oldest first."""
    return list(_layers)


def clear() -> None:
    _layers.clear()


def sync_expert_grads(average: bool = False) -> None:
    """Make expert gradients right for this rank's optimizer step (see the module docstring)."""
    for layer in layers():
        group = layer.group()
        world = dist.get_world_size(group)
        hosted, replicated = layer.hosted(), layer.replicated()
        if layer.expert_params:
            for e, params in enumerate(layer.expert_params):
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                if e in replicated:
                    for p in params:
                        dist.all_reduce(p.grad, group=group)
                for p in params:
                    if e not in hosted and e not in replicated:
                        p.grad = None
                    elif average:
                        p.grad.div_(world)
        for p in layer.stacked_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            for e in replicated:
                dist.all_reduce(p.grad[e], group=group)
            if average:
                p.grad.div_(world)


def attach(optimizer: torch.optim.Optimizer, average: bool = False):
    """Run :func:`sync_expert_grads` before every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: sync_expert_grads(average))


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters that belong to experts of rewritten EP layers (for DDP to ignore)."""
    ids = {id(p) for layer in layers() for ps in layer.expert_params for p in ps}
    ids |= {id(p) for layer in layers() for p in layer.stacked_params}
    return [name for name, p in model.named_parameters() if id(p) in ids]

"""The runtime side of rewritten MoE layers: load monitor, placement switching, gradient upkeep, checkpoints.

Every block the MoE pass rewrites becomes a :class:`SlotLayer` of its model's session (``moecc/session.py``): its
experts' parameters, its placement buffers (read by the compiled graph, so changing them changes data, never code)
and its load counter (tokens per expert, summed on the device by the graph at every step, read here every N
steps: no per-step host sync). The functions here act on the layers they are given; they hold no state.

Under expert parallelism every rank keeps the user's whole model; a rank *hosts* the experts its slots hold and
only hosts compute an expert. Training needs one line, ``moecc.attach(optimizer)``:

- before each ``optimizer.step()``: replicas' partial gradients are summed; ModuleList experts this rank does not
  host get no gradient (the optimizer leaves their copies alone; the slices of a stacked weight that this rank
  does not host hold zeros, and AdamW's decay still moves them, so only the hosts' slices are authoritative);
  ``average=True`` divides expert gradients by the world size to match DDP's averaging of the dense parameters;
- after each step, every ``check_every`` steps (the commit point between the step and the next forward): the load
  window is summed over ranks, each candidate placement is priced with the cost model, and the layer switches
  when the predicted saving over the next interval exceeds the predicted switch cost (``costmodel/switching.py``
  decides). Both predictions are corrected by what the last switch really cost and gained (a switch that gained
  nothing stops further ones). A switch broadcasts the weights, gradients and optimizer state of every expert that
  gains a host from one of its old hosts, then rewrites the placement buffers in place.

Checkpoints: :func:`consolidate` refreshes every rank's copy of every expert from a host, so ``state_dict()`` is
the whole model in logical expert order, whatever the placement; it loads under any placement or world size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from moecc.passes.moe_pass import ExpertWeights


@dataclass(eq=False, slots=True)
class SlotLayer:
    """One rewritten block, as the runtime sees it: built from the MoE pass's ``BlockResult``."""

    path: str
    num_experts: int
    d_model: int
    experts: ExpertWeights  # the real expert parameters the compiled graph reads
    buffers: dict[str, torch.Tensor]  # the placement tensors and the load counter the compiled graph reads
    config: object | None = None  # backends.ep.EPConfig under expert parallelism (replaced by a switch)
    pool: object | None = None  # costmodel Pool to choose from; None: current vs a greedy re-plan
    switch_log: list = field(default_factory=list)
    local_placement: object | None = None  # one process: slots are all local, the placement is bookkeeping
    trace: list = field(default_factory=list)  # per check: mean routed rows per expert per step (all ranks)
    optimizers: list = field(default_factory=list)  # the attached optimizers that step this layer's experts
    kinds: list = field(default_factory=list)  # slot_storage.SlotKind per weight kind: what this rank stores
    module_path: str = ""  # the module holding the experts in the user's model (where the slots are registered)
    timings: list = field(default_factory=list)  # report.LayerTiming per timed step (attach(time_layers=True))
    exchange: object | None = None  # report.RowCounts of the last checked step (expert parallelism)

    @classmethod
    def from_result(cls, result, pool=None, kinds=None) -> SlotLayer:
        """The layer of a rewritten block (``passes.moe_pass.BlockResult``); ``pool`` only if it fits its layout;
        ``kinds``: its slot storage under expert parallelism (``slot_storage.install``)."""
        config = getattr(result.dispatch, "config", None)
        return cls(path=result.spec.path, num_experts=result.spec.num_experts, d_model=result.d_model,
                   experts=result.experts, buffers=result.buffers, config=config,
                   pool=pool if config is not None and pool is not None and pool.layout == config.layout else None,
                   local_placement=result.dispatch.placement if config is None else None, kinds=list(kinds or []))

    @property
    def sharded(self) -> bool:
        """This rank stores only its slots (expert parallelism); the user's expert parameters hold no bytes."""
        return bool(self.kinds)

    @property
    def params(self) -> list[torch.Tensor]:
        """What an optimizer steps for this layer: the slot tensors, or the user's expert parameters."""
        return [k.slots for k in self.kinds] if self.kinds else self.experts.all()

    @property
    def local_experts(self) -> list[int]:
        """The expert in each of this rank's slots (``-1``: empty); every expert on one process."""
        return self.config.local_experts if self.config is not None else list(range(self.num_experts))

    def dp_group(self):
        name = self.config.dp_group_name if self.config is not None else None
        return dist.distributed_c10d._resolve_process_group(name) if name else None

    @property
    def expert_params(self) -> list[list[torch.Tensor]]:
        """Per expert (ModuleList experts); empty when stacked."""
        return self.experts.per_expert

    @property
    def stacked_params(self) -> list[torch.Tensor]:
        """``[E, ...]`` parameters (stacked experts); empty for ModuleList experts."""
        return self.experts.stacked

    @property
    def expert_weight_shapes(self) -> list[tuple[int, ...]]:
        """One expert's weight shapes, as the cost model prices it."""
        if self.kinds:
            return [k.expert_shape for k in self.kinds]
        return [tuple(t.shape) for t in self.experts.of_expert(0)]

    @property
    def param_bytes(self) -> int:
        if self.kinds:
            return self.kinds[0].slots.element_size()
        return self.experts.of_expert(0)[0].element_size()

    @property
    def act_bytes(self) -> int:
        return self.param_bytes  # activations run in the weights' dtype in every form moecc rewrites

    @property
    def placement(self):
        return self.config.placement if self.config is not None else self.local_placement

    def group(self):
        return dist.distributed_c10d._resolve_process_group(self.config.group_name) if self.config else None

    def hosted(self) -> set[int]:
        if self.config is None:
            return set(range(self.num_experts))
        p = self.config.placement
        return {p.expert_S[s] for s in p.layout.slots_of(self.config.rank) if p.expert_S[s] >= 0}

    def replicated(self) -> list[int]:
        if self.config is None:
            return []
        return [e for e, n in enumerate(self.config.placement.replicas()) if n > 1]

    def expert_tensors(self, e: int) -> list[torch.Tensor]:
        """Expert e's parameters (views into stacked ones)."""
        return self.experts.of_expert(e)


@dataclass(slots=True)
class SwitchRecord:
    step: int
    layer: str
    placement_from: list
    placement_to: list
    predicted_gain_s: float  # per step, on the window that triggered it
    predicted_cost_s: float
    moved_experts: list[int]
    switch_s: float  # measured time of the switch itself
    measured_gain_s: float | None = None  # mean step time before minus after (filled at the next check)
    bytes_sent: int = 0  # slot contents this rank sent (weights, gradients, optimizer state)


# ----------------------------------------------------------------------------------------------- gradients


def sync_expert_grads(layers: list[SlotLayer], average: bool = False) -> None:
    """Make expert gradients right for this rank's optimizer step (see the module docstring)."""
    for layer in layers:
        if layer.config is None:
            continue
        if layer.sharded:
            _sync_slot_grads(layer, average)
            continue
        group = layer.group()
        world = dist.get_world_size(group)
        hosted, replicated = layer.hosted(), layer.replicated()
        if layer.expert_params:
            for e, params in enumerate(layer.expert_params):
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    if e in replicated:
                        dist.all_reduce(p.grad, group=group)
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


def _sync_slot_grads(layer: SlotLayer, average: bool) -> None:
    """Slot gradients: replicas of an expert summed over the expert-parallel group, every slot summed over the
    expert-data-parallel group (the same slots on other data), then divided by the world if ``average``."""
    group, dp = layer.group(), layer.dp_group()
    world = dist.get_world_size(group) * (dist.get_world_size(dp) if dp is not None else 1)
    local, replicated = layer.local_experts, layer.replicated()
    for kind in layer.kinds:
        p = kind.slots
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if replicated:  # one all-reduce per weight kind; ranks without a replica add zeros
            buf = p.grad.new_zeros((len(replicated), *kind.expert_shape))
            mine = [(j, local.index(e)) for j, e in enumerate(replicated) if e in local]
            for j, s in mine:
                buf[j] = p.grad[s]
            dist.all_reduce(buf, group=group)
            for j, s in mine:
                p.grad[s] = buf[j]
        if dp is not None:
            dist.all_reduce(p.grad, group=dp)
        if average:
            p.grad.div_(world)


def expert_parameter_names(model: torch.nn.Module, layers: list[SlotLayer]) -> list[str]:
    """Names of ``model``'s parameters that belong to experts of expert-parallel layers (for DDP to ignore): the
    user's (freed) expert parameters and the slot tensors that replaced them."""
    ids = {id(p) for layer in layers if layer.config for p in layer.experts.all() + layer.params}
    return [name for name, p in model.named_parameters() if id(p) in ids]


# ----------------------------------------------------------------------------------------------- switching


def _expert_state(layer: SlotLayer, e: int, optimizers) -> list[tuple[str, torch.Tensor | None, object]]:
    """(key, tensor or None, setter) for expert e's weights, gradients and optimizer state, in a fixed order.

    Keys are the same on every rank; a missing tensor (no gradient, no optimizer state yet) is None and its
    setter creates it from the host's shape and dtype.
    """
    out = []
    params = [(p, None) for p in layer.expert_params[e]] if layer.expert_params else \
        [(p, e) for p in layer.stacked_params]
    for i, (p, index) in enumerate(params):
        def part(t, index=index):
            return t if index is None or t.dim() == 0 else t[index]

        out.append((f"{i}.param", part(p.data), None))
        out.append((f"{i}.grad", part(p.grad) if p.grad is not None else None,
                    lambda shape, dtype, p=p, part=part: part(_set_grad(p))))
        for j, opt in enumerate(optimizers):
            if not any(p is q for g in opt.param_groups for q in g["params"]):
                continue
            state = opt.state[p]
            for key in sorted(k for k, v in state.items() if torch.is_tensor(v)) or ["exp_avg", "exp_avg_sq", "step"]:
                value = state.get(key)
                out.append((f"{i}.opt{j}.{key}", part(value) if torch.is_tensor(value) else None,
                            lambda shape, dtype, state=state, key=key, p=p, part=part:
                            part(_set_state(state, key, p, shape, dtype))))
    return out


def _set_grad(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _set_state(state: dict, key: str, p: torch.nn.Parameter, shape, dtype) -> torch.Tensor:
    """Optimizer state created to receive a host's; a stacked parameter's arrives one expert slice at a time."""
    if not torch.is_tensor(state.get(key)):
        full = p.shape if p.dim() == len(shape) + 1 else shape
        state[key] = torch.zeros(full, dtype=dtype, device=p.device)
    return state[key]


def _broadcast_experts(layer: SlotLayer, experts: list[int], src_rank: int, optimizers) -> None:
    """Every rank gets host ``src_rank``'s weights, gradients and optimizer state of ``experts``.

    One object broadcast says which tensors the host has; then one flat broadcast per dtype moves them all: a
    switch costs a few collectives, not one per tensor.
    """
    group = layer.group()
    src = dist.get_global_rank(group, src_rank)
    entries = [(e, key, t, setter) for e in experts for key, t, setter in _expert_state(layer, e, optimizers)]
    meta = [[(e, key, tuple(t.shape), t.dtype) for e, key, t, _ in entries if t is not None]]
    dist.broadcast_object_list(meta, src=src, group=group)
    present = {(e, key): (shape, dtype) for e, key, shape, dtype in meta[0]}
    targets = []
    for e, key, t, setter in entries:
        if (e, key) not in present:
            continue
        shape, dtype = present[(e, key)]
        if t is None:
            t = setter(shape, dtype)
        targets.append(t)
    for dtype in sorted({t.dtype for t in targets}, key=str):
        group_ts = [t for t in targets if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group_ts]) if dist.get_rank(group) == src_rank else \
            torch.empty(sum(t.numel() for t in group_ts), dtype=dtype, device=group_ts[0].device)
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in group_ts:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def _slot_state(layer: SlotLayer, optimizers) -> list[tuple[str, torch.Tensor]]:
    """Every tensor shaped like a slot tensor (weights, gradients, optimizer state such as Adam's moments or fp32
    masters), keyed the same on every rank. Scalar state (Adam's step) is the same for every slot: it stays."""
    out = []
    for i, kind in enumerate(layer.kinds):
        p = kind.slots
        out.append((f"{i}.param", p.data))
        if p.grad is not None:
            out.append((f"{i}.grad", p.grad))
        for j, opt in enumerate(optimizers):
            state = opt.state.get(p, {})
            out += [(f"{i}.opt{j}.{key}", state[key]) for key in sorted(state)
                    if torch.is_tensor(state[key]) and state[key].shape == p.shape]
    return out


def _check_same_state(layer: SlotLayer, state: list[tuple[str, torch.Tensor]]) -> None:
    """Ranks that disagree on what a slot holds would wait on each other's transfers forever: refuse instead."""
    from moecc.backends.ep import first_disagreeing_rank

    mine = [(key, str(t.dtype)) for key, t in state]
    differs = first_disagreeing_rank(mine, layer.group())
    if differs is not None:
        r, theirs = differs
        raise RuntimeError(f"moecc: cannot switch layer {layer.path!r}: rank {layer.config.rank} holds "
                           f"{[k for k, _ in mine]} per slot, rank {r} holds {[k for k, _ in theirs]}; attach "
                           "the same optimizers on every rank and switch between a step and the next forward")


def slot_transfers(old, new) -> list[tuple[int, int]]:
    """(source slot, destination slot) for every slot whose expert changes: the new expert's contents come from
    a slot that held it, on the same rank when there is one (a local copy), else on the lowest such rank."""
    k = old.layout.slots_per_rank
    moves = []
    for dst, (e_old, e_new) in enumerate(zip(old.expert_S, new.expert_S)):
        if e_new == e_old or e_new < 0:
            continue
        holders = [s for s, e in enumerate(old.expert_S) if e == e_new]
        same_rank = [s for s in holders if s // k == dst // k]
        moves.append((same_rank[0] if same_rank else holders[0], dst))
    return moves


def _move_slots(layer: SlotLayer, old, new, optimizers) -> int:
    """Move the contents of the slots that change (``slot_transfers``) with one batch of point-to-point transfers
    per layer and dtype; returns the bytes this rank sent. Received contents wait in a staging buffer (at most the
    changed slots of this layer) until every send is done, since a source slot may also be a destination."""
    state = _slot_state(layer, optimizers)
    _check_same_state(layer, state)
    group, me, k = layer.group(), layer.config.rank, old.layout.slots_per_rank
    ops, staged, sent = [], [], 0
    for src, dst in slot_transfers(old, new):
        src_rank, dst_rank = src // k, dst // k
        if me not in (src_rank, dst_rank):
            continue
        for dtype in sorted({t.dtype for _, t in state}, key=str):
            tensors = [t for _, t in state if t.dtype == dtype]
            if src_rank == me:
                flat = torch.cat([t[src - src_rank * k].reshape(-1) for t in tensors])
                if dst_rank == me:
                    staged.append((tensors, dst - me * k, flat))
                    continue
                ops.append(dist.P2POp(dist.isend, flat, dist.get_global_rank(group, dst_rank), group))
                sent += flat.numel() * flat.element_size()
            else:
                flat = torch.empty(sum(t[0].numel() for t in tensors), dtype=dtype, device=tensors[0].device)
                ops.append(dist.P2POp(dist.irecv, flat, dist.get_global_rank(group, src_rank), group))
                staged.append((tensors, dst - me * k, flat))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for tensors, slot, flat in staged:
        offset = 0
        for t in tensors:
            t[slot].copy_(flat[offset: offset + t[slot].numel()].view_as(t[slot]))
            offset += t[slot].numel()
    return sent


def _as_placement(placement, layer: SlotLayer):
    """A ``Placement``, from one or from a list per rank of the expert in each slot; bad input refused in words."""
    from moecc.backends.ep import placement_from_lists
    from moecc.costmodel.placement import Placement

    if isinstance(placement, Placement):
        return placement
    layout = layer.placement.layout
    if not isinstance(placement, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in placement):
        raise ValueError("moecc.switch: give a costmodel Placement or a list per rank of the expert in each slot "
                         f"(-1: empty), e.g. {layer.placement.experts_per_rank()}")
    if len(placement) != layout.ranks or any(len(r) != layout.slots_per_rank for r in placement):
        raise ValueError(f"moecc.switch: layer {layer.path!r} has {layout.ranks} ranks x {layout.slots_per_rank} "
                         f"slots; got {[len(r) for r in placement]} slots per rank")
    for r, row in enumerate(placement):
        for e in row:
            if not isinstance(e, int) or not -1 <= e < layer.num_experts:
                raise ValueError(f"moecc.switch: rank {r} names expert {e!r}; experts are 0..{layer.num_experts - 1}"
                                 " (-1: an empty slot)")
    missing = sorted(set(range(layer.num_experts)) - {e for row in placement for e in row})
    if missing:
        raise ValueError(f"moecc.switch: experts {missing} have no slot; every expert needs at least one")
    try:
        return placement_from_lists([list(r) for r in placement], layer.num_experts)
    except ValueError as exc:
        raise ValueError(f"moecc.switch: {exc}") from None


def switch(layer: SlotLayer, placement, optimizers=None, *, step: int = -1, predicted_gain_s: float = 0.0,
           predicted_cost_s: float = 0.0) -> SwitchRecord:
    """Move ``layer`` to ``placement`` (same slot layout; a ``Placement`` or a list per rank of the expert in each
    slot) now: weights, gradients, optimizer state, then the buffers.

    Call it on every rank with the same placement, between an optimizer step and the next forward.
    ``optimizers`` default to the ones attached to the layer. On one process there is nothing to switch: every
    expert has its own local slot, and the call is refused.
    """
    from moecc.backends.ep import placement_tensors

    if layer.config is None:
        raise ValueError(f"moecc: layer {layer.path!r} runs on one process, where every expert has its own local "
                         "slot: there is no placement to switch. Switching needs expert parallelism (a process "
                         "group with several ranks)")

    optimizers = list(optimizers if optimizers is not None else layer.optimizers)
    start = time.perf_counter()
    old = layer.placement
    placement = _as_placement(placement, layer)
    if placement.layout != old.layout or placement.num_experts != old.num_experts:
        raise ValueError(f"moecc: a switch keeps the slot layout ({old.layout.ranks} ranks x "
                         f"{old.layout.slots_per_rank} slots, {old.num_experts} experts); got "
                         f"{placement.layout.ranks} x {placement.layout.slots_per_rank}, {placement.num_experts}")
    k = old.layout.slots_per_rank
    hosts_old = [{s // k for s, x in enumerate(old.expert_S) if x == e} for e in range(layer.num_experts)]
    hosts_new = [{s // k for s, x in enumerate(placement.expert_S) if x == e} for e in range(layer.num_experts)]
    moved = [e for e in range(layer.num_experts) if hosts_new[e] - hosts_old[e]]
    sent = 0
    if layer.sharded:
        try:
            sent = _move_slots(layer, old, placement, optimizers)
        except RuntimeError as exc:
            if str(exc).startswith("moecc:"):
                raise
            raise RuntimeError(f"moecc: the placement switch of layer {layer.path!r} failed: a peer rank exited or "
                               "did not answer within the collective timeout (MOECC_COLLECTIVE_TIMEOUT_S). This "
                               "rank's slots are unchanged (received contents are applied only after every "
                               f"transfer completes); restart from the last checkpoint. ({exc})") from exc
    else:
        for src in sorted({min(hosts_old[e]) for e in moved}):
            _broadcast_experts(layer, [e for e in moved if min(hosts_old[e]) == src], src, optimizers)
    slots, cum = placement_tensors(placement, layer.buffers["replica_slots"].device,
                                   width=layer.buffers["replica_slots"].shape[1])
    layer.buffers["replica_slots"].copy_(slots)
    layer.buffers["replica_cum"].copy_(cum)
    layer.config = replace(layer.config, placement=placement)
    # Decisions read this cost back: every rank must see the same number, or they decide apart and hang.
    cost = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(cost, op=dist.ReduceOp.MAX, group=layer.group())
    elapsed = float(cost)
    record = SwitchRecord(step=step, layer=layer.path,
                          placement_from=old.experts_per_rank() if old else [],
                          placement_to=placement.experts_per_rank(), predicted_gain_s=predicted_gain_s,
                          predicted_cost_s=predicted_cost_s, moved_experts=moved, switch_s=elapsed,
                          bytes_sent=sent)
    layer.switch_log.append(record)
    return record


def set_capacity_factor(layer: SlotLayer, factor: float) -> None:
    """Change a layer's capacity factor at run time (``inf``: dropless); a layer compiled with
    ``options={"moecc.capacity_factor": ...}`` only. Data, not code: nothing recompiles."""
    if "capacity_factor" not in layer.buffers:
        raise ValueError(f"moecc: layer {layer.path!r} was compiled without a capacity; pass "
                         "options={'moecc.capacity_factor': f} to torch.compile")
    layer.buffers["capacity_factor"].fill_(float(factor))


def consolidate(layers: list[SlotLayer], optimizers=None) -> None:
    """Refresh every rank's copy of every expert (weights, optimizer state) from its first host.

    Call on every rank before ``state_dict()`` / ``optimizer.state_dict()``: the result is the whole model in
    the user's logical expert order, loadable under any placement or world size. ``optimizers`` default to the
    ones attached to each layer.
    """
    for layer in layers:
        if layer.config is None:
            continue
        if layer.sharded:
            raise ValueError(f"moecc: layer {layer.path!r} stores only this rank's slots, so model.state_dict() "
                             "holds empty expert tensors and there is nothing to consolidate; checkpoint with "
                             "moecc.checkpoint.save(model, optimizer, path) (logical order, any world size)")
        k = layer.placement.layout.slots_per_rank
        host = {e: min(s // k for s, x in enumerate(layer.placement.expert_S) if x == e)
                for e in range(layer.num_experts)}
        for src in sorted(set(host.values())):
            _broadcast_experts(layer, [e for e in host if host[e] == src], src,
                               list(optimizers if optimizers is not None else layer.optimizers))


# ----------------------------------------------------------------------------------------------- monitor


@dataclass(slots=True)
class Monitor:
    check_every: int
    profile: object
    average: bool
    switching: bool = True
    steps: int = 0
    last_check: float = field(default_factory=time.perf_counter)
    step_times: list = field(default_factory=list)
    time_layers: bool = False  # profile the step each check reads, for predicted vs measured layer times
    marks: dict = field(default_factory=dict)  # id(layer) -> its load counter before the step the check reads
    profiler: object | None = None  # the torch.profiler profiling that step, when time_layers


def read_loads(layer: SlotLayer) -> list[float]:
    """Tokens per expert since the last read, summed over ranks; resets the counter (one host sync)."""
    counts = layer.buffers["load_counts"].detach().clone().double()
    layer.buffers["load_counts"].zero_()
    if layer.config is not None:
        dist.all_reduce(counts, group=layer.group())
    return counts.tolist()


def candidates(layer: SlotLayer, load_E: list[float]):
    """The placements a check chooses from: the layer's pool, else the current one and a greedy re-plan."""
    from moecc.costmodel.greedy import greedy_placement
    from moecc.costmodel.placement import Pool
    from moecc.costmodel.planner import align_pool

    if layer.pool is not None:
        return list(layer.pool.placements)
    # Ranks are interchangeable: relabel the re-plan to keep as many experts where they are as possible.
    replan = greedy_placement(layer.placement.layout, load_E)
    return list(align_pool(Pool(layout=layer.placement.layout, placements=(layer.placement, replan))).placements)


def layer_cost_model(layer: SlotLayer, profile):
    """The cost model (``costmodel.formulas.CostModel``) of ``layer``'s experts on its layout's ranks."""
    from moecc.costmodel.formulas import ExpertDims, compile_cost_model

    shapes = getattr(layer, "expert_weight_shapes", None)  # one expert's weights: price the expert that runs
    if shapes is not None:
        dims = ExpertDims.from_weights(layer.d_model, shapes, param_bytes=getattr(layer, "param_bytes", 4),
                                       act_bytes=getattr(layer, "act_bytes", 4))
    else:  # a layer that does not record its shapes: SwiGLU of the width its parameter count gives, fp32
        dims = ExpertDims(d_model=layer.d_model, d_ffn=layer.d_ffn, act_bytes=4, param_bytes=4)
    return compile_cost_model(profile, dims, layer.placement.layout.ranks)


def decide(layer: SlotLayer, load_E: list[float], interval_steps: int, profile):
    """(best placement, predicted per-step gain, predicted switch cost), or None to stay."""
    from moecc.costmodel.switching import LastSwitch, decide_switch

    if layer.config is None or sum(load_E) == 0:
        return None
    model = layer_cost_model(layer, profile)
    per_step = [x / interval_steps for x in load_E]
    last = None
    if layer.switch_log:
        r = layer.switch_log[-1]
        last = LastSwitch(predicted_gain_s=r.predicted_gain_s, switch_s=r.switch_s,
                          moved_experts=len(r.moved_experts), measured_gain_s=r.measured_gain_s)
    choice = decide_switch(model, layer.placement, candidates(layer, per_step), per_step, interval_steps, last)
    return None if choice is None else (choice.placement, choice.gain_s, choice.cost_s)


def _slowest_rank(seconds: float, layers: list[SlotLayer]) -> float:
    """The step time every rank agrees on (the slowest rank's): decisions read it, so it must not differ."""
    group = next((layer.group() for layer in layers if layer.config is not None), None)
    if group is None:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value)


def after_step(monitor: Monitor, layers: list[SlotLayer], optimizers) -> None:
    """The monitor's work after an optimizer step: every ``check_every`` steps, read the loads and maybe switch.

    The step a check reads is also measured (``measure_step``): under expert parallelism the rows each rank sent
    and received, and with ``time_layers`` each layer's predicted and measured time.
    """
    monitor.steps += 1
    if monitor.marks:
        measure_step(monitor, layers)
    _check_window(monitor, layers, optimizers)
    if (monitor.steps + 1) % monitor.check_every == 0 and (
            monitor.time_layers or any(layer.config is not None for layer in layers)):
        mark_step(monitor, layers)


def _check_window(monitor: Monitor, layers: list[SlotLayer], optimizers) -> None:
    if monitor.steps == 1:  # the first step compiles: time windows from the end of it
        monitor.last_check = time.perf_counter()
    if monitor.steps % monitor.check_every:
        return
    now = time.perf_counter()
    steps = monitor.check_every - (monitor.steps == monitor.check_every)
    mean_step = _slowest_rank((now - monitor.last_check) / steps, layers)
    monitor.last_check = now
    for layer in layers:
        if layer.switch_log and layer.switch_log[-1].measured_gain_s is None and monitor.step_times:
            layer.switch_log[-1].measured_gain_s = monitor.step_times[-1] - mean_step
        load = read_loads(layer)
        layer.trace.append([x / monitor.check_every for x in load])
        choice = decide(layer, load, monitor.check_every, monitor.profile) if monitor.switching else None
        if choice is not None:
            best, gain, cost = choice
            switch(layer, best, optimizers, step=monitor.steps, predicted_gain_s=gain, predicted_cost_s=cost)
    monitor.step_times.append(mean_step)


def save_trace(layers: list[SlotLayer], path: str) -> None:
    """Write the loads seen at each check as a costmodel trace (one row per check: mean rows per expert per step)."""
    import json

    recorded = [layer for layer in layers if layer.trace]
    if not recorded:
        raise ValueError("moecc: no load window recorded yet (attach an optimizer and train past check_every)")
    data = {"num_experts": recorded[0].num_experts,
            "layers": {layer.path or f"layer{i}": layer.trace for i, layer in enumerate(recorded)
                       if layer.num_experts == recorded[0].num_experts}}
    with open(path, "w") as f:
        json.dump(data, f)


# ----------------------------------------------------------------------------------------------- measurement
#
# What the report shows of the plan at run time. The step before each check is marked (``mark_step``, after the
# previous optimizer step): a copy of every layer's load counter (E numbers on the device, no host sync) and, when
# ``time_layers``, a torch.profiler started. At the check (``measure_step``, before the counters are read and reset)
# the counter minus its copy is what that one step routed on this rank, per expert:
#
# - rows (expert parallelism): one all_gather of those counts over the layer's group gives every rank's; rank r
#   sent rank q the rows of r's tokens routed to the experts in q's slots. Exact for experts with one host (every
#   row of such an expert goes to it); a replicated expert's rows are split by the graph by token position
#   (``ep.choose_slots``), which the placement's shares give in expectation only (rounded). Rows a capacity factor
#   drops are counted as sent (the counter counts them before the capacity mask).
# - times (``time_layers``): predicted, the cost model's ``step_s`` of the layer's placement on the step's loads
#   summed over ranks (forward and backward, as ``decide`` prices a step); measured, the profiler's times of the
#   layer's moecc ops in that step (expert FFNs or grouped GEMMs, their backward, sorts, permutations and the
#   all-to-alls: what the formulas price, plus the small sorts they do not), the slowest rank's under expert
#   parallelism, as the prediction is. These are host times, exact on CPU; on a GPU they are launch times, not
#   kernel times. A timer around the block module is not an option under torch.compile: hooks registered after
#   compiling never run, and a Python dispatch mode makes Dynamo run the model eagerly.
#
# The profiled step runs slower (the profiler records every op), and the monitor's window time includes it:
# timings are for looking, switching decisions see the same overhead in every window.

_ACTIVE_PROFILERS: list = []


def mark_step(monitor: Monitor, layers: list[SlotLayer]) -> None:
    """Before the step the next check reads: copy the load counters; with ``time_layers`` start the profiler."""
    monitor.marks = {id(layer): layer.buffers["load_counts"].detach().clone() for layer in layers}
    if monitor.time_layers and monitor.profiler is None:
        from torch.profiler import ProfilerActivity, profile

        # record_shapes and profile_memory give each op's input tensors with a stable id (``moecc_op_seconds``)
        monitor.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True)
        monitor.profiler.start()
        _ACTIVE_PROFILERS.append(monitor.profiler)
        _stop_at_exit()


def measure_step(monitor: Monitor, layers: list[SlotLayer]) -> None:
    """At the check after a marked step: record that step's rows (``SlotLayer.exchange``) and, when profiled, each
    layer's ``LayerTiming`` (``SlotLayer.timings``)."""
    from moecc.report import LayerTiming

    marks, monitor.marks = monitor.marks, {}
    seconds = None
    if monitor.profiler is not None:
        prof, monitor.profiler = monitor.profiler, None
        prof.stop()
        _ACTIVE_PROFILERS.remove(prof)
        seconds = moecc_op_seconds(prof, layers)
    for i, layer in enumerate(layers):
        mark = marks.get(id(layer))
        if mark is None:
            continue
        counts_E = (layer.buffers["load_counts"].detach() - mark).double()
        if layer.config is not None:
            gathered_RE = _gather_counts(layer, counts_E)
            layer.exchange = record_rows(layer, gathered_RE, monitor.steps)
            load_E = gathered_RE.sum(0).tolist()
        else:
            load_E = counts_E.tolist()
        if seconds is None:
            continue
        measured = seconds[i]
        if layer.config is not None:
            measured = _slowest_rank(measured, [layer])
        predicted = layer_cost_model(layer, monitor.profile).step_s(layer.placement, load_E)
        layer.timings.append(LayerTiming(block=layer.path, predicted_s=predicted, measured_s=measured,
                                         source="profiler", step=monitor.steps))


def _gather_counts(layer: SlotLayer, counts_E: torch.Tensor) -> torch.Tensor:
    """[R, E]: every rank's routed rows per expert (one all_gather over the layer's group)."""
    group = layer.group()
    gathered = [torch.empty_like(counts_E) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, counts_E.contiguous(), group=group)
    return torch.stack(gathered).cpu()


def record_rows(layer: SlotLayer, counts_RE: torch.Tensor, step: int):
    """``report.RowCounts`` of one step from every rank's routed rows per expert ``counts_RE`` ([R, E]) and the
    layer's placement: rank r sends rank q ``sum_e counts_RE[r, e] * share of e's rows on q``."""
    from moecc.report import RowCounts

    p = layer.placement
    k = p.layout.slots_per_rank
    share_RE = torch.zeros(p.layout.ranks, layer.num_experts, dtype=torch.float64)
    for s, (e, share) in enumerate(zip(p.expert_S, p.share_S)):
        if e >= 0:
            share_RE[s // k, e] += share
    rows_RR = (counts_RE.double() @ share_RE.T).round().long()  # [from rank, to rank]
    me = layer.config.rank
    return RowCounts(block=layer.path, rank=me, step=step, sent_R=rows_RR[me].tolist(),
                     received_R=rows_RR[:, me].tolist(), experts_R=p.experts_per_rank())


def moecc_op_seconds(prof, layers: list[SlotLayer]) -> list[float]:
    """Seconds of each layer's moecc ops in the profile ``prof`` (see ``attribute_ops`` for which op is whose)."""
    from torch._C._profiler import _EventType

    owner = {}  # storage address of an expert weight -> its layer
    for i, layer in enumerate(layers):
        for t in layer.params + layer.experts.all():
            if t.numel() and t.untyped_storage().data_ptr():
                owner[t.untyped_storage().data_ptr()] = i
    ops, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.TorchOp and event.name.startswith("moecc::"):  # its children are its own time
            ops.append(event)
        else:
            stack.extend(event.children)
    found = []
    for event in sorted(ops, key=lambda e: e.start_time_ns):
        tensors = [t for x in event.extra_fields.inputs for t in (x if isinstance(x, list) else [x])
                   if hasattr(t, "storage_data_ptr")]
        layer = next((owner[t.storage_data_ptr] for t in tensors if t.storage_data_ptr in owner), None)
        ids = {t.id for t in tensors if t.id is not None and not t.dtype.is_floating_point}
        found.append((event.duration_time_ns * 1e-9, layer, ids))
    return attribute_ops(found, len(layers))


def attribute_ops(ops: list[tuple[float, int | None, set[int]]], layers: int) -> list[float]:
    """Seconds per layer of one step's moecc ops, given in call order as (seconds, the layer whose expert weights
    the op reads or None, ids of its integer tensor inputs).

    Ops that use the same integer tensor (slot ids, orders, offsets, row counts: inputs only, the profiler does not
    list outputs) are one layer's, forward and backward: the all-to-all that returns a layer's rows reuses the
    counts of the one that sent them, a backward reuses what its forward saved. Such a group is the layer's whose
    expert weights one of its ops reads; a group with no such op (the route and dispatch under expert
    parallelism: their tensors are outputs of one op and inputs of the next) is the layer's whose weights are read
    first after the group's first op, since a layer routes and dispatches before its experts run. Where a group
    names two layers (a tensor id the profiler reused), each of its ops goes by that order rule alone.
    """
    parent = list(range(len(ops)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    last_user: dict[int, int] = {}
    for i, (_, _, ids) in enumerate(ops):
        for t in ids:
            if t in last_user:
                a, b = root(i), root(last_user[t])
                parent[max(a, b)] = min(a, b)  # the root of a group is its first op
            last_user[t] = i
    labels: dict[int, set[int]] = {}
    for i, (_, layer, _) in enumerate(ops):
        if layer is not None:
            labels.setdefault(root(i), set()).add(layer)

    def next_read(i: int) -> int | None:
        later = [ops[j][1] for j in range(i, len(ops)) if ops[j][1] is not None]
        earlier = [ops[j][1] for j in range(i) if ops[j][1] is not None]
        return (later or earlier[-1:] or [None])[0]

    seconds = [0.0] * layers
    for i, (sec, layer, _) in enumerate(ops):
        if layer is None:
            named = labels.get(root(i), set())
            layer = next(iter(named)) if len(named) == 1 else next_read(root(i) if not named else i)
        if layer is not None:
            seconds[layer] += sec
    return seconds


_exit_hook = []


def _stop_at_exit() -> None:
    """Once per process: stop profilers still running at exit (training ended between a mark and its check)."""
    if not _exit_hook:
        import atexit

        def stop():
            for prof in list(_ACTIVE_PROFILERS):
                prof.stop()
            _ACTIVE_PROFILERS.clear()

        atexit.register(stop)
        _exit_hook.append(stop)

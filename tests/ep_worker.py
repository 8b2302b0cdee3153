"""Scenarios run on every rank of a gloo group by tests/test_ep.py (one process per rank, loopback TCP).

Each scenario compares the expert-parallel model on this rank's slice of a global batch with one single-process
eager model on the whole batch, and returns a dict of facts for the test to assert on. A scenario name may end in
``@2x2``: a (dp=2, ep=2) DeviceMesh instead of the whole world as one expert-parallel group.
"""
from __future__ import annotations

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_zoo  # noqa: E402

import moecc  # noqa: E402
import moecc.checkpoint  # noqa: E402

TOKENS_PER_RANK = 3
DIM = 16
_last_model: list = [None]  # the model train_equal trained last (replicated_hot_expert reads its slots)


class Case:
    """A model kind under test: how to build it, shape a batch, and read its output."""

    def __init__(self, kind: str, seed: int = 0):
        self.kind = kind
        torch.manual_seed(seed)
        if kind == "loop":
            self.model = moe_zoo.LoopMoE(DIM, 32, 4, 2)
        elif kind == "stacked":
            self.model = moe_zoo.StackedLoopMoE(DIM, 32, 4, 2)
        elif kind == "hf":
            import hf_zoo

            self.model, _ = hf_zoo.build("mixtral", "grouped_mm", seed=seed)
            self.model.train(True)
        else:
            raise KeyError(kind)
        self.ref = copy.deepcopy(self.model)

    def batch(self, world: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "hf":
            x = torch.randint(1, 64, (world, TOKENS_PER_RANK), generator=gen)
            return x, torch.randn(world, TOKENS_PER_RANK, 64, generator=gen)
        x = torch.randn(world, TOKENS_PER_RANK, DIM, generator=gen)
        return x, torch.randn(world, TOKENS_PER_RANK, DIM, generator=gen)

    def inputs(self, x_TD):
        """The module's input for token rows (or ids) ``x``."""
        return x_TD if self.kind == "stacked" else x_TD.unsqueeze(0)

    def run(self, module, x_TD):
        """Output rows [T, width] for token rows (or ids) ``x``."""
        out = module(self.inputs(x_TD))
        return out[0][0] if self.kind == "loop" else out[0] if self.kind == "hf" else out


def _mesh(spec: str | None):
    if spec is None:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    dp, ep = (int(v) for v in spec.split("x"))
    return init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))


def _dense_allreduce(model) -> None:
    """What DDP does for the dense parameters (summed here, as the reference sums the whole batch's loss)."""
    experts = set(moecc.expert_parameter_names(model))
    for name, p in model.named_parameters():
        if name not in experts and p.grad is not None:
            dist.all_reduce(p.grad)


def _expert_pairs(model, ref, optimizer=None, ref_optimizer=None):
    """(slot row, reference expert tensor) for every slot of this rank; with optimizers, also Adam's moments."""
    named = dict(ref.named_parameters())
    pairs = []
    for layer in moecc.session(model).layers:
        for kind in layer.kinds:
            for s, e in enumerate(layer.local_experts):
                if e < 0:
                    continue
                q = named[kind.names[0]] if kind.stacked else named[kind.names[e]]
                pick = (lambda t, e=e: t[e]) if kind.stacked else (lambda t: t)
                pairs.append(("param", kind.slots[s], pick(q)))
                if kind.slots.grad is not None and q.grad is not None:
                    pairs.append(("grad", kind.slots.grad[s], pick(q.grad)))
                if optimizer is not None and kind.slots in optimizer.state:
                    for key in ("exp_avg", "exp_avg_sq"):
                        pairs.append((key, optimizer.state[kind.slots][key][s], pick(ref_optimizer.state[q][key])))
    return pairs


def _worst(pairs) -> dict:
    out = {}
    for what, a, b in pairs:
        out[what] = max(out.get(what, 0.0), float((a.detach() - b.detach()).abs().max()))
    return out


def _expert_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def _memory_facts(model, ref, optimizer, ref_optimizer) -> dict:
    """This rank's expert bytes (weights, gradients, optimizer state; from storages) against one process's."""
    layers = moecc.session(model).layers
    mine, full = [], []
    ref_named = dict(ref.named_parameters())
    for layer in layers:
        for kind in layer.kinds:
            mine += [kind.slots, *kind.originals] + ([kind.slots.grad] if kind.slots.grad is not None else [])
            mine += [v for v in optimizer.state.get(kind.slots, {}).values() if torch.is_tensor(v) and v.dim()]
            for name in kind.names:
                q = ref_named[name]
                full += [q] + ([q.grad] if q.grad is not None else [])
                full += [v for v in ref_optimizer.state.get(q, {}).values() if torch.is_tensor(v) and v.dim()]
    layer = layers[0]
    return {"expert_bytes": _expert_bytes(mine), "ref_expert_bytes": _expert_bytes(full),
            "slots": len(layer.local_experts), "experts": layer.num_experts,
            "report_memory": moecc.session(model).memory()}


def _backward_both(case, model, ref, rank, x_all, cot_all) -> float:
    """Forward and backward of this rank's slice and of the reference on the whole batch (the dense gradients
    summed as DDP would); the largest output difference."""
    out = case.run(model, x_all[rank])
    (out * cot_all[rank]).sum().backward()
    _dense_allreduce(model)
    ref_out = torch.stack([case.run(ref, x_all[r]) for r in range(len(x_all))])
    (ref_out * cot_all).sum().backward()
    return float((out - ref_out[rank]).abs().max())


def layer_group(model):
    return moecc.session(model).layers[0].group()


def train_equal(rank, world, kind="loop", mesh=None, steps=5, placement=None, options=None):
    """distribute, then ``steps`` AdamW steps on this rank's slice; the reference trains on the whole batch."""
    case = Case(kind)
    model, ref = case.model, case.ref
    _last_model[0] = model
    options = {**({"moecc.placement": placement} if placement is not None else {}), **(options or {})}
    if options:
        model.compile(backend="moecc", options=options)
    x_all, cot_all = case.batch(world, seed=1)
    moecc.distribute(model, case.inputs(x_all[rank]), mesh=_mesh(mesh))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)  # gradient upkeep of the slots before each step
    facts = {"out": 0.0}
    for step in range(steps):
        x_all, cot_all = case.batch(world, seed=10 + step)
        facts["out"] = max(facts["out"], _backward_both(case, model, ref, rank, x_all, cot_all))
        opt.step()
        opt_ref.step()
        if step < steps - 1:
            opt.zero_grad()
            opt_ref.zero_grad()
    facts.update(_worst(_expert_pairs(model, ref, opt, opt_ref)))
    dense = [(n, p) for n, p in model.named_parameters() if n not in set(moecc.expert_parameter_names(model))]
    ref_named = dict(ref.named_parameters())
    facts["dense"] = max(float((p - ref_named[n]).abs().max()) for n, p in dense)
    facts.update(_memory_facts(model, ref, opt, opt_ref))
    record = moecc.report(model).blocks[-1]
    facts.update(outcome=record.outcome, layout=record.layout, send_rows=record.send_rows, kernel=record.kernel,
                 rewritten=sum(b.rewritten for b in moecc.report(model).blocks),
                 report_memory_table=f"expert memory on rank {dist.get_rank(layer_group(model))}" in str(
                     moecc.report(model)))
    return facts


def overlapped(rank, world, kind="loop"):
    """train_equal with the all-to-alls overlapped with the experts in 3 chunks (``backends/ep_overlap.py``)."""
    return train_equal(rank, world, kind, options={"moecc.overlap_chunks": 3})


def two_level(rank, world, kind="loop"):
    """train_equal with the 2-D all-to-all, the ranks as nodes of 2."""
    return train_equal(rank, world, kind, options={"moecc.all_to_all": "2d", "moecc.node_size": 2,
                                                   "moecc.overlap_chunks": 1})


def exchange_auto(rank, world, kind="loop"):
    """train_equal with the chunks and flat or 2-D chosen by the cost model (nodes of 2 ranks)."""
    return train_equal(rank, world, kind, options={"moecc.overlap_chunks": "auto", "moecc.all_to_all": "auto",
                                                   "moecc.node_size": 2})


def exchange_2d_equals_flat(rank, world):
    """The 2-D exchange delivers exactly the flat all-to-all's rows, both ways, for uneven counts (zeros too)."""
    from moecc.backends import dispatch, ep

    group = dispatch._dedicated(dist.group.WORLD)
    hierarchy, why = dispatch.hierarchy_of(group, 2)
    gen = torch.Generator().manual_seed(rank)
    send_R = torch.randint(0, 4, (world,), generator=gen)
    send_R[(rank + 1) % world] = 0
    x = torch.randn(int(send_R.sum()) + 2, 5, generator=gen)  # two rows past the sent ones stay behind
    names = (group.group_name, hierarchy.intra_name, hierarchy.inter_name, hierarchy.node_size)
    flat, _, recv_R = ep.exchange_rows(x, x[:, 0].clone(), send_R, group.group_name)
    two, _, counts = ep.exchange_rows_2d(x, x[:, 0].clone(), send_R, *names)
    back_flat = ep.return_rows(flat * 2, send_R, recv_R, group.group_name, x.shape[0])
    back_two = ep.return_rows_2d(two * 2, counts, *names, x.shape[0])
    return {"why": why, "same": bool(torch.equal(flat, two)), "same_back": bool(torch.equal(back_flat, back_two)),
            "received": int(recv_R.sum()), "round_trip": bool(torch.equal(back_two[:int(send_R.sum())],
                                                                           2 * x[:int(send_R.sum())]))}


def replicated_hot_expert(rank, world):
    """Expert 0 on every rank; five AdamW steps equal to one process, and its replicas stay identical."""
    others = list(range(1, 4))
    per_rank = [[0] + others[r::world] for r in range(world)]
    width = max(len(r) for r in per_rank)
    per_rank = [r + [-1] * (width - len(r)) for r in per_rank]
    facts = train_equal(rank, world, placement=per_rank)
    layer = moecc.session(_last_model[0]).layers[0]
    hot = layer.kinds[0].slots[layer.local_experts.index(0)].detach().contiguous()
    gathered = [torch.empty_like(hot) for _ in range(world)]
    dist.all_gather(gathered, hot)
    facts["replica_spread"] = float(max((g - gathered[0]).abs().max() for g in gathered))
    return facts


def receives_zero_tokens(rank, world):
    """Every token picks experts hosted on rank 0: the other ranks receive no rows at all."""
    case = Case("loop")
    model, ref = case.model, case.ref
    moecc.distribute(model, case.inputs(torch.randn(TOKENS_PER_RANK, DIM)))
    hosted0 = moecc.session(model).layers[0].config.placement.experts_per_rank()[0][:2]
    with torch.no_grad():
        for m in (model, ref):
            m.router.gate.weight.zero_()
            for e in hosted0:
                m.router.gate.weight[e] = 1.0
    x_all, _ = case.batch(world, seed=3)
    x_all = x_all.abs() + 0.1
    out = case.run(model, x_all[rank])
    ref_out = case.run(ref, x_all[rank])
    _, _, chosen = ref.router(x_all.reshape(-1, DIM))
    return {"out": float((out - ref_out).abs().max()),
            "only_rank0_experts": sorted(set(chosen.flatten().tolist())) == sorted(hosted0)}


def mismatched_layout(rank, world):
    """Each rank asks for a different placement: every rank must refuse, none may hang."""
    case = Case("loop")
    per_rank = [[e for e in range(4) if e % world == r] for r in range(world)]
    if rank == 1:
        per_rank = per_rank[::-1]
    try:
        torch.compile(case.model, backend="moecc", options={"moecc.placement": per_rank})(
            torch.randn(1, 3, DIM))
    except Exception as exc:  # torch wraps backend errors
        return {"raised": True, "message": str(exc)[:2000]}
    return {"raised": False, "message": ""}


def mismatched_mesh(rank, world):
    """Rank 1 shards over the whole world, the others over a mesh: every rank refuses before any exchange."""
    mesh = _mesh(f"1x{world}")
    case = Case("loop")
    try:
        moecc.distribute(case.model, torch.randn(1, 3, DIM), mesh=None if rank == 1 else mesh)
    except ValueError as exc:
        return {"raised": True, "message": str(exc)}
    return {"raised": False, "message": ""}


def wrong_order(rank, world):
    """An optimizer built before distribute holds the user's (now empty) expert tensors: its step is refused."""
    case = Case("loop")
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    moecc.distribute(case.model, torch.randn(1, 3, DIM))
    case.run(case.model, torch.randn(3, DIM)).sum().backward()
    try:
        opt.step()
    except RuntimeError as exc:
        return {"raised": True, "message": str(exc)}
    return {"raised": False, "message": ""}


def _rotated(world: int, shift: int, num_experts: int = 4) -> list[list[int]]:
    per_rank = [[] for _ in range(world)]
    for e in range(num_experts):
        per_rank[(e + shift) % world].append(e)
    return per_rank


def switch_round_trip(rank, world):
    """A switch and its inverse leave every slot tensor (weights, gradients, Adam state) bit-identical; a switch
    sends only the slots that change; memory stays the same; outputs follow the experts."""
    from moecc.backends.ep import placement_from_lists
    from moecc.runtime import _slot_state, slot_transfers

    case = Case("loop")
    model = case.model
    x_all, cot_all = case.batch(world, seed=5)
    moecc.distribute(model, case.inputs(x_all[rank]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)
    (case.run(model, x_all[rank]) * cot_all[rank]).sum().backward()
    opt.step()  # gradients stay: they move too
    layer = moecc.session(model).layers[0]
    before = [t.clone() for _, t in _slot_state(layer, [opt])]
    bytes_before = _expert_bytes([t for _, t in _slot_state(layer, [opt])])
    with torch.no_grad():
        out_before = case.run(model, x_all[rank])
    start = layer.placement
    target = placement_from_lists(_rotated(world, 1), 4)
    there = moecc.switch(layer, target, [opt])
    with torch.no_grad():
        out_there = case.run(model, x_all[rank])
    bytes_there = _expert_bytes([t for _, t in _slot_state(layer, [opt])])
    back = moecc.switch(layer, start, [opt])
    after = [t for _, t in _slot_state(layer, [opt])]
    k = start.layout.slots_per_rank
    per_slot = sum(t[0].numel() * t.element_size() for t in after)
    expected = per_slot * sum(1 for src, dst in slot_transfers(start, target) if src // k == rank != dst // k)
    return {"bit_exact": all(torch.equal(a, b) for a, b in zip(before, after)),
            "out_after_switch": float((out_there - out_before).abs().max()),
            "bytes_sent": there.bytes_sent, "bytes_expected": expected, "bytes_back": back.bytes_sent,
            "memory_same": bytes_before == bytes_there, "moved": there.moved_experts}


def eval_after_distribute(rank, world):
    """A graph compiled after the slots took over (eval under no_grad recompiles) is checked on stand-ins for
    the freed weights and runs on the slots: the same outputs as one process, and after a switch too."""
    from torch._dynamo.utils import counters

    from moecc.backends.ep import placement_from_lists

    case = Case("loop")
    model, ref = case.model, case.ref
    x_all, _ = case.batch(world, seed=6)
    moecc.distribute(model, case.inputs(x_all[rank]))
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        out = case.run(model, x_all[rank])
        layer = moecc.session(model).layers[0]
        moecc.switch(layer, placement_from_lists(_rotated(world, 1), 4))
        out_switched = case.run(model, x_all[rank])
        ref_out = case.run(ref, x_all[rank])
    return {"out": float((out - ref_out).abs().max()), "out_switched": float((out_switched - ref_out).abs().max()),
            "recompiled": counters["stats"]["unique_graphs"] > graphs,
            "outcomes": [b.outcome for b in moecc.report(model).blocks],
            "layers": len(moecc.session(model).layers)}


def rank_dies_mid_step(rank, world, outdir):
    """Rank 1 exits in the middle of a training step (after its forward, before its backward). Every other rank's
    next exchange fails with an error, within the collective timeout, instead of hanging; the checkpoint saved
    one step earlier is complete (tests/test_ep.py loads it)."""
    import time

    case = Case("loop")
    model = case.model
    x_all, cot_all = case.batch(world, seed=8)
    moecc.distribute(model, case.inputs(x_all[rank]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)
    (case.run(model, x_all[rank]) * cot_all[rank]).sum().backward()
    opt.step()
    opt.zero_grad()
    moecc.checkpoint.save(model, opt, os.path.join(outdir, "fault_ckpt"))
    probe, _ = case.batch(world, seed=9)
    with torch.no_grad():
        probe_out = case.run(model, probe[rank])
    if rank == 0:
        torch.save({"x": probe[0], "out": probe_out}, os.path.join(outdir, "fault_probe.pt"))
    dist.barrier()
    out = case.run(model, x_all[rank])
    if rank == 1:
        os._exit(3)  # dies holding the rows the others will ask for
    start = time.perf_counter()
    try:
        (out * cot_all[rank]).sum().backward()
        raised = ""
    except Exception as exc:
        raised = f"{type(exc).__name__}: {exc}"
    return {"raised": raised[:500], "seconds": time.perf_counter() - start}


def rank_dies_mid_switch(rank, world):
    """Rank 1 exits as a placement switch starts: rank 0's switch fails with moecc's error, its slots unchanged."""
    import time

    from moecc.backends.ep import placement_from_lists

    case = Case("loop")
    x_all, _ = case.batch(world, seed=8)
    moecc.distribute(case.model, case.inputs(x_all[rank]))
    layer = moecc.session(case.model).layers[0]
    before = [k.slots.detach().clone() for k in layer.kinds]
    dist.barrier()
    if rank == 1:
        os._exit(3)
    start = time.perf_counter()
    try:
        moecc.switch(layer, placement_from_lists(_rotated(world, 1), 4))
        raised = ""
    except Exception as exc:
        raised = f"{type(exc).__name__}: {exc}"
    return {"raised": raised[:600], "seconds": time.perf_counter() - start,
            "unchanged": all(torch.equal(a, k.slots) for a, k in zip(before, layer.kinds))}


def cycle_placement(c: int, world: int, num_experts: int = 4, slots_per_rank: int = 3) -> list[list[int]]:
    """Placement number c of a cycle: round-robin shifted by c; odd c also replicate expert c % E everywhere."""
    per_rank = [[] for _ in range(world)]
    for e in range(num_experts):
        per_rank[(e + c) % world].append(e)
    if c % 2:
        hot = c % num_experts
        for row in per_rank:
            if hot not in row and len(row) < slots_per_rank:
                row.append(hot)
    return [row + [-1] * (slots_per_rank - len(row)) for row in per_rank]


def switch_every_3_steps(rank, world, steps: int = 20):
    """Train 20 steps switching placement every 3: the same as one eager process, no recompiles, state follows."""
    from torch._dynamo.utils import counters

    from moecc.backends.ep import placement_from_lists

    case = Case("loop")
    model, ref = case.model, case.ref
    model.compile(backend="moecc", options={"moecc.placement": cycle_placement(0, world)})
    x_all, _ = case.batch(world, seed=99)
    moecc.distribute(model, case.inputs(x_all[rank]))
    graphs = counters["stats"]["unique_graphs"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)
    layer = moecc.session(model).layers[0]
    facts = {"out": 0.0, "switches": 0}
    for step in range(steps):
        x_all, cot_all = case.batch(world, seed=100 + step)
        facts["out"] = max(facts["out"], _backward_both(case, model, ref, rank, x_all, cot_all))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        if step % 3 == 2:
            moecc.switch(layer, placement_from_lists(cycle_placement(step // 3 + 1, world), 4), [opt], step=step)
            facts["switches"] += 1
    facts["recompiled"] = counters["stats"]["unique_graphs"] != graphs
    facts.update(_worst(_expert_pairs(model, ref, opt, opt_ref)))
    facts["moved"] = [r.moved_experts for r in layer.switch_log]
    facts["switch_steps"] = [r.step for r in moecc.report(model).switches]
    facts["report_lists_switches"] = "placement switches" in str(moecc.report(model))
    return facts


def save_checkpoint(rank, world, outdir):
    """Train 2 steps with a replicated expert, save with DCP; rank 0 also keeps the eager reference's state."""
    case = Case("loop")
    model, ref = case.model, case.ref
    per_rank = [[0, 1, 3], [0, 2, -1]] if world == 2 else None
    if per_rank:
        model.compile(backend="moecc", options={"moecc.placement": per_rank})
    x_all, cot_all = case.batch(world, seed=1)
    moecc.distribute(model, case.inputs(x_all[rank]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)
    for step in range(2):
        x_all, cot_all = case.batch(world, seed=20 + step)
        (case.run(model, x_all[rank]) * cot_all[rank]).sum().backward()
        _dense_allreduce(model)
        (torch.stack([case.run(ref, x_all[r]) for r in range(world)]) * cot_all).sum().backward()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    moecc.checkpoint.save(model, opt, os.path.join(outdir, "ckpt"))
    if rank == 0:
        torch.save({"model": ref.state_dict(), "optim": opt_ref.state_dict()}, os.path.join(outdir, "ref.pt"))
    return {"saved": True, "layout": moecc.report(model).blocks[-1].layout}


def load_checkpoint(rank, world, outdir):
    """Load the checkpoint into a fresh model at another EP degree; the same weights, moments, outputs, next step."""
    case = Case("loop", seed=7)  # other initial weights: everything must come from the checkpoint
    model = case.model
    saved = torch.load(os.path.join(outdir, "ref.pt"), weights_only=False)
    ref = copy.deepcopy(case.ref)
    ref.load_state_dict(saved["model"])
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_ref.load_state_dict(saved["optim"])
    x_all, cot_all = case.batch(world, seed=30)
    moecc.distribute(model, case.inputs(x_all[rank]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moecc.attach(opt, check_every=10_000)
    moecc.checkpoint.load(model, opt, os.path.join(outdir, "ckpt"))
    facts = _worst(_expert_pairs(model, ref, opt, opt_ref))
    out = case.run(model, x_all[rank])
    ref_out = torch.stack([case.run(ref, x_all[r]) for r in range(world)])
    facts["out"] = float((out - ref_out[rank]).abs().max())
    (out * cot_all[rank]).sum().backward()
    _dense_allreduce(model)
    (ref_out * cot_all).sum().backward()
    opt.step()
    opt_ref.step()
    facts["next_step"] = max(_worst(_expert_pairs(model, ref, opt, opt_ref)).values())
    facts["layout"] = moecc.report(model).blocks[-1].layout
    return facts


def capacity_factor(rank, world):
    """Capacity dropping under EP: each rank drops by its own tokens' counts, as GShard does per device."""
    case = Case("loop")
    model, ref_model = case.model, case.ref
    compiled = torch.compile(model, backend="moecc", options={"moecc.capacity_factor": 1.0})
    direction = model.router.gate.weight[0].detach()
    x = torch.randn(1, 8, DIM, generator=torch.Generator().manual_seed(50 + rank)) + 3.0 * direction / direction.norm()
    x.requires_grad_(True)
    out = compiled(x)[0]
    ref = moe_zoo.gshard_reference(ref_model, x, 1.0)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x)
    (grad_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    return {"out": float((out - ref).abs().max()), "grad_x": float((grad_x - grad_ref).abs().max()),
            "dropping_matters": float((ref - ref_model(x)[0]).abs().max()),
            "outcome": moecc.report(model).blocks[-1].outcome}


def ddp_dense(rank, world):
    """DDP over the dense parameters (experts excluded), wrapped after distribute: 3 AdamW steps equal one
    process on the mean loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    case = Case("loop")
    model, ref = case.model, case.ref
    x_all, cot_all = case.batch(world, seed=1)
    moecc.distribute(model, case.inputs(x_all[rank]))
    DDP._set_params_and_buffers_to_ignore_for_model(model, moecc.expert_parameter_names(model))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    moecc.attach(opt, average=True, check_every=10_000)  # experts averaged over the world, as DDP averages
    facts = {"out": 0.0}
    for step in range(3):
        x_all, cot_all = case.batch(world, seed=40 + step)
        out = case.run(ddp, x_all[rank])
        (out * cot_all[rank]).sum().backward()
        ref_out = torch.stack([case.run(ref, x_all[r]) for r in range(world)])
        ((ref_out * cot_all).sum() / world).backward()
        facts["out"] = max(facts["out"], float((out - ref_out[rank]).abs().max()))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    facts.update(_worst(_expert_pairs(model, ref, opt, opt_ref)))
    ref_named = dict(ref.named_parameters())
    facts["dense"] = max(float((p - ref_named[n]).abs().max()) for n, p in model.named_parameters()
                         if n not in set(moecc.expert_parameter_names(model)))
    return facts


def fsdp2_dense(rank, world):
    """FSDP2 (``fully_shard``) on the dense modules (embedding, norms, head), the MoE blocks left to moecc (their
    routers replicated, gradients averaged here by hand: an FSDP unit inside a block would break its graph):
    3 AdamW steps equal one process on the mean loss. The two blocks are instances of one class, so they share
    one compiled graph, which must still run each on its own slots."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = moe_zoo.TinyTransformer()
    ref = copy.deepcopy(model)
    for dense in (model.embed, model.head, *model.norms):
        fully_shard(dense)
    gen = torch.Generator().manual_seed(4)
    moecc.distribute(model, torch.randint(0, 64, (1, TOKENS_PER_RANK), generator=gen))
    # DTensor (FSDP2) and plain (slot) parameters in one optimizer: foreach kernels refuse the mix
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    moecc.attach(opt, average=True, check_every=10_000)
    facts = {"out": 0.0}
    for _ in range(3):
        tokens = torch.randint(0, 64, (world, 1, TOKENS_PER_RANK), generator=gen)
        out = model(tokens[rank])
        out.pow(2).sum().backward()
        for p in (p for moe in model.moes for p in moe.router.parameters()):
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        ref_out = torch.cat([ref(tokens[r]) for r in range(world)])
        (ref_out.pow(2).sum() / world).backward()
        facts["out"] = max(facts["out"], float((out[0] - ref_out[rank]).abs().max()))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    facts["layers"] = len(moecc.session(model).layers)
    facts["slot_params"] = sorted(n for n, _ in model.named_parameters() if "moecc_slots" in n)
    facts["head"] = float((model.head.weight.full_tensor() - ref.head.weight).abs().max())
    ref_named = dict(ref.named_parameters())
    facts["experts"] = max(float((layer.kinds[0].slots[s] - ref_named[layer.kinds[0].names[e]]).abs().max())
                           for layer in moecc.session(model).layers for s, e in enumerate(layer.local_experts))
    return facts


def _scenario(name: str):
    """A scenario by name: ``train_equal:stacked@2x2`` is train_equal(kind="stacked", mesh="2x2")."""
    base, _, mesh = name.partition("@")
    fn_name, _, kind = base.partition(":")
    fn = SCENARIOS[fn_name]
    kwargs = {}
    if kind:
        kwargs["kind"] = kind
    if mesh:
        kwargs["mesh"] = mesh
    return fn, kwargs


SCENARIOS = {f.__name__: f for f in (train_equal, overlapped, two_level, exchange_auto, exchange_2d_equals_flat,
                                     replicated_hot_expert, receives_zero_tokens, mismatched_layout,
                                     eval_after_distribute,
                                     mismatched_mesh, wrong_order, switch_round_trip, switch_every_3_steps,
                                     save_checkpoint, load_checkpoint, capacity_factor, ddp_dense, fsdp2_dense,
                                     rank_dies_mid_step, rank_dies_mid_switch)}
NEEDS_DIR = {"save_checkpoint", "load_checkpoint", "rank_dies_mid_step"}


def main(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name in names:
        try:
            torch._dynamo.reset()
            fn, kwargs = _scenario(name)
            if fn.__name__ in NEEDS_DIR:
                kwargs["outdir"] = outdir
            results[name] = fn(rank, world, **kwargs)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            break  # the group may be out of step now
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    if not any("rank_dies" in name for name in names):  # after a peer died the group cannot be torn down
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5].split(","))

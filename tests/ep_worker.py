"""Scenarios run on every rank of a gloo group by tests/test_ep.py (one process per rank, loopback TCP).

Each scenario compares the expert-parallel compiled model on this rank's slice of a global batch with one
single-process eager model on the whole batch, and returns a dict of facts for the test to assert on.
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

TOKENS_PER_RANK = 3


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = moe_zoo.LoopMoE(16, 32, 4, 2)
    return model, copy.deepcopy(model)


def _batches(world: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(world, TOKENS_PER_RANK, 16, generator=gen)
    cot_all = torch.randn(world, TOKENS_PER_RANK, 16, generator=gen)
    return x_all, cot_all


def _allreduce_dense_grads(model) -> None:
    experts = {id(p) for layer in moecc.session(model).layers for p in layer.experts.all()}
    for p in model.parameters():
        if id(p) not in experts and p.grad is not None:
            dist.all_reduce(p.grad)


def _step_facts(model, ref, compiled, rank, world, seed):
    """Forward/backward on this rank's slice vs the reference on the whole batch: max differences.

    Leaves the gradients ready for ``optimizer.step()`` (what ``moecc.attach`` would do before it).
    """
    x_all, cot_all = _batches(world, seed)
    out = compiled(x_all[rank:rank + 1])[0]
    (out * cot_all[rank:rank + 1]).sum().backward()
    moecc.sync_expert_grads(model)
    _allreduce_dense_grads(model)
    ref_out = ref(x_all.reshape(1, -1, 16))[0].reshape(world, TOKENS_PER_RANK, 16)
    (ref_out * cot_all.reshape(1, -1, 16).reshape(world, TOKENS_PER_RANK, 16)).sum().backward()
    hosted = moecc.session(model).layers[-1].hosted()
    facts = {"out": float((out[0] - ref_out[rank]).abs().max()), "grad": 0.0, "absent_grads_ok": True}
    for e, (mine, theirs) in enumerate(zip(model.experts, ref.experts)):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            if e in hosted:
                facts["grad"] = max(facts["grad"], float((p.grad - q.grad).abs().max()))
            elif p.grad is not None:
                facts["absent_grads_ok"] = False
    for p, q in zip(model.router.parameters(), ref.router.parameters()):
        facts["grad"] = max(facts["grad"], float((p.grad - q.grad).abs().max()))
    return facts


def equal_single_process(rank, world):
    model, ref = _pair()
    compiled = torch.compile(model, backend="moecc")
    facts = _step_facts(model, ref, compiled, rank, world, seed=1)
    record = moecc.report(model).blocks[-1]
    facts.update(outcome=record.outcome, layout=record.layout, send_rows=record.send_rows, kernel=record.kernel)
    return facts


def replicated_hot_expert(rank, world):
    """Expert 0 on every rank; three AdamW steps; outputs track the reference and replicas stay identical."""
    model, ref = _pair()
    others = [e for e in range(1, 4)]
    per_rank = [[0] + others[r::world] for r in range(world)]
    width = max(len(r) for r in per_rank)
    per_rank = [r + [-1] * (width - len(r)) for r in per_rank]
    compiled = torch.compile(model, backend="moecc", options={"moecc.placement": per_rank})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    worst = {"out": 0.0, "grad": 0.0}
    for step in range(3):
        facts = _step_facts(model, ref, compiled, rank, world, seed=10 + step)
        worst = {k: max(worst[k], facts[k]) for k in worst}
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    gathered = [torch.empty_like(model.experts[0].w1.weight) for _ in range(world)]
    dist.all_gather(gathered, model.experts[0].w1.weight.detach().contiguous())
    worst["replica_spread"] = float(max((g - gathered[0]).abs().max() for g in gathered))
    worst["hot_vs_ref"] = float((model.experts[0].w1.weight - ref.experts[0].w1.weight).abs().max())
    worst["outcome"] = moecc.report(model).blocks[-1].outcome
    return worst


def receives_zero_tokens(rank, world):
    """Every token picks experts hosted on rank 0: the other ranks receive no rows at all."""
    model, ref = _pair()
    compiled = torch.compile(model, backend="moecc")
    compiled(torch.randn(1, TOKENS_PER_RANK, 16))
    hosted0 = [e for e in range(4) if e % world == 0][:2]
    with torch.no_grad():
        for m in (model, ref):
            m.router.gate.weight.zero_()
            for e in hosted0:
                m.router.gate.weight[e] = 1.0
    x_all, cot_all = _batches(world, seed=3)
    x_all = x_all.abs() + 0.1
    out = compiled(x_all[rank:rank + 1])[0]
    ref_out = ref(x_all.reshape(1, -1, 16))[0].reshape(world, TOKENS_PER_RANK, 16)
    _, _, chosen = ref.router(x_all.reshape(-1, 16))
    return {"out": float((out[0] - ref_out[rank]).abs().max()),
            "only_rank0_experts": sorted(set(chosen.flatten().tolist())) == hosted0}


def mismatched_layout(rank, world):
    """Each rank asks for a different placement: every rank must refuse, none may hang."""
    model, _ = _pair()
    per_rank = [[e for e in range(4) if e % world == r] for r in range(world)]
    if rank == 1:
        per_rank = per_rank[::-1]
    try:
        torch.compile(model, backend="moecc", options={"moecc.placement": per_rank})(torch.randn(1, 3, 16))
    except Exception as exc:  # torch wraps backend errors
        return {"raised": True, "message": str(exc)[:2000]}
    return {"raised": False, "message": ""}


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
    """Train 20 steps switching placement every 3; the same as one eager process, no recompiles, state follows."""
    from torch._dynamo.utils import counters

    model, ref = _pair()
    compiled = torch.compile(model, backend="moecc", options={"moecc.placement": cycle_placement(0, world)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    facts = {"out": 0.0, "grad": 0.0, "switches": 0}
    graphs_after_first = None
    for step in range(steps):
        f = _step_facts(model, ref, compiled, rank, world, seed=100 + step)
        facts["out"], facts["grad"] = max(facts["out"], f["out"]), max(facts["grad"], f["grad"])
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        if graphs_after_first is None:  # compiled by the first forward
            graphs_after_first = counters["stats"]["unique_graphs"]
            layer = moecc.session(model).layers[-1]
        if step % 3 == 2:
            from moecc.backends.ep import placement_from_lists

            target = placement_from_lists(cycle_placement(step // 3 + 1, world), 4)
            moecc.switch(layer, target, [opt], step=step)
            facts["switches"] += 1
    facts["recompiled"] = counters["stats"]["unique_graphs"] != graphs_after_first
    moecc.consolidate(model, [opt])
    facts["params_vs_ref"] = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    facts["adam_vs_ref"] = max(float((opt.state[p][k] - opt_ref.state[q][k]).abs().max())
                               for p, q in zip(model.parameters(), ref.parameters())
                               for k in ("exp_avg", "exp_avg_sq"))
    facts["moved"] = [r.moved_experts for r in layer.switch_log]
    facts["switch_steps"] = [r.step for r in moecc.report(model).switches]
    facts["report_lists_switches"] = "placement switches" in str(moecc.report(model))
    # A checkpoint taken now loads into a fresh model compiled with another placement: same outputs.
    fresh = moe_zoo.LoopMoE(16, 32, 4, 2)
    fresh.load_state_dict(model.state_dict())
    other = torch.compile(fresh, backend="moecc", options={"moecc.placement": cycle_placement(1, world)})
    x_all, _ = _batches(world, seed=999)
    with torch.no_grad():
        out = other(x_all[rank:rank + 1])[0]
        ref_out = ref(x_all.reshape(1, -1, 16))[0].reshape(world, TOKENS_PER_RANK, 16)[rank]
    facts["checkpoint_out"] = float((out[0] - ref_out).abs().max())
    return facts


def capacity_factor(rank, world):
    """Capacity dropping under EP: each rank drops by its own tokens' counts, as GShard does per device."""
    model, _ = _pair()
    compiled = torch.compile(model, backend="moecc", options={"moecc.capacity_factor": 1.0})
    direction = model.router.gate.weight[0].detach()
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(50 + rank)) + 3.0 * direction / direction.norm()
    x.requires_grad_(True)
    out = compiled(x)[0]
    ref = moe_zoo.gshard_reference(model, x, 1.0)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x)
    (grad_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    return {"out": float((out - ref).abs().max()), "grad_x": float((grad_x - grad_ref).abs().max()),
            "dropping_matters": float((ref - model(x)[0]).abs().max()),
            "outcome": moecc.report(model).blocks[-1].outcome}


SCENARIOS = {f.__name__: f for f in (equal_single_process, replicated_hot_expert, receives_zero_tokens,
                                     mismatched_layout, switch_every_3_steps, capacity_factor)}


def main(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name in names:
        try:
            torch._dynamo.reset()
            results[name] = SCENARIOS[name](rank, world)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            break  # the group may be out of step now
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5].split(","))

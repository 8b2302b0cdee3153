"""A recorded routing trace replayed through the cost model at 64 and 1024 GPUs (issue 5, second half).

``python samples/train_drift.py --compare`` trains a small MoE language model on 4 gloo ranks, measures step time
with and without runtime switching, and records its routing in ``benchmarks/results/drift_trace.json`` (16
experts, one row per 10-step window: mean routed rows per expert per step). This script asks what that routing
would cost on real clusters: it simulates training over the same trace, with the compiled cost-model formulas, at
64 and 1024 GPUs on the shipped datasheet profiles ``h100-sxm-8x`` and ``a100-sxm-8x``, and compares per layer and
over the layers:

1. the baseline placement, never switched: static round-robin EP (expert e on rank e % R) when there are at least
   as many experts as ranks; **uniform replication** otherwise (every expert in the same number of slots, round-
   robin, equal shares: what DP x EP frameworks do). With more slots than experts, ``static_placement`` would
   leave the ranks beyond E idle and every other rank with R/E times its fair load; it is still reported
   (``static e%R``) to show why it is not the baseline there;
2. the greedy pool (SmartMoE's LPT with replicas, one member per k-means group of windows);
3. the planner's pool (``plan_pool``: heuristic warm start, CBC under a time limit);
4. moecc's runtime without a pool (``moecc.runtime.decide``'s rule, ``costmodel.switching.decide_switch``): the
   current placement against a greedy re-plan on the previous window, switching when the predicted saving over
   the next window exceeds the switch cost. This is what ``train_drift.py --switching on`` ran, so it is the
   simulated counterpart of that measurement.

Pools are evaluated both ways: *online* (the runtime chooses each window's member from the previous window's loads,
as ``moecc.runtime`` must; the headline numbers) and *oracle* (the best member per window, knowing its loads: the
planner's assumption). Switches are charged at their real cost (weights + fp32 Adam state of every refilled slot
over ``param_move``), in the step-time means and separately.

Mapping the 16-expert CPU trace to a cluster (printed with the results; all of it flags):

- experts: each recorded expert stands for ``--split`` (16) fine-grained experts that share its rows equally, so
  the simulated layer has 256 experts. The recorded per-window distribution over the 16 groups, its skew and its
  drift are kept exactly (rows are normalised per window); the split within a group is even because the trace
  says nothing about it. ``--split 1`` keeps 16 experts (then both GPU counts are DP x EP replication);
- tokens: ``--tokens-per-gpu`` (4096) tokens per GPU per step, times the trace's top-k (its median rows per step
  over ``--trace-tokens``, 4096 for train_drift.py: 4 ranks x 8 sequences x 128 tokens; top-2 there);
- expert: a fine-grained SwiGLU expert, d_model 4096, d_ffn 1408 (DeepSeek-MoE / Qwen-MoE width at a 4096 model),
  bf16 activations and weights, fp32 Adam state (12 bytes per parameter) moved with the weights on a switch;
  training (forward + backward);
- layout: at least as many experts as ranks (256 experts, 64 GPUs): ``ceil(E/R) + 1`` slots per rank, every
  expert fits and one spare slot per rank for replicas (as train_drift.py and benchmarks/planner.py); fewer
  experts than ranks (1024 GPUs): one slot per rank, 1024 slots = 4 replicas per expert on average, the pools
  choosing how many each expert gets;
- time: each trace row is ``--steps-per-row`` (10, train_drift's ``--check-every``) steps and the runtime checks
  once per row, so a switch must pay for itself within 10 steps, as on the CPU run;
- machine: the datasheet profiles are 8 nodes of 8 GPUs; at 1024 GPUs the same per-GPU numbers and per-GPU links
  are used with 128 nodes (a non-blocking fabric: inter-node bandwidth per GPU does not drop with scale).

What the placement formulas do not see: the all-to-all is priced by the busiest receiver over all R ranks (no
locality for a replica in the sender's EP group), the dense part of the model is not simulated (these are MoE
layer times), and the datasheet GEMM curve is an assumption, not a measurement (see the profiles' ``source``).

The exchange as a plan dimension (issue 16): a last table prices each layer's step with the whole-step model
(``costmodel/step.py``: router, permutes, host ops, every exchange and the backward) for the baseline placement and
the planner's pool (online members), with the flat exchange back to back, the best overlap chunks (flat), Tutel's
2-D exchange, the chooser's pick between those (``moecc.overlap_chunks="auto"``) and a chunked 2-D exchange that
the formulas price but the dispatch does not run, and what each saves over the flat exchange. Their step terms
(per-op cost, permute bandwidth, overlap efficiency, per-peer latency) are datasheet assumptions, said so in the
profiles' notes.

    python benchmarks/switching_sim.py                     # 40 s per trace layer on 2 cores
    python benchmarks/switching_sim.py --trace T.json --gpus 64 --profiles h100-sxm-8x

Prints rich tables and writes ``benchmarks/results/switching_sim.json``. If the trace is missing it says how to
make it and falls back to a drifting Zipf trace (``costmodel.workload.zipf_trace``), said in the output and the
JSON; ``--require-trace`` exits with status 2 instead. Windows that record no routing at all (rows summing to 0:
a counter that did not count, since every token routes somewhere) are dropped, and a layer left with fewer than
two windows is left out, named with the reason in the output and under ``mapping.skipped_layers``.

The pools are planned on the same trace they are replayed on (SmartMoE plans from an estimate made before
training), so their numbers are an upper bound on what planning ahead buys; the runtime re-plan is causal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moecc.costmodel.compare import compare
from moecc.costmodel.formulas import CostModel, ExpertDims, compile_cost_model
from moecc.costmodel.greedy import greedy_placement, static_placement
from moecc.costmodel.placement import EMPTY, Placement, Pool, SlotLayout, placement_from_ranks
from moecc.costmodel.planner import simulate_online, simulate_pool
from moecc.costmodel.profile import Profile, builtin_profile
from moecc.costmodel.step import LayerWork, step_breakdown
from moecc.costmodel.switching import decide_switch
from moecc.costmodel.workload import TraceError, Workload, load_trace, window_loads, zipf_trace

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TRACE = RESULTS / "drift_trace.json"
console = Console(width=170)


# -- the trace ----------------------------------------------------------------------------------------------------

def fallback_trace(num_experts: int, rows_per_step: int, windows: int, steps_per_row: int) -> Workload:
    """Two layers of a drifting Zipf trace in the recorded format (one row per window of ``steps_per_row`` steps).

    Zipf 1.0 -> 1.5 over the run, the hot set moving two places every five windows; per-step rows from
    ``zipf_trace`` averaged per window, as the runtime records them.
    """
    layers = {}
    for i in range(2):
        steps = windows * steps_per_row
        w = zipf_trace(num_experts, rows_per_step, steps, s_start=1.0, s_end=1.5, drift_period=5 * steps_per_row,
                       drift_stride=2, seed=100 + i)
        layers[f"moes.{i}"] = tuple(tuple(r) for r in window_loads(w.layer(), steps_per_row))
    return Workload(num_experts=num_experts, layers=layers)


def read_trace(path: Path, *, require: bool, trace_tokens: int, steps_per_row: int) -> tuple[Workload, str]:
    """The recorded trace, or (unless ``require``) the Zipf fallback; the second value says which, for the output."""
    if path.exists():
        return load_trace(path), f"recorded trace {path}"
    how = ("make it with `python samples/train_drift.py --compare` (trains on 4 gloo ranks, switching off then on, "
           "and writes it), or pass --trace")
    if require:
        raise TraceError(f"no trace at {path}: {how}")
    console.print(f"[yellow]no trace at {path}[/]: {how}.\n[yellow]Falling back to a drifting Zipf trace[/] "
                  f"(costmodel.workload.zipf_trace: 16 experts, 2 layers, top-2 of {trace_tokens} tokens per step, "
                  f"Zipf 1.0 -> 1.5, hot set moving every 5 windows); the numbers below are NOT from the trained "
                  "model.")
    return fallback_trace(16, 2 * trace_tokens, 20, steps_per_row), "zipf_trace fallback (no recorded trace)"


def usable_layers(workload: Workload, min_windows: int = 2) -> tuple[dict[str, tuple], dict[str, str]]:
    """The layers worth simulating, their empty windows dropped; and, per layer left out, why.

    A window whose rows sum to zero recorded no routing at all (every token routes somewhere, so this is a load
    counter that did not count, not a load): it carries no distribution to keep, and replaying it as balanced
    would invent one. A layer with fewer than ``min_windows`` windows left has no drift to simulate.
    """
    kept, skipped = {}, {}
    for name, rows in workload.layers.items():
        nonzero = tuple(row for row in rows if sum(row) > 0)
        if len(nonzero) < min_windows:
            skipped[name] = (f"{len(rows) - len(nonzero)} of {len(rows)} windows record no routing (a load counter "
                             f"that stopped counting?)")
        else:
            kept[name] = nonzero
            if len(nonzero) < len(rows):
                console.print(f"[yellow]layer {name}: {len(rows) - len(nonzero)} empty windows dropped[/]")
    return kept, skipped


def trace_top_k(layers: dict[str, tuple], trace_tokens: int) -> float:
    """Routed rows per token in the trace: the median rows per step of its windows over the tokens per step that
    produced them (the median: a partly counted window must not move it)."""
    return statistics.median(sum(row) for rows in layers.values() for row in rows) / trace_tokens


def scale_windows(rows: tuple[tuple[float, ...], ...], split: int, rows_per_step: float) -> list[list[float]]:
    """Per window: the recorded distribution over experts (rows normalised), each expert split evenly into
    ``split`` fine-grained experts, times the cluster's routed rows per step."""
    out = []
    for row in rows:
        total = sum(row)
        probs = [x / total for x in row] if total > 0 else [1.0 / len(row)] * len(row)
        out.append([p * rows_per_step / split for p in probs for _ in range(split)])
    return out


# -- the cluster -------------------------------------------------------------------------------------------------

def cluster_profile(profile: Profile, gpus: int) -> Profile:
    """The datasheet profile with enough nodes for ``gpus``: same GPU, same per-GPU links (a non-blocking fabric)."""
    nodes = max(profile.nodes, math.ceil(gpus / profile.devices_per_node))
    return dataclasses.replace(profile, nodes=nodes)


def choose_layout(num_experts: int, gpus: int) -> SlotLayout:
    """Every expert fits plus one spare slot per rank when E >= R; one slot per rank (R >= E slots) otherwise."""
    if num_experts >= gpus:
        return SlotLayout(ranks=gpus, slots_per_rank=-(-num_experts // gpus) + 1)
    return SlotLayout(ranks=gpus, slots_per_rank=1)


def uniform_replication(layout: SlotLayout, num_experts: int) -> Placement:
    """DP x EP: slot s holds expert ``s % E`` (round-robin over every slot), each replica an equal share.

    Every expert gets ``S // E`` slots (the first ``S % E`` experts one more when E does not divide S). Slots are
    rank-major, so a rank's ``slots_per_rank <= E`` consecutive slots hold distinct experts.
    """
    if layout.slots_per_rank > num_experts:
        raise ValueError(f"{layout.slots_per_rank} slots per rank > {num_experts} experts: a rank would hold one twice")
    count = [0] * num_experts
    for s in range(layout.num_slots):
        count[s % num_experts] += 1
    ranks = [[(s % num_experts, 1.0 / count[s % num_experts]) for s in layout.slots_of(r)] for r in range(layout.ranks)]
    return placement_from_ranks(layout, num_experts, ranks)


def baseline(layout: SlotLayout, num_experts: int) -> tuple[Placement, str]:
    """The fair never-switched placement: round-robin EP when E >= R, uniform replication otherwise."""
    if num_experts >= layout.ranks:
        return static_placement(layout, num_experts), "static EP (e % R)"
    return uniform_replication(layout, num_experts), f"uniform x{layout.num_slots // num_experts}"


# -- simulations --------------------------------------------------------------------------------------------------

def align_to(prev: Placement, new: Placement) -> Placement:
    """``align_pool(Pool((prev, new))).placements[1]``, computed in time linear in the slots.

    The same result (ranks relabelled so each of ``new``'s ranks lands on the free rank of ``prev`` sharing most of
    its experts, lowest index on ties, ranks with more experts first; then slots ordered to keep ``prev``'s
    experts where they are), but ``align_pool`` scores every free rank for every rank: about 1.5 s per call at
    1024 ranks, and the runtime re-plan below aligns once per window.
    """
    layout = prev.layout
    R, k = layout.ranks, layout.slots_per_rank
    prev_rows = prev.experts_per_rank()
    holders: dict[int, list[int]] = {}
    for q, row in enumerate(prev_rows):
        for e in row:
            if e != EMPTY:
                holders.setdefault(e, []).append(q)
    items = [[(e, f) for e, f in zip(new.expert_S[r * k:(r + 1) * k], new.share_S[r * k:(r + 1) * k]) if e != EMPTY]
             for r in range(R)]
    free = [True] * R
    lowest_free = 0
    target: list[list[tuple[int, float]]] = [[] for _ in range(R)]
    for r in sorted(range(R), key=lambda r: -len(items[r])):
        overlap: dict[int, int] = {}
        for e, _ in items[r]:
            for q in holders.get(e, ()):
                if free[q]:
                    overlap[q] = overlap.get(q, 0) + 1
        if overlap:
            best = max(overlap, key=lambda q: (overlap[q], -q))
        else:
            while not free[lowest_free]:
                lowest_free += 1
            best = lowest_free
        free[best] = False
        target[best] = items[r]
    expert_S: list[int] = []
    share_S: list[float] = []
    for r in range(R):
        mine = dict(target[r])
        row_e = [e if e in mine else None for e in prev_rows[r]]
        rest = [e for e in mine if e not in row_e]
        row_e = [e if e is not None else (rest.pop(0) if rest else EMPTY) for e in row_e]
        expert_S += row_e
        share_S += [mine.get(e, 0.0) if e != EMPTY else 0.0 for e in row_e]
    return Placement(layout=layout, num_experts=new.num_experts, expert_S=tuple(expert_S), share_S=tuple(share_S))


def simulate_runtime_replan(start: Placement, load_WE: list[list[float]], steps_W: list[int], model: CostModel,
                            greedy_W: list[Placement]) -> dict:
    """moecc.runtime without a pool: before window w, price the current placement and a greedy re-plan of window
    w-1's loads (``greedy_W[w-1]``, aligned to the current placement as ``runtime.candidates`` does) and switch
    when the predicted saving over window w's steps exceeds the switch cost, through the runtime's own rule
    (``costmodel.switching.decide_switch``). Without its feedback of measured switch costs and gains (``last``):
    the simulation measures nothing, and feeding it its own predictions would only restate them."""
    current, total, switch_total, switches = start, 0.0, 0.0, 0
    for w, load_E in enumerate(load_WE):
        if w > 0:
            candidates = [current, align_to(current, greedy_W[w - 1])]
            choice = decide_switch(model, current, candidates, load_WE[w - 1], steps_W[w], last=None)
            if choice is not None:
                current, switch_total, switches = choice.placement, switch_total + choice.cost_s, switches + 1
        total += model.step_s(current, load_E) * steps_W[w]
    return {"step_s": (total + switch_total) / sum(steps_W), "switches": switches, "switch_s_total": switch_total}


def pool_numbers(pool: Pool, load_WE: list[list[float]], steps_W: list[int], model: CostModel) -> dict:
    """A pool's oracle (best member per window) and online (chosen from the previous window) step seconds."""
    oracle = simulate_pool(pool, load_WE, steps_W, model)
    online = simulate_online(pool, load_WE, steps_W, model, first=oracle.assignment[0])
    return {"members": len(pool), "step_s": online.expected_step_s, "switches": online.switches,
            "switch_s_total": online.switch_s_total, "oracle_step_s": oracle.expected_step_s,
            "oracle_switches": oracle.switches, "oracle_switch_s_total": oracle.switch_s_total,
            "online_plan_per_window": list(online.assignment)}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """One layer's trace at one GPU count: what every profile's simulation shares (none of it needs a model)."""

    load_WE: list[list[float]]  # per window: mean routed rows per expert per step, scaled to the cluster
    steps_W: list[int]
    layout: SlotLayout
    greedy_W: list[Placement]  # greedy (LPT) placement of each window's own loads: the runtime's re-plans


def make_scenario(rows: tuple[tuple[float, ...], ...], *, gpus: int, split: int, rows_per_step: float,
                  steps_per_row: int) -> Scenario:
    load_WE = scale_windows(rows, split, rows_per_step)
    layout = choose_layout(len(load_WE[0]), gpus)
    return Scenario(load_WE=load_WE, steps_W=[steps_per_row] * len(load_WE), layout=layout,
                    greedy_W=[greedy_placement(layout, load_E) for load_E in load_WE])


def simulate_layer(sc: Scenario, model: CostModel, *, pool_size: int, time_limit_s: float,
                   work: LayerWork | None = None, node_size: int = 8) -> dict:
    """Every strategy over one layer's scaled trace with one compiled model (profile x GPU count); seconds.

    ``compare`` plans the pools from the per-step rows (each window's row repeated for its steps, so its windows
    are the trace's rows); the pools are then evaluated here on the windows, online and oracle.
    """
    load_WE, steps_W, layout = sc.load_WE, sc.steps_W, sc.layout
    E, window = len(load_WE[0]), steps_W[0]
    base, base_name = baseline(layout, E)
    per_step = [list(row) for row, steps in zip(load_WE, steps_W) for _ in range(steps)]
    started = time.perf_counter()
    result = compare(per_step, layout, pool_size, model, window=window, time_limit_s=time_limit_s, check_every=window)
    compare_s = time.perf_counter() - started
    base_s = simulate_pool(Pool(layout=layout, placements=(base,)), load_WE, steps_W, model).expected_step_s
    planner = pool_numbers(result.plan.pool, load_WE, steps_W, model)
    planner.update(solve_s=result.plan.solve_s, status=result.plan.status, gap=result.plan.gap)
    exchange = {}
    if work is not None:
        pool = result.plan.pool
        exchange = {"baseline": exchange_study(model.profile, work, [base] * len(load_WE), load_WE, steps_W, node_size),
                    "planner_pool": exchange_study(model.profile, work,
                                                   [pool.placements[k] for k in planner["online_plan_per_window"]],
                                                   load_WE, steps_W, node_size)}
    return {
        "experts": E, "ranks": layout.ranks, "slots_per_rank": layout.slots_per_rank, "windows": len(load_WE),
        "rows_per_step": sum(load_WE[0]), "baseline": base_name, "baseline_step_s": base_s,
        "static_rr_step_s": result.static_step_s,
        "greedy_pool": pool_numbers(result.greedy, load_WE, steps_W, model), "planner_pool": planner,
        "runtime_replan": simulate_runtime_replan(base, load_WE, steps_W, model, sc.greedy_W),
        # a reference, not a strategy: every window on the greedy placement of its own loads, switches free
        "free_replan_step_s": statistics.mean(model.step_s(p, load_E) for p, load_E in zip(sc.greedy_W, load_WE)),
        "compare_wall_s": compare_s,
        "exchange": exchange,
    }


# -- the exchange as a plan dimension (issue 16) -------------------------------------------------------------------

CHUNK_CHOICES = (1, 2, 3, 4, 6, 8)
EXCHANGES = (("flat", "flat, no overlap"), ("overlap", "overlap only"), ("2d", "2-D only"),
             ("chooser", "chooser (overlap or 2-D)"), ("both", "chunked 2-D (not implemented)"))


def exchange_study(profile: Profile, work: LayerWork, placements: list[Placement], load_WE: list[list[float]],
                   steps_W: list[int], node_size: int) -> dict:
    """The whole-step model (costmodel/step.py) over the windows with each exchange the dispatch could run.

    Each choice is made once per layer, as ``moecc.overlap_chunks="auto"`` does at compile time, on the mean load
    of the windows, then priced on every window with its placement: the flat exchange back to back (moecc before
    issue 16), the best number of overlap chunks (flat), the 2-D exchange (unchunked), the chooser's pick between
    those (``step.choose_exchange``'s rule), and what a chunked 2-D exchange would bring (the formulas allow it;
    the dispatch runs chunks over the flat exchange only). Seconds per step, switches not included.
    """
    ranks = placements[0].layout.ranks
    mean_E = [sum(col) / len(col) for col in zip(*load_WE)]

    terms = {"experts": 0.0, "exchanges": 0.0, "router_permutes_host": 0.0}

    def priced(chunks: int, hierarchical: bool, record: bool = False) -> float:
        total = 0.0
        for p, load_E, steps in zip(placements, load_WE, steps_W):
            bd = step_breakdown(profile, work, ranks, load=load_E, placement=p, chunks=chunks,
                                hierarchical=hierarchical, node_size=node_size)
            total += bd.total_s * steps
            if record:  # the flat exchange's terms, step-weighted over the windows
                for key, value in (("experts", bd.expert_compute_s), ("exchanges", bd.exchange_s + bd.counts_s),
                                   ("router_permutes_host", bd.router_s + bd.permute_s + bd.host_s)):
                    terms[key] += value * steps / sum(steps_W)
        return total / sum(steps_W)

    def on_mean(chunks: int, hierarchical: bool):
        return step_breakdown(profile, work, ranks, load=mean_E, placement=placements[0], chunks=chunks,
                              hierarchical=hierarchical, node_size=node_size)

    flat = {c_: on_mean(c_, False) for c_ in CHUNK_CHOICES}
    two_d = {c_: on_mean(c_, True) for c_ in CHUNK_CHOICES}
    best_overlap = min(CHUNK_CHOICES[1:], key=lambda c_: flat[c_].total_s)
    best_both = min(CHUNK_CHOICES, key=lambda c_: two_d[c_].total_s)
    plain = flat[1].total_s
    candidates = [(flat[1].total_s, 1, False), (flat[best_overlap].total_s, best_overlap, False),
                  (two_d[1].total_s, 1, True)]
    pick = min(candidates)
    if pick[0] > plain * 0.98:  # choose_exchange's margin: a more complicated exchange must win by 2%
        pick = candidates[0]
    configs = {"flat": (1, False), "overlap": (best_overlap, False), "2d": (1, True), "chooser": pick[1:],
               "both": (best_both, True)}
    out = {key: {"chunks": c_, "hierarchical": h, "step_s": priced(c_, h, record=key == "flat")}
           for key, (c_, h) in configs.items()}
    out["terms_flat_s"] = terms
    return out


# -- output -------------------------------------------------------------------------------------------------------

METHODS = (("greedy pool", "greedy_pool"), ("planner pool", "planner_pool"), ("runtime re-plan", "runtime_replan"))


def mean_row(layers: dict[str, dict]) -> dict:
    """Over layers: mean step seconds (the ratio of means is the ratio of the MoE layers' summed time), summed
    switches and switch seconds, summed solve time."""
    vals = list(layers.values())
    out = {"baseline": vals[0]["baseline"], "baseline_step_s": statistics.mean(v["baseline_step_s"] for v in vals),
           "static_rr_step_s": statistics.mean(v["static_rr_step_s"] for v in vals)}
    for _, key in METHODS:
        out[key] = {"step_s": statistics.mean(v[key]["step_s"] for v in vals),
                    "switches": sum(v[key]["switches"] for v in vals),
                    "switch_s_total": sum(v[key]["switch_s_total"] for v in vals)}
        if "oracle_step_s" in vals[0][key]:
            out[key]["oracle_step_s"] = statistics.mean(v[key]["oracle_step_s"] for v in vals)
    out["planner_pool"]["solve_s"] = sum(v["planner_pool"]["solve_s"] for v in vals)
    out["free_replan_step_s"] = statistics.mean(v["free_replan_step_s"] for v in vals)
    out["speedup_over_baseline"] = {key: out["baseline_step_s"] / out[key]["step_s"] for _, key in METHODS}
    return out


def _rows(case: dict):
    for name, r in list(case["layers"].items()) + [("mean", case["mean"])]:
        yield (f"[bold]{name}[/]" if name == "mean" else name), r, name == "mean"


def step_table(cases: list[dict], title: str) -> Table:
    """Step times and speedups over the baseline."""
    table = Table(title=title)
    for col in ("GPUs", "profile", "layer", "baseline", "baseline ms", "greedy pool", "planner pool", "runtime re-plan",
                "speedup greedy", "speedup planner", "speedup re-plan"):
        table.add_column(col, justify="left" if col in ("profile", "layer") else "right")
    for case in cases:
        for name, r, last in _rows(case):
            base = r["baseline_step_s"]
            pools = [r[key] for _, key in METHODS]
            ms = lambda d: (f"{1e3 * d['step_s']:.2f}"  # noqa: E731
                            + (f" ({1e3 * d['oracle_step_s']:.2f})" if "oracle_step_s" in d else ""))
            table.add_row(str(case["gpus"]), case["profile"], name, r["baseline"], f"{1e3 * base:.2f}",
                          *(ms(d) for d in pools), *(f"{base / d['step_s']:.2f}x" for d in pools), end_section=last)
    return table


def switch_table(cases: list[dict], title: str) -> Table:
    """Switch counts and seconds, the planner's solve, and two references: static e%R and free re-planning."""
    table = Table(title=title)
    for col in ("GPUs", "profile", "layer", "switches g/p/r", "switch ms g/p/r", "planner solve s", "planner status",
                "static e%R ms", "free re-plan ms"):
        table.add_column(col, justify="left" if col in ("profile", "layer", "planner status") else "right")
    for case in cases:
        for name, r, last in _rows(case):
            pools = [r[key] for _, key in METHODS]
            free = r.get("free_replan_step_s")
            table.add_row(str(case["gpus"]), case["profile"], name, "/".join(str(d["switches"]) for d in pools),
                          "/".join(f"{1e3 * d['switch_s_total']:.0f}" for d in pools),
                          f"{r['planner_pool']['solve_s']:.1f}", r["planner_pool"].get("status", ""),
                          f"{1e3 * r['static_rr_step_s']:.2f}", f"{1e3 * free:.2f}" if free is not None else "",
                          end_section=last)
    return table


def _exchange_note(choice: dict) -> str:
    return f" (c={choice['chunks']}{', 2-D' if choice['hierarchical'] else ''})"


def exchange_table(cases: list[dict], title: str) -> Table:
    """The exchange as a plan dimension: per case and layer, ms per step with each exchange, what it saves."""
    table = Table(title=title)
    for col in ("GPUs", "profile", "layer", "placement", "experts / exchanges / rest ms (flat)",
                *(label for _, label in EXCHANGES), "overlap saves", "2-D saves", "chooser saves"):
        table.add_column(col, justify="left" if col in ("profile", "layer", "placement") else "right")
    for case in cases:
        items = list(case["layers"].items())
        for i, (name, r) in enumerate(items):
            for j, (key, label) in enumerate((("baseline", r["baseline"]), ("planner_pool", "planner pool"))):
                ex = r["exchange"].get(key)
                if not ex:
                    continue
                flat = ex["flat"]["step_s"]
                cells = [f"{1e3 * ex[k]['step_s']:.2f}" + (_exchange_note(ex[k]) if k in ("chooser", "both")
                                                           else f" (c={ex[k]['chunks']})" if k == "overlap" else "")
                         for k, _ in EXCHANGES]
                terms = ex["terms_flat_s"]
                table.add_row(str(case["gpus"]), case["profile"], name, label,
                              f"{1e3 * terms['experts']:.2f} / {1e3 * terms['exchanges']:.2f} / "
                              f"{1e3 * terms['router_permutes_host']:.2f}", *cells,
                              *(f"{100 * (1 - ex[k]['step_s'] / flat):.1f}%" for k in ("overlap", "2d", "chooser")),
                              end_section=(i == len(items) - 1 and j == 1))
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--require-trace", action="store_true", help="exit 2 if the trace is missing (no fallback)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--profiles", nargs="+", default=["h100-sxm-8x", "a100-sxm-8x"])
    parser.add_argument("--split", type=int, default=16, help="fine-grained experts per recorded expert")
    parser.add_argument("--tokens-per-gpu", type=int, default=4096, help="tokens per GPU per step")
    parser.add_argument("--trace-tokens", type=int, default=4096,
                        help="tokens per step behind the trace's rows (train_drift.py: 4 ranks x 8 x 128)")
    parser.add_argument("--steps-per-row", type=int, default=10, help="steps each trace row stands for")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ffn", type=int, default=1408)
    parser.add_argument("--pool", type=int, default=4, help="K, placements in the pools")
    parser.add_argument("--time-limit", type=float, default=3.0, help="planner seconds per layer (CBC included)")
    parser.add_argument("--out", type=Path, default=RESULTS / "switching_sim.json")
    args = parser.parse_args()

    started = time.perf_counter()
    try:
        workload, source = read_trace(args.trace, require=args.require_trace, trace_tokens=args.trace_tokens,
                                      steps_per_row=args.steps_per_row)
    except TraceError as err:
        console.print(f"[red]{err}[/]")
        return 2
    layers_in, skipped = usable_layers(workload)
    for name, why in skipped.items():
        console.print(f"[red]layer {name} left out[/]: {why}")
    if not layers_in:
        console.print("[red]no layer of the trace records routing; nothing to simulate[/]")
        return 2
    top_k = trace_top_k(layers_in, args.trace_tokens)
    dims = ExpertDims(d_model=args.d_model, d_ffn=args.d_ffn, act_bytes=2, param_bytes=2, state_bytes_per_param=12,
                      training=True)
    E = workload.num_experts * args.split
    work = LayerWork(tokens=args.tokens_per_gpu, d_model=dims.d_model, d_ffn=dims.d_ffn, top_k=top_k, num_experts=E,
                     act_bytes=dims.act_bytes, param_bytes=dims.param_bytes, training=True)
    mapping = {
        "trace": source, "trace_experts": workload.num_experts,
        "trace_windows": {k: len(v) for k, v in layers_in.items()},
        "skipped_layers": skipped,
        "split": args.split, "experts": E, "top_k_from_trace": top_k, "tokens_per_gpu": args.tokens_per_gpu,
        "steps_per_row": args.steps_per_row, "d_model": dims.d_model, "d_ffn": dims.d_ffn,
        "act_bytes": dims.act_bytes, "param_bytes": dims.param_bytes,
        "state_bytes_per_param": dims.state_bytes_per_param,
        "expert_bytes_moved_per_slot": dims.expert_bytes, "pool_K": args.pool, "planner_time_limit_s": args.time_limit,
        "layouts": {str(g): dataclasses.asdict(choose_layout(E, g)) for g in args.gpus},
    }
    console.print(
        f"[bold]Trace:[/] {source}; {workload.num_experts} experts, layers simulated {', '.join(layers_in)}, "
        f"{min(mapping['trace_windows'].values())} windows of {args.steps_per_row} steps; top-k from the trace "
        f"{top_k:.2f} (median rows per step / {args.trace_tokens} tokens).\n"
        f"[bold]Mapping:[/] each recorded expert -> {args.split} fine-grained experts sharing its rows evenly = {E} "
        f"experts, per-window distribution kept; {args.tokens_per_gpu} tokens per GPU per step x top-{top_k:.2f}; "
        f"SwiGLU expert {dims.d_model} x {dims.d_ffn}, bf16, fp32 Adam state moved on switches "
        f"({dims.expert_bytes / 1e6:.0f} MB per slot), training.\n"
        + "".join(f"[bold]{g} GPUs:[/] {lay.slots_per_rank} slot(s) per rank ({lay.num_slots} slots), baseline "
                  f"{baseline(lay, E)[1]}" + (" (static e%R would leave ranks idle)" if E < g else "") + ".\n"
                  for g in args.gpus for lay in [choose_layout(E, g)])
        + "Profiles beyond 64 GPUs: the datasheet GPU and per-GPU links with more nodes (non-blocking fabric).")

    cases = []
    for gpus in args.gpus:
        t0 = time.perf_counter()
        scenarios = {layer: make_scenario(rows, gpus=gpus, split=args.split, steps_per_row=args.steps_per_row,
                                          rows_per_step=args.tokens_per_gpu * gpus * top_k)
                     for layer, rows in layers_in.items()}
        console.print(f"  {gpus} GPUs: per-window greedy re-plans {time.perf_counter() - t0:.1f} s", style="dim")
        for name in args.profiles:
            model = compile_cost_model(cluster_profile(builtin_profile(name), gpus), dims, gpus)
            layers = {}
            for layer, sc in scenarios.items():
                t0 = time.perf_counter()
                layers[layer] = simulate_layer(sc, model, pool_size=args.pool, time_limit_s=args.time_limit,
                                               work=work, node_size=model.profile.devices_per_node)
                console.print(f"  {gpus} GPUs {name} {layer}: {time.perf_counter() - t0:.1f} s", style="dim")
            cases.append({"gpus": gpus, "profile": name, "layers": layers, "mean": mean_row(layers)})

    what = "recorded" if source.startswith("recorded") else "FALLBACK Zipf (not the trained model's)"
    console.print(step_table(cases, f"Simulated MoE layer step time over the {what} trace, ms per step, switches "
                                    "included (pools: online (oracle))"))
    console.print(switch_table(cases, "Switching and solving (online; g/p/r = greedy pool / planner pool / "
                                      "runtime re-plan)"))
    console.print(exchange_table(cases, "The exchange as a plan dimension: whole-step model (costmodel/step.py), "
                                        "ms per MoE layer step without switches; each choice made once per layer "
                                        "on the mean load"))
    console.print("overlap: the best of 2..8 chunks over the flat exchange; 2-D: Tutel's hierarchical exchange "
                  "(within the node, then between ranks of the same local index), unchunked; chooser: the better "
                  "of the two if it saves 2% (moecc.overlap_chunks='auto'); chunked 2-D: both at once, which the "
                  "formulas price but the dispatch does not run. Step terms of the datasheet profiles are "
                  "assumptions (their notes say which).")
    console.print(f"online: before each window the member is chosen from the previous window's loads with a "
                  f"{args.steps_per_row}-step horizon (planner.choose_member, as moecc.runtime decides); oracle: the "
                  f"best member per window, knowing its loads. Pools are planned on the trace they are replayed on.")
    elapsed = time.perf_counter() - started
    console.print(f"total {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mapping": mapping, "cases": cases, "runtime_s": elapsed}, indent=1) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

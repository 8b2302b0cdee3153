"""The two baselines the planner is judged against, and its warm start.

- ``static_placement``: round-robin expert parallelism, expert e on rank ``e % R``: what every framework does.
- ``greedy_placement``: SmartMoE's online heuristic, LPT (longest processing time first) with FlexMoE-style
  replicas: spare slots go to the experts too large for one rank's fair share, then replicas are placed
  hottest first on the least loaded rank that has a free slot and does not hold that expert yet.
"""
from __future__ import annotations

import heapq

from .placement import Placement, SlotLayout, placement_from_ranks


class InfeasibleError(ValueError):
    """The inputs admit no placement (more experts than slots, experts that do not fit in memory, ...)."""


def check_feasible(layout: SlotLayout, num_experts: int) -> None:
    if num_experts > layout.num_slots:
        raise InfeasibleError(f"{num_experts} experts do not fit in {layout.ranks} ranks x {layout.slots_per_rank} "
                              f"slots = {layout.num_slots} slots; raise --slots-per-rank to at least "
                              f"{-(-num_experts // layout.ranks)} or use more ranks")


def static_placement(layout: SlotLayout, num_experts: int) -> Placement:
    """Expert e on rank ``e % R``, no replicas; slots beyond ``ceil(E / R)`` per rank stay empty."""
    check_feasible(layout, num_experts)
    ranks: list[list[tuple[int, float]]] = [[] for _ in range(layout.ranks)]
    for e in range(num_experts):
        ranks[e % layout.ranks].append((e, 1.0))
    return placement_from_ranks(layout, num_experts, ranks)


def replica_counts(layout: SlotLayout, load_E: list[float], *, fill: bool = False) -> list[int]:
    """One replica each; then spare slots go, hottest per replica first (at most one replica per rank), to experts
    whose tokens per replica exceed a rank's fair share (``sum(load) / R``): those cannot be balanced whole.
    ``fill`` hands out every spare slot instead, which balances tokens best but runs more, smaller GEMMs."""
    E = len(load_E)
    check_feasible(layout, E)
    fair = sum(load_E) / layout.ranks
    count = [1] * E
    heap = [(-load_E[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(layout.num_slots - E):
        while heap:
            _, e = heapq.heappop(heap)
            if count[e] < layout.ranks:
                break
        else:
            break
        if load_E[e] <= 0 or (not fill and load_E[e] / count[e] <= fair):
            break
        count[e] += 1
        heapq.heappush(heap, (-load_E[e] / count[e], e))
    return count


def greedy_placement(layout: SlotLayout, load_E: list[float], *, fill: bool = False) -> Placement:
    """LPT over replicas on one load vector: each replica takes an equal share of its expert's tokens."""
    return robust_greedy_placement(layout, [list(load_E)], fill=fill)


def robust_greedy_placement(layout: SlotLayout, load_WE: list[list[float]], *, fill: bool = False) -> Placement:
    """LPT for several scenarios at once: one placement that must serve every load vector in ``load_WE``.

    Replicas go to the experts with the highest peak (over scenarios) tokens per replica; a replica's load is a
    vector over scenarios, placed on the open rank where the worst scenario's rank load grows least. With one
    scenario this is SmartMoE's LPT exactly. The planner uses it as a warm start for groups of windows whose
    hot experts differ, where LPT on the mean load leaves the other windows' hot experts without replicas.
    """
    E, W = len(load_WE[0]), len(load_WE)
    peak_E = [max(row[e] for row in load_WE) for e in range(E)]
    count = replica_counts(layout, peak_E, fill=fill)
    items = sorted(((peak_E[e] / count[e], e) for e in range(E) for _ in range(count[e])), key=lambda t: (-t[0], t[1]))
    rank_load = [[0.0] * W for _ in range(layout.ranks)]
    ranks: list[dict[int, float]] = [{} for _ in range(layout.ranks)]
    for _, e in items:
        add = [row[e] / count[e] for row in load_WE]
        open_ranks = [r for r in range(layout.ranks) if len(ranks[r]) < layout.slots_per_rank and e not in ranks[r]]
        if not open_ranks:
            # Every rank with a free slot already holds e: fold this replica's share into a holder.
            open_ranks = [q for q in range(layout.ranks) if e in ranks[q]]
        r = min(open_ranks, key=lambda q: (max(x + d for x, d in zip(rank_load[q], add)), sum(rank_load[q]), q))
        ranks[r][e] = ranks[r].get(e, 0.0) + 1.0 / count[e]
        rank_load[r] = [x + d for x, d in zip(rank_load[r], add)]
    return placement_from_ranks(layout, E, [list(d.items()) for d in ranks])

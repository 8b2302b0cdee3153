"""The placement nouns: ``SlotLayout`` (ranks x slots), ``Placement`` (what each slot holds), ``Pool``.

Legend: E experts, R ranks, S slots in all (``R * slots_per_rank``), W scenarios (load windows).

A slot layout is fixed when a graph is compiled; a placement fills it. Slots are numbered rank-major: slot
``s`` lives on rank ``s // slots_per_rank``. A placement may hold an expert in several slots (replicas of a hot
expert, FlexMoE-style); each replica takes a fixed share of that expert's tokens, and an expert's shares sum to 1.
A slot may be empty (expert ``-1``, share 0) when there are more slots than the plan wants to fill.

Pure Python on purpose: the runtime turns a placement into a tensor, the planner and the reports never need torch.
"""
from __future__ import annotations

from dataclasses import dataclass

EMPTY = -1
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class SlotLayout:
    """``ranks`` x ``slots_per_rank`` expert slots; the shape every placement of a pool shares."""

    ranks: int
    slots_per_rank: int

    def __post_init__(self) -> None:
        if self.ranks < 1 or self.slots_per_rank < 1:
            raise ValueError(f"SlotLayout needs ranks >= 1 and slots_per_rank >= 1, "
                             f"got {self.ranks}, {self.slots_per_rank}")

    @property
    def num_slots(self) -> int:
        return self.ranks * self.slots_per_rank

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def slots_of(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """Which expert each slot holds (``expert_S``, ``-1`` for empty) and the share of that expert's tokens it takes.

    Invariants, checked on construction so that a placement read from anywhere is usable as is: every expert
    ``0..num_experts-1`` sits in at least one slot, the shares of an expert's replicas sum to 1, an empty slot has
    share 0, and an expert has at most one replica per rank (a second one on the same rank would only cost memory).
    """

    layout: SlotLayout
    num_experts: int
    expert_S: tuple[int, ...]
    share_S: tuple[float, ...]

    def __post_init__(self) -> None:
        S = self.layout.num_slots
        if len(self.expert_S) != S or len(self.share_S) != S:
            raise ValueError(f"placement has {len(self.expert_S)} experts / {len(self.share_S)} shares for {S} slots")
        total = [0.0] * self.num_experts
        for s, (e, share) in enumerate(zip(self.expert_S, self.share_S)):
            if e == EMPTY:
                if share != 0:
                    raise ValueError(f"empty slot {s} has share {share}")
                continue
            if not 0 <= e < self.num_experts:
                raise ValueError(f"slot {s} holds expert {e}, outside 0..{self.num_experts - 1}")
            if share < -SHARE_TOLERANCE:
                raise ValueError(f"slot {s} has negative share {share}")
            total[e] += share
        for e, t in enumerate(total):
            if abs(t - 1.0) > 1e-4:
                raise ValueError(f"expert {e}'s replica shares sum to {t:.6f}, expected 1 (is it placed at all?)")
        for r in range(self.layout.ranks):
            held = [self.expert_S[s] for s in self.layout.slots_of(r) if self.expert_S[s] != EMPTY]
            if len(held) != len(set(held)):
                raise ValueError(f"rank {r} holds an expert twice: {held}")

    def experts_per_rank(self) -> list[list[int]]:
        """The expert in each slot, one list per rank (``-1`` for empty): ``plans`` in ``moecc plan --json``."""
        return [[self.expert_S[s] for s in self.layout.slots_of(r)] for r in range(self.layout.ranks)]

    def tokens_per_slot(self, load_E: list[float]) -> list[float]:
        return [0.0 if e == EMPTY else share * load_E[e] for e, share in zip(self.expert_S, self.share_S)]

    def tokens_per_rank(self, load_E: list[float]) -> list[float]:
        n_S = self.tokens_per_slot(load_E)
        k = self.layout.slots_per_rank
        return [sum(n_S[r * k:(r + 1) * k]) for r in range(self.layout.ranks)]

    def held_per_rank(self) -> list[int]:
        """Slots per rank that hold an expert with a positive share (the ones whose GEMMs run)."""
        k = self.layout.slots_per_rank
        return [sum(1 for s in range(r * k, (r + 1) * k) if self.expert_S[s] != EMPTY and self.share_S[s] > 0)
                for r in range(self.layout.ranks)]

    def replicas(self) -> list[int]:
        count = [0] * self.num_experts
        for e in self.expert_S:
            if e != EMPTY:
                count[e] += 1
        return count


def placement_from_ranks(layout: SlotLayout, num_experts: int, ranks: list[list[tuple[int, float]]]) -> Placement:
    """Build a placement from ``(expert, share)`` pairs per rank; unfilled slots of a rank stay empty."""
    if len(ranks) != layout.ranks:
        raise ValueError(f"{len(ranks)} rank lists for {layout.ranks} ranks")
    expert_S: list[int] = []
    share_S: list[float] = []
    for r, items in enumerate(ranks):
        if len(items) > layout.slots_per_rank:
            raise ValueError(f"rank {r} gets {len(items)} experts for {layout.slots_per_rank} slots")
        pad = layout.slots_per_rank - len(items)
        expert_S += [e for e, _ in items] + [EMPTY] * pad
        share_S += [float(f) for _, f in items] + [0.0] * pad
    return Placement(layout=layout, num_experts=num_experts, expert_S=tuple(expert_S), share_S=tuple(share_S))


@dataclass(frozen=True, kw_only=True, slots=True)
class Pool:
    """K placements over one slot layout; the runtime switches between them by moving weights, never recompiling."""

    layout: SlotLayout
    placements: tuple[Placement, ...]

    def __post_init__(self) -> None:
        if not self.placements:
            raise ValueError("a pool needs at least one placement")
        for i, p in enumerate(self.placements):
            if p.layout != self.layout:
                raise ValueError(f"placement {i} has layout {p.layout}, the pool's is {self.layout}")
            if p.num_experts != self.placements[0].num_experts:
                raise ValueError(f"placement {i} has {p.num_experts} experts, "
                                 f"placement 0 has {self.placements[0].num_experts}")

    @property
    def num_experts(self) -> int:
        return self.placements[0].num_experts

    def __len__(self) -> int:
        return len(self.placements)

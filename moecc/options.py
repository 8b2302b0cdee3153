"""moecc's compile options: one frozen object, parsed once from ``torch.compile(..., options={...})``.

Keys under the ``moecc.`` prefix are moecc's; every other key is an Inductor config patch and passes through. A
misspelt ``moecc.*`` key is refused with the list of valid ones: a silently ignored option trains the wrong model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

PREFIX = "moecc."


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What one ``torch.compile(model, backend="moecc", options=...)`` asks of moecc.

    Every field is the option ``moecc.<field>``.
    """

    rewrite: bool = True
    """False: compile with Inductor only, no MoE pass."""
    fused_ffn: bool = True
    """False: keep the lifted expert template (grouped GEMMs) instead of one fused ``moecc::expert_ffn``."""
    ep: bool = True
    """False: keep every expert local even when a process group with several ranks exists."""
    group: Any = None
    """The process group to shard experts over (default: the ``ep`` dim of ``moecc.distribute``'s mesh, else the
    world)."""
    slots_per_rank: int | None = None
    """Slots per rank under expert parallelism (default: ``ceil(E / ranks)``)."""
    placement: Any = None
    """A ``moecc.costmodel.placement.Placement``, or a list per rank of the expert in each slot (-1: empty)."""
    capacity_factor: float | None = None
    """Drop the routed rows past ``ceil(f * rows / E)`` per expert on each rank (GShard); None: dropless."""
    overlap_chunks: Any = "auto"
    """Expert parallelism: split each layer's routed rows into this many chunks, so that one chunk's experts run
    while the next one's rows are in flight (forward and backward); 1: no overlap; "auto": the cost model picks
    per layer."""
    node_size: int | None = None
    """Expert parallelism: ranks per node for the 2-D hierarchical all-to-all (within a node, then across nodes);
    default ``LOCAL_WORLD_SIZE`` under torchrun when it splits the group into several nodes, else flat."""
    all_to_all: str = "auto"
    """Expert parallelism: "flat" (one all-to-all over the group), "2d" (Tutel's 2DH: within each node of
    ``moecc.node_size`` ranks, then across nodes) or "auto" (the cost model picks per layer)."""
    pool: Any = None
    """A ``moecc.costmodel.placement.Pool`` the runtime switches within (default: current vs a greedy re-plan)."""
    inductor: dict = field(default_factory=dict)
    """The options without the ``moecc.`` prefix, for Inductor."""

    @classmethod
    def parse(cls, options: dict | None) -> Options:
        """Split ``options`` into moecc's and Inductor's; refuse an unknown ``moecc.*`` key or a bad value."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "inductor"]
        ours = {k[len(PREFIX):]: options.pop(k) for k in list(options) if k.startswith(PREFIX)}
        unknown = sorted(set(ours) - set(valid))
        if unknown:
            raise ValueError(f"moecc: unknown option {', '.join(PREFIX + k for k in unknown)}; "
                             f"valid: {', '.join(PREFIX + k for k in valid)}")
        for key in ("rewrite", "fused_ffn", "ep"):
            if key in ours and not isinstance(ours[key], bool):
                raise ValueError(f"moecc: option {PREFIX}{key} must be True or False, got {ours[key]!r}")
        spr = ours.get("slots_per_rank")
        if spr is not None and (isinstance(spr, bool) or not isinstance(spr, int) or spr < 1):
            raise ValueError(f"moecc: option {PREFIX}slots_per_rank must be a positive int, got {spr!r}")
        chunks = ours.get("overlap_chunks")
        if chunks is not None and chunks != "auto" and (isinstance(chunks, bool) or not isinstance(chunks, int)
                                                        or chunks < 1):
            raise ValueError(f"moecc: option {PREFIX}overlap_chunks must be a positive int or 'auto', got {chunks!r}")
        if ours.get("all_to_all", "flat") not in ("flat", "2d", "auto"):
            raise ValueError(f"moecc: option {PREFIX}all_to_all must be 'flat', '2d' or 'auto', "
                             f"got {ours['all_to_all']!r}")
        nodes = ours.get("node_size")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"moecc: option {PREFIX}node_size must be a positive int, got {nodes!r}")
        factor = ours.get("capacity_factor")
        if factor is not None:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or math.isnan(factor) or factor <= 0:
                raise ValueError(f"moecc: option {PREFIX}capacity_factor must be a number > 0 (inf: dropless), "
                                 f"got {factor!r}")
            ours["capacity_factor"] = float(factor)
        return cls(**ours, inductor=options)

    @classmethod
    def documented(cls) -> dict[str, str]:
        """``moecc.<key>`` -> what it does (the README's table is checked against this)."""
        import inspect

        source = inspect.getsource(cls)
        docs = {}
        for f in dataclasses.fields(cls):
            if f.name == "inductor":
                continue
            after = source.split(f"    {f.name}:", 1)[1]
            docs[PREFIX + f.name] = after.split('"""')[1].strip()
        return docs

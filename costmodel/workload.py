"""Workloads: tokens per expert per step, per MoE layer; recorded in a trace or estimated before training.

Trace file (JSON)::

    {"num_experts": E,
     "layers": {"<layer name>": [[c_0, ..., c_{E-1}],     # step 0: routed rows (tokens x top-k) per expert
                                 [c_0, ..., c_{E-1}],     # step 1
                                 ...]}}

Counts are non-negative numbers (integers in a recorded trace; an estimate may hold fractions). Every row has E
entries and every layer at least one row. The same format is what ``moecc`` writes from its load counters.

Before training there is no trace; SmartMoE estimates the gate's output ahead of time. The priors here do that:
``uniform_trace`` and ``zipf_trace`` (a skewed, optionally drifting hot set: the skew seen in trained MoE
routers), and ``router_trace`` (a router's actual top-k choices on sample data; needs torch).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the offending field."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """``layers[name][step][expert]``: routed rows per expert per step."""

    num_experts: int
    layers: dict[str, tuple[tuple[float, ...], ...]]

    def layer(self, name: str | None = None) -> tuple[tuple[float, ...], ...]:
        """One layer's rows; the first layer when ``name`` is None."""
        if name is None:
            return next(iter(self.layers.values()))
        if name not in self.layers:
            raise KeyError(f"layer {name!r} not in trace; layers: {', '.join(map(repr, self.layers))}")
        return self.layers[name]


def workload_from_dict(data: object) -> Workload:
    """Validate a parsed trace; raises ``TraceError`` naming the first bad field."""
    if not isinstance(data, dict):
        raise TraceError("trace must be a JSON object with 'num_experts' and 'layers'")
    for key in ("num_experts", "layers"):
        if key not in data:
            raise TraceError(f"trace field '{key}' is missing")
    unknown = sorted(data.keys() - {"num_experts", "layers"})
    if unknown:
        raise TraceError(f"trace field '{unknown[0]}' is not a trace field")
    E = data["num_experts"]
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise TraceError(f"trace field 'num_experts' must be a positive integer, got {_short(E)}")
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise TraceError("trace field 'layers' must be a non-empty object of layer name -> rows")
    out: dict[str, tuple[tuple[float, ...], ...]] = {}
    for name, rows in layers.items():
        if not isinstance(rows, list) or not rows:
            raise TraceError(f"trace field 'layers.{name}' must be a non-empty list of rows")
        checked = []
        for t, row in enumerate(rows):
            where = f"layers.{name}[{t}]"
            if not isinstance(row, list) or len(row) != E:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise TraceError(f"trace field '{where}' must have num_experts={_short(E)} counts, got {got}")
            for e, c in enumerate(row):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not _finite(c) or c < 0:
                    raise TraceError(f"trace field '{where}[{e}]' must be a non-negative finite number, "
                                     f"got {_short(c)}")
            checked.append(tuple(row))
        out[name] = tuple(checked)
    return Workload(num_experts=E, layers=out)


def workload_to_dict(w: Workload) -> dict:
    return {"num_experts": w.num_experts, "layers": {k: [list(r) for r in v] for k, v in w.layers.items()}}


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer too large for a float
        return False


def _short(value: object, limit: int = 60) -> str:
    big = isinstance(value, int) and value.bit_length() > 100
    text = f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits" if big else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_trace(path: str | Path) -> Workload:
    """Read a trace file; every failure is a ``TraceError`` naming the file and the field."""
    from .profile import read_json

    data = read_json(path, "trace", TraceError)
    try:
        return workload_from_dict(data)
    except TraceError as err:
        raise TraceError(f"{path}: {err}") from None


def save_trace(w: Workload, path: str | Path) -> None:
    Path(path).write_text(json.dumps(workload_to_dict(w)) + "\n")


# -- priors: estimating the gate's output before training ---------------------------------------------------------

def zipf_probabilities(num_experts: int, s: float) -> list[float]:
    """Zipf(s) over expert ranks 1..E: the expert of rank i gets a share proportional to ``i ** -s``."""
    weights = [(i + 1) ** -s for i in range(num_experts)]
    total = sum(weights)
    return [w / total for w in weights]


def _sample_counts(probs: list[float], tokens: int, rng: random.Random) -> list[int]:
    """Multinomial counts, normal-approximated per expert and rescaled to ``tokens`` (pure Python, fast)."""
    raw = [max(0.0, p * tokens + rng.gauss(0.0, math.sqrt(p * (1 - p) * tokens))) for p in probs]
    scale = tokens / (sum(raw) or 1.0)
    return [round(c * scale) for c in raw]


def uniform_trace(num_experts: int, tokens_per_step: int, steps: int = 1, *, layer: str = "layer0",
                  seed: int = 0) -> Workload:
    """Balanced routing, with the sampling noise a real router has."""
    rng = random.Random(seed)
    probs = [1.0 / num_experts] * num_experts
    rows = tuple(tuple(_sample_counts(probs, tokens_per_step, rng)) for _ in range(steps))
    return Workload(num_experts=num_experts, layers={layer: rows})


def zipf_trace(num_experts: int, tokens_per_step: int, steps: int, *, s_start: float = 1.0, s_end: float | None = None,
               drift_period: int = 0, drift_stride: int = 1, layer: str = "layer0", seed: int = 0) -> Workload:
    """A skewed trace: Zipf exponent moving from ``s_start`` to ``s_end``; every ``drift_period`` steps the hot set
    moves ``drift_stride`` places along a fixed random order of experts (0 = no drift).

    Drift is what makes a pool worth having: one placement fits one hot set.
    """
    rng = random.Random(seed)
    order = list(range(num_experts))
    rng.shuffle(order)
    s_end = s_start if s_end is None else s_end
    rows = []
    for t in range(steps):
        s = s_start + (s_end - s_start) * (t / max(1, steps - 1))
        probs_by_rank = zipf_probabilities(num_experts, s)
        shift = (t // drift_period) * drift_stride if drift_period else 0
        probs = [0.0] * num_experts
        for i, p in enumerate(probs_by_rank):
            probs[order[(i + shift) % num_experts]] = p
        rows.append(tuple(_sample_counts(probs, tokens_per_step, rng)))
    return Workload(num_experts=num_experts, layers={layer: tuple(rows)})


def router_trace(router, batches, *, top_k: int, layer: str = "layer0") -> Workload:
    """The router's own load on sample data: one row per batch, ``router(x) -> logits [T, E]``, top-k counted."""
    import torch

    rows = []
    num_experts = None
    with torch.no_grad():
        for x in batches:
            logits_TE = router(x)
            num_experts = logits_TE.shape[-1]
            idx_TK = torch.topk(logits_TE.reshape(-1, num_experts), top_k, dim=-1).indices
            rows.append(tuple(torch.bincount(idx_TK.reshape(-1), minlength=num_experts).tolist()))
    if num_experts is None:
        raise ValueError("router_trace needs at least one batch")
    return Workload(num_experts=num_experts, layers={layer: tuple(rows)})


# -- scenarios: what the planner optimises over --------------------------------------------------------------------

def window_loads(rows: tuple[tuple[float, ...], ...] | list, window: int) -> list[list[float]]:
    """Mean load per expert over consecutive windows of ``window`` steps (the last one may be shorter).

    The runtime re-evaluates its pool once per window, so a window's mean load is one planning scenario.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        out.append([sum(col) / len(chunk) for col in zip(*chunk)])
    return out

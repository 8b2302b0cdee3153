"""Hardware profiles: what the cost model knows about a machine, as a versioned JSON file.

File format (``"format": "moecc-profile"``, ``"version": 2``); every field is required, unknown fields are refused
so that a typo cannot silently fall back to a default::

    {
      "format": "moecc-profile", "version": 2,
      "name": "h100-sxm-8x", "source": "datasheet | measured by moecc calibrate ...", "notes": "free text",
      "nodes": 8, "devices_per_node": 8,
      "device_memory_bytes": 80e9,           # what one rank may spend on expert slots (weights + grads + optimizer)
      "memory_bandwidth_Bps": 3.35e12,       # effective bandwidth of elementwise work (the SwiGLU activation)
      "gemm": {"dtype": "bfloat16",
               "call_overhead_s": 4e-6,      # fixed cost per GEMM call (launch, Python, tiling set-up)
               "table": [[rows, flops_per_s], ...]},   # achieved throughput by GEMM rows, sorted by rows
      "all_to_all": {"intra_node": {"bandwidth_Bps": ..., "latency_s": ...},
                     "inter_node": {"bandwidth_Bps": ..., "latency_s": ...}},
      "param_move": {"bandwidth_Bps": ..., "latency_s": ...},  # moving expert weights + optimizer state
      "step": {                              # the rest of an expert-parallel step (costmodel/step.py)
        "op_overhead_s": ...,                # host cost of one op of the layer's graph (dispatch, launch, autograd)
        "permute_bandwidth_Bps": ...,        # gathering / scattering rows by index (read + write counted)
        "overlap_efficiency": ...,           # share of an exchange that hides under compute (0 none, 1 all)
        "intra_node_per_peer_s": ..., "inter_node_per_peer_s": ...,  # all-to-all latency per peer, per level
        "all_to_all_measured": [{"ranks": R, "bandwidth_Bps": ..., "latency_s": ...}, ...]  # one node, measured
      }
    }

Version 1 files (no ``step``) still load: their step terms are the old model's assumptions (no per-op cost, no
overlap, no per-peer latency, rows permuted at ``memory_bandwidth_Bps``), and saving writes version 2.

The GEMM table is the calibrated part: achieved throughput differs by orders of magnitude between a GEMM of a few
rows and a large one, and MoE experts live at the small end under skew. It is keyed by the row count m of an
``[m, k] @ [k, n]`` GEMM (tokens on a slot) rather than by flops: an expert GEMM has m << k, n, its weights are
streamed once whatever m is, so throughput grows with m (about ``2 m * bandwidth / bytes per element`` while
weight-read bound) up to the compute peak, nearly independent of k and n; measured on this CPU, two shapes of
equal flops differ 3x, two shapes of equal rows by 10-25%. Between points the table is interpolated linearly in
log(rows)-log(throughput); outside it the nearest point holds. Bandwidths are per rank and per
direction. Hand-tuning means editing these numbers; ``calibrate.fit_step_times`` scales them from measured steps.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

FORMAT = "moecc-profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the offending field."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    bandwidth_Bps: float
    latency_s: float

    def time_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_Bps


@dataclass(frozen=True, kw_only=True, slots=True)
class GemmTable:
    """Achieved GEMM throughput by row count: ``points`` are ``(rows, flops_per_s)`` sorted by rows."""

    dtype: str
    call_overhead_s: float
    points: tuple[tuple[float, float], ...]

    def flops_per_s(self, rows: float) -> float:
        """Throughput of a GEMM with ``rows`` rows, log-log interpolated, clamped to the end points.

        Capped so that a GEMM with more rows never takes less time than one with fewer (``rows / flops_per_s``
        non-decreasing): a table whose throughput grows faster than its row count between two points (the
        shipped ``h100-sxm-8x`` one does from 1 to 16 rows) would otherwise predict that adding tokens to a slot
        makes it faster, and the planner's linearisation would get a negative per-token cost.
        """
        xs = [p[0] for p in self.points]
        if rows <= xs[0]:
            return self.points[0][1]
        i = bisect.bisect_right(xs, rows)
        if rows >= xs[-1]:
            raw = self.points[-1][1]
        else:
            (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
            t = (math.log(rows) - math.log(x0)) / (math.log(x1) - math.log(x0))
            raw = math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
        # On each log-log segment rows / throughput is monotone, so its running maximum is reached at a point.
        slowest = max(x / y for x, y in self.points[:i])
        return min(raw, rows / slowest)

    def time_s(self, m: float, k: float, n: float) -> float:
        """Seconds for one ``[m, k] @ [k, n]`` GEMM; zero rows cost nothing (the grouped kernel skips them)."""
        if m <= 0:
            return 0.0
        return self.call_overhead_s + 2.0 * m * k * n / self.flops_per_s(m)


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredExchange:
    """An all-to-all measured on one node at a group size: latency (per call, every peer included) and bandwidth
    (bytes a rank receives per second). Where ranks share a host's cores, this is the only honest price."""

    ranks: int
    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class StepTerms:
    """What the whole-step model (``costmodel/step.py``) needs beyond the expert GEMMs and the link levels.

    ``op_overhead_s``: host cost of one op of a layer's graph (dispatcher, kernel launch, autograd node).
    ``permute_bandwidth_Bps``: bytes per second of gathering or scattering rows by index, a row read and a row
    written both counted. ``overlap_efficiency``: the share of an exchange that runs under compute when the two are
    issued together (1: separate engines, as a GPU's copy engines or NICs; 0: the exchange needs the cores the
    compute runs on). ``*_per_peer_s``: the all-to-all's latency per peer at each level (one message per peer:
    what a 2-D exchange saves). ``all_to_all_measured``: exchanges measured on one node by group size, used instead
    of the intra-node level for a group on one node (a host whose ranks share cores).
    """

    op_overhead_s: float = 0.0
    permute_bandwidth_Bps: float | None = None  # None: the profile's memory_bandwidth_Bps
    overlap_efficiency: float = 0.0
    intra_node_per_peer_s: float = 0.0
    inter_node_per_peer_s: float = 0.0
    all_to_all_measured: tuple[MeasuredExchange, ...] = ()

    def measured_link(self, ranks: int) -> Link | None:
        """The measured exchange of ``ranks`` ranks on one node: interpolated linearly in ranks between measured
        sizes, the nearest one beyond them (latency scaled by peers, bandwidth kept); None if none was measured."""
        pts = sorted(self.all_to_all_measured, key=lambda m: m.ranks)
        if not pts or ranks < 2:
            return None
        for lo, hi in zip(pts, pts[1:]):
            if lo.ranks <= ranks <= hi.ranks:
                t = (ranks - lo.ranks) / (hi.ranks - lo.ranks)
                return Link(bandwidth_Bps=lo.bandwidth_Bps + t * (hi.bandwidth_Bps - lo.bandwidth_Bps),
                            latency_s=lo.latency_s + t * (hi.latency_s - lo.latency_s))
        end = pts[0] if ranks < pts[0].ranks else pts[-1]
        return Link(bandwidth_Bps=end.bandwidth_Bps, latency_s=end.latency_s * (ranks - 1) / (end.ranks - 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    name: str
    source: str
    notes: str
    nodes: int
    devices_per_node: int
    device_memory_bytes: float
    memory_bandwidth_Bps: float
    gemm: GemmTable
    intra_node: Link
    inter_node: Link
    param_move: Link
    step: StepTerms | None = None  # None (a version-1 file): the old model's assumptions, see ``step_terms``

    @property
    def max_ranks(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def step_terms(self) -> StepTerms:
        """The step terms with every default resolved (rows permuted at the memory bandwidth when unset)."""
        step = self.step or StepTerms()
        if step.permute_bandwidth_Bps is None:
            step = dataclasses.replace(step, permute_bandwidth_Bps=self.memory_bandwidth_Bps)
        return step


# -- reading and writing ------------------------------------------------------------------------------------------

_TOP = {"format", "version", "name", "source", "notes", "nodes", "devices_per_node", "device_memory_bytes",
        "memory_bandwidth_Bps", "gemm", "all_to_all", "param_move"}
_LINK = {"bandwidth_Bps", "latency_s"}
_STEP = {"op_overhead_s", "permute_bandwidth_Bps", "overlap_efficiency", "intra_node_per_peer_s",
         "inter_node_per_peer_s", "all_to_all_measured"}


def _fields(obj: object, where: str, expected: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise ProfileError(f"profile field '{where or '<top>'}' must be an object, got {type(obj).__name__}")
    missing = sorted(expected - obj.keys())
    if missing:
        raise ProfileError(f"profile field '{_join(where, missing[0])}' is missing (every field is required: "
                           f"docs/costmodel.md lists them)")
    unknown = sorted(obj.keys() - expected)
    if unknown:
        raise ProfileError(f"profile field '{_join(where, unknown[0])}' is not a profile field (typo?)")
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _number(obj: dict, key: str, where: str, *, positive: bool = True, integer: bool = False) -> float:
    value = obj[key]
    name = _join(where, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ProfileError(f"profile field '{name}' must be a finite number, got {_short(value)}")
    if integer and value != int(value):
        raise ProfileError(f"profile field '{name}' must be an integer, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"profile field '{name}' must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return int(value) if integer else float(value)


def _finite(value: int | float) -> bool:
    """``math.isfinite`` that also answers for a JSON integer too large for a float (instead of OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: object, limit: int = 60) -> str:
    """``repr`` for messages, cut short (a 400-digit integer or a whole sub-document is no help on one line)."""
    big = isinstance(value, int) and value.bit_length() > 100
    text = f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits" if big else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _string(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj[key], str):
        raise ProfileError(f"profile field '{_join(where, key)}' must be a string, got {_short(obj[key])}")
    return obj[key]


def _link(obj: object, where: str) -> Link:
    d = _fields(obj, where, _LINK)
    return Link(bandwidth_Bps=_number(d, "bandwidth_Bps", where),
                latency_s=_number(d, "latency_s", where, positive=False))


def _gemm(obj: object) -> GemmTable:
    d = _fields(obj, "gemm", {"dtype", "call_overhead_s", "table"})
    table = d["table"]
    if not isinstance(table, list) or not table:
        raise ProfileError("profile field 'gemm.table' must be a non-empty list of [rows, flops_per_s]")
    points = []
    for i, row in enumerate(table):
        where = f"gemm.table[{i}]"
        if not isinstance(row, list) or len(row) != 2:
            raise ProfileError(f"profile field '{where}' must be [rows, flops_per_s], got {_short(row)}")
        pair = dict(zip(("rows", "flops_per_s"), row))
        points.append((_number(pair, "rows", where), _number(pair, "flops_per_s", where)))
        if i and points[i][0] <= points[i - 1][0]:
            raise ProfileError(f"profile field '{where}' must have more rows than the row before (sorted table)")
    return GemmTable(dtype=_string(d, "dtype", "gemm"),
                     call_overhead_s=_number(d, "call_overhead_s", "gemm", positive=False), points=tuple(points))


def _step(obj: object) -> StepTerms:
    d = _fields(obj, "step", _STEP)
    efficiency = _number(d, "overlap_efficiency", "step", positive=False)
    if efficiency > 1:
        raise ProfileError(f"profile field 'step.overlap_efficiency' must be between 0 and 1, got {efficiency!r}")
    measured = d["all_to_all_measured"]
    if not isinstance(measured, list):
        raise ProfileError("profile field 'step.all_to_all_measured' must be a list of "
                           '{"ranks", "bandwidth_Bps", "latency_s"} (may be empty)')
    points = []
    for i, row in enumerate(measured):
        where = f"step.all_to_all_measured[{i}]"
        m = _fields(row, where, {"ranks", "bandwidth_Bps", "latency_s"})
        ranks = _number(m, "ranks", where, integer=True)
        if ranks < 2 or any(p.ranks == ranks for p in points):
            raise ProfileError(f"profile field '{where}.ranks' must be >= 2 and appear once, got {ranks}")
        points.append(MeasuredExchange(ranks=ranks, bandwidth_Bps=_number(m, "bandwidth_Bps", where),
                                       latency_s=_number(m, "latency_s", where, positive=False)))
    return StepTerms(op_overhead_s=_number(d, "op_overhead_s", "step", positive=False),
                     permute_bandwidth_Bps=_number(d, "permute_bandwidth_Bps", "step"),
                     overlap_efficiency=efficiency,
                     intra_node_per_peer_s=_number(d, "intra_node_per_peer_s", "step", positive=False),
                     inter_node_per_peer_s=_number(d, "inter_node_per_peer_s", "step", positive=False),
                     all_to_all_measured=tuple(sorted(points, key=lambda p: p.ranks)))


def profile_from_dict(data: object) -> Profile:
    """Validate a parsed profile; raises ``ProfileError`` naming the first bad field."""
    if isinstance(data, dict) and "version" in data and data["version"] == 1 and not isinstance(data["version"], bool):
        d = _fields(data, "", _TOP)  # version 1: no step section
    else:
        d = _fields(data, "", _TOP | {"step"})
    if d["format"] != FORMAT:
        raise ProfileError(f"profile field 'format' must be {FORMAT!r}, got {_short(d['format'])}")
    if isinstance(d["version"], bool) or d["version"] not in READABLE_VERSIONS:
        raise ProfileError(f"profile field 'version' is {_short(d['version'])}; this moecc reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    a2a = _fields(d["all_to_all"], "all_to_all", {"intra_node", "inter_node"})
    return Profile(
        name=_string(d, "name", ""), source=_string(d, "source", ""), notes=_string(d, "notes", ""),
        nodes=_number(d, "nodes", "", integer=True), devices_per_node=_number(d, "devices_per_node", "", integer=True),
        device_memory_bytes=_number(d, "device_memory_bytes", ""),
        memory_bandwidth_Bps=_number(d, "memory_bandwidth_Bps", ""),
        gemm=_gemm(d["gemm"]),
        intra_node=_link(a2a["intra_node"], "all_to_all.intra_node"),
        inter_node=_link(a2a["inter_node"], "all_to_all.inter_node"),
        param_move=_link(d["param_move"], "param_move"),
        step=_step(d["step"]) if "step" in d else None,
    )


def profile_to_dict(p: Profile) -> dict:
    link = lambda x: {"bandwidth_Bps": x.bandwidth_Bps, "latency_s": x.latency_s}  # noqa: E731
    return {
        "format": FORMAT, "version": VERSION, "name": p.name, "source": p.source, "notes": p.notes,
        "nodes": p.nodes, "devices_per_node": p.devices_per_node,
        "device_memory_bytes": p.device_memory_bytes, "memory_bandwidth_Bps": p.memory_bandwidth_Bps,
        "gemm": {"dtype": p.gemm.dtype, "call_overhead_s": p.gemm.call_overhead_s,
                 "table": [[f, t] for f, t in p.gemm.points]},
        "all_to_all": {"intra_node": link(p.intra_node), "inter_node": link(p.inter_node)},
        "param_move": link(p.param_move),
        "step": step_to_dict(p.step_terms),
    }


def step_to_dict(st: StepTerms) -> dict:
    return {"op_overhead_s": st.op_overhead_s, "permute_bandwidth_Bps": st.permute_bandwidth_Bps,
            "overlap_efficiency": st.overlap_efficiency, "intra_node_per_peer_s": st.intra_node_per_peer_s,
            "inter_node_per_peer_s": st.inter_node_per_peer_s,
            "all_to_all_measured": [{"ranks": m.ranks, "bandwidth_Bps": m.bandwidth_Bps, "latency_s": m.latency_s}
                                    for m in st.all_to_all_measured]}


def read_json(path: str | Path, what: str, error: type[ValueError]) -> object:
    """Parse a JSON file, raising ``error`` (one line, naming ``path``) for every way that can fail."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 JSON text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{what} {path} is not a {what}: JSON nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise error(f"{what} {path} is not valid JSON: {err}") from None


def load_profile(path: str | Path) -> Profile:
    """Read a profile file, or a shipped profile by name (``cpu``, ``h100-sxm-8x``, ``a100-sxm-8x``).

    Every failure is a ``ProfileError`` naming the file and the field (never an ``OSError`` or ``KeyError``).
    """
    if not Path(path).exists():
        if str(path) in builtin_profiles():
            return builtin_profile(str(path))
        raise ProfileError(f"profile {str(path)!r} is neither a file nor a shipped profile "
                           f"(shipped: {', '.join(builtin_profiles())})")
    data = read_json(path, "profile", ProfileError)
    try:
        return profile_from_dict(data)
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None


def save_profile(p: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile_to_dict(p), indent=2) + "\n")


def builtin_profiles() -> list[str]:
    folder = resources.files("moecc.costmodel") / "profiles"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))


def builtin_profile(name: str) -> Profile:
    if name not in builtin_profiles():
        raise ProfileError(f"no shipped profile {name!r} (shipped: {', '.join(builtin_profiles())})")
    text = (resources.files("moecc.costmodel") / "profiles" / f"{name}.json").read_text()
    return profile_from_dict(json.loads(text))

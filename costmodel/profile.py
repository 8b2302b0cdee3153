"""Hardware profiles: what the cost model knows about a machine, as a versioned JSON file.

File format (``"format": "moecc-profile"``, ``"version": 1``); every field is required, unknown fields are refused
so that a typo cannot silently fall back to a default::

    {
      "format": "moecc-profile", "version": 1,
      "name": "h100-sxm-8x", "source": "datasheet | measured by moecc calibrate ...", "notes": "free text",
      "nodes": 8, "devices_per_node": 8,
      "device_memory_bytes": 80e9,           # what one rank may spend on expert slots (weights + grads + optimizer)
      "memory_bandwidth_Bps": 3.35e12,       # effective bandwidth of elementwise work (the SwiGLU activation)
      "gemm": {"dtype": "bfloat16",
               "call_overhead_s": 4e-6,      # fixed cost per GEMM call (launch, Python, tiling set-up)
               "table": [[rows, flops_per_s], ...]},   # achieved throughput by GEMM rows, sorted by rows
      "all_to_all": {"intra_node": {"bandwidth_Bps": ..., "latency_s": ...},
                     "inter_node": {"bandwidth_Bps": ..., "latency_s": ...}},
      "param_move": {"bandwidth_Bps": ..., "latency_s": ...}   # moving expert weights + optimizer state
    }

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
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

FORMAT = "moecc-profile"
VERSION = 1


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

    @property
    def max_ranks(self) -> int:
        return self.nodes * self.devices_per_node


# -- reading and writing ------------------------------------------------------------------------------------------

_TOP = {"format", "version", "name", "source", "notes", "nodes", "devices_per_node", "device_memory_bytes",
        "memory_bandwidth_Bps", "gemm", "all_to_all", "param_move"}
_LINK = {"bandwidth_Bps", "latency_s"}


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


def profile_from_dict(data: object) -> Profile:
    """Validate a parsed profile; raises ``ProfileError`` naming the first bad field."""
    d = _fields(data, "", _TOP)
    if d["format"] != FORMAT:
        raise ProfileError(f"profile field 'format' must be {FORMAT!r}, got {_short(d['format'])}")
    if isinstance(d["version"], bool) or d["version"] != VERSION:
        raise ProfileError(f"profile field 'version' is {_short(d['version'])}; this moecc reads version {VERSION}")
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
    }


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

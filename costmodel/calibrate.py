"""``moecc calibrate``: measure this machine and fit a profile; and fitting a profile to measured step times.

What is measured (torch, imported only here): GEMMs at expert-like shapes over a range of row counts, the fixed
cost of one GEMM call, the effective bandwidth of the expert's elementwise work (its SwiGLU activation), and,
when started under ``torchrun`` with several processes, all-to-all latency and bandwidth (gloo on CPU, NCCL on
GPU). Fields it cannot measure (the other link level, device memory on a GPU-less run) come from a base profile
and are said so in ``source``.

The fit: each GEMM's throughput is ``flops / (t - overhead)``; the table keeps, per measured row count, the
geometric mean throughput over the measured shapes. The fit error is the mean absolute relative error of the
fitted table's predicted GEMM times against every measurement, printed and recorded in ``notes``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from dataclasses import dataclass

from .formulas import ExpertDims, compile_cost_model
from .profile import GemmTable, Link, MeasuredExchange, Profile

DEFAULT_SHAPES = ((256, 512), (512, 256), (512, 1024), (1024, 512))
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True, kw_only=True, slots=True)
class GemmSample:
    m: int
    k: int
    n: int
    seconds: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


def timeit(fn, *, min_time_s: float = 0.1, repeats: int = 5, clock=None) -> float:
    """Seconds per call, the median of ``repeats`` batches; calls are batched until a batch takes
    ``min_time_s / repeats`` so timer resolution does not matter.

    ``clock`` defaults to ``cpu_clock()``: on a CPU run with one torch thread, the calling thread's CPU time,
    which other work on a shared machine does not inflate (wall time there measured the neighbours' load: the
    same 64-row kernel took 5.6 ms and 10.2 ms a minute apart); wall time otherwise.
    """
    clock = clock or cpu_clock()
    fn()
    calls = 1
    while True:
        t0 = clock()
        for _ in range(calls):
            fn()
        if clock() - t0 >= min_time_s / repeats or calls >= 1 << 16:
            break
        calls *= 2
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        times.append((clock() - t0) / calls)
    return statistics.median(times)


def cpu_clock():
    """The thread's CPU-time clock when torch computes on this thread alone (CPU, one thread), else wall time."""
    import torch

    if torch.get_num_threads() == 1 and not torch.cuda.is_initialized():
        return time.thread_time
    return time.perf_counter


def measure_gemms(shapes=DEFAULT_SHAPES, rows=DEFAULT_ROWS, *, dtype: str = "float32", device: str = "cpu",
                  progress=None, weight_bytes: int = 128 << 20) -> tuple[float, list[GemmSample]]:
    """(seconds of one minimal GEMM call, one sample per shape x row count).

    Each call uses the next of several weight copies totalling ``weight_bytes`` (more than a cache holds): an
    expert layer reads every expert's weights once per step, so a weight that stays cached between calls would
    flatter the small-row GEMMs that skewed loads produce.
    """
    import torch

    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(m, k, n, rotate=True):
        a = torch.randn(m, k, dtype=dt, device=device)
        copies = max(1, min(64, weight_bytes // (k * n * a.element_size()))) if rotate else 1
        ws = [torch.full((n, k), 0.01, dtype=dt, device=device) for _ in range(copies)]
        out = torch.empty(m, n, dtype=dt, device=device)
        turn = iter(range(1 << 62))

        def run():
            torch.mm(a, ws[next(turn) % copies].t(), out=out)  # nn.Linear's layout, as the expert kernel uses
            sync()
        return timeit(run)

    overhead = timed(1, 8, 8, rotate=False)
    samples = []
    for k, n in shapes:
        for m in rows:
            samples.append(GemmSample(m=m, k=k, n=n, seconds=timed(m, k, n)))
            if progress is not None:
                progress()
    return overhead, samples


def measure_elementwise_bandwidth(*, device: str = "cpu", dtype: str = "float32", rows: int = 4096,
                                  width: int = 1024) -> float:
    """Effective bytes per second of the expert's elementwise work, measured on that work: ``silu(g) * u``.

    The formulas charge the activation ``5 n F b`` bytes (silu reads g, writes s; the product reads s and u and
    writes h); dividing by its measured time gives the bandwidth that makes that charge right. On a GPU this is
    close to the memory bandwidth; on a CPU the exp in silu makes it about half of a plain copy's.
    """
    import torch
    import torch.nn.functional as nnf

    dt = getattr(torch, dtype)
    g = torch.randn(rows, width, dtype=dt, device=device)
    u = torch.randn(rows, width, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return 5 * g.numel() * g.element_size() / timeit(lambda: (nnf.silu(g) * u, sync()))


def measure_all_to_all(sizes=(1 << 8, 1 << 14, 1 << 18, 1 << 20, 1 << 22), *, device: str = "cpu") -> Link | None:
    """Latency and bandwidth of ``all_to_all_single`` when run under torchrun; None in a single process.

    Fitted as ``t = latency + bytes_received / bandwidth`` by least squares over the message sizes (bytes a rank
    sends in all, its own share included; the fit is on the bytes received from the others). The smallest size is
    the counts exchange's: a call's latency with every peer in it. Each call follows a few GEMMs rather than a
    barrier (as in a step: caches cold, the transport's threads asleep), writes a fresh output and reads the next
    of several inputs; a call counts what the last rank to arrive saw (the others' time includes waiting for it),
    the median over calls, the quietest of three rounds (other work on a shared machine only adds time).
    """
    import torch
    import torch.distributed as dist

    if not _distributed():
        return None
    world = dist.get_world_size()
    a, w = torch.randn(512, 256, device=device), torch.randn(256, 512, device=device)

    def compute():  # about 2 ms of GEMMs here
        for _ in range(6):
            torch.mm(a, w)
    xs, ys = [], []
    for size in sizes:
        numel = max(world, size // 4 // world * world)
        sends = [torch.ones(numel, device=device) for _ in range(max(1, min(16, (64 << 20) // (4 * numel))))]
        rounds = []
        for _ in range(3):
            times = []
            for i in range(9):
                compute()  # as in a step: the exchange follows compute, not a barrier
                t0 = time.perf_counter()
                recv = torch.empty(numel, device=device)  # a fresh output, as the dispatch's exchange allocates
                dist.all_to_all_single(recv, sends[i % len(sends)])
                times.append(time.perf_counter() - t0)
            # per call, the rank that saw it shortest (the last to arrive): the exchange, not a peer's lateness
            last = torch.tensor(times)
            dist.all_reduce(last, op=dist.ReduceOp.MIN)
            rounds.append(statistics.median(last.tolist()[1:]))
        xs.append(numel * 4 * (world - 1) / world)
        ys.append(min(rounds))  # other work on the machine only adds time: the quietest round
    slope, intercept = _least_squares(xs, ys)
    return Link(bandwidth_Bps=1.0 / max(slope, 1e-15), latency_s=max(intercept, 0.0))


def _distributed() -> bool:
    """Under torchrun with several processes: the process group, initialised on first use."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def measure_overlap_efficiency(*, compute_s: float = 0.03, exchange_bytes: int = 1 << 20) -> float | None:
    """The share of an exchange that hides under compute when both are issued together (under torchrun).

    Times GEMMs alone (``t_c``), asynchronous all-to-alls alone (``t_x``), and the all-to-alls issued then the
    same GEMMs run before waiting (``t_both``): ``eta = (t_c + t_x - t_both) / min(t_c, t_x)``, clamped to [0, 1],
    the median of five tries. 1 is what separate engines give (a GPU's copy engines, a NIC's DMA); where the
    exchange's copies need the cores that compute (gloo on one host) it is far less.
    """
    import torch
    import torch.distributed as dist

    if not _distributed():
        return None
    world = dist.get_world_size()
    a, w = torch.randn(512, 512), torch.randn(512, 512)
    out = torch.empty(512, 512)
    numel = exchange_bytes // 4 // world * world
    send, recv = torch.ones(numel), torch.empty(numel)

    def gemms(count):
        for _ in range(count):
            torch.mm(a, w, out=out)

    def wall(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    one = wall(lambda: gemms(4)) / 4
    t_single = wall(lambda: dist.all_to_all_single(recv, send))
    sizes = torch.tensor([max(4, int(compute_s / max(one, 1e-6))), max(1, int(compute_s / max(t_single, 1e-6)))])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # every rank must issue as many exchanges, or they hang
    count, exchanges = int(sizes[0]), int(sizes[1])

    def exchange(then=None):
        works = [dist.all_to_all_single(recv, send, async_op=True) for _ in range(exchanges)]
        if then is not None:
            then()
        for work in works:
            work.wait()

    tries = []
    for _ in range(5):
        t_c = wall(lambda: gemms(count))
        t_x = wall(exchange)
        t_both = wall(lambda: exchange(lambda: gemms(count)))
        tries.append(max(0.0, min(1.0, (t_c + t_x - t_both) / min(t_c, t_x))))
    value = statistics.median(tries)
    agreed = torch.tensor([value])
    dist.all_reduce(agreed)  # every rank writes the same number
    return float(agreed.item()) / world


def measure_permute_bandwidth(*, device: str = "cpu", dtype: str = "float32", rows: int = 2048,
                              width: int = 256, copies_bytes: int = 64 << 20) -> float:
    """Bytes per second of moving rows by index, a row read and a row written both counted: the mean over a
    gather (``index_select`` into a new tensor, as the dispatch's gathers allocate) and a scatter-add into zeros
    (the combine and the gathers' backwards). Each call reads the next of several copies of the rows
    (``copies_bytes`` in all, more than a cache holds): in a step the rows arrive from memory, the experts' weights
    having just streamed through the caches (a cached copy measured 19.7 GB/s here, the step's gathers 12)."""
    import torch

    dt = getattr(torch, dtype)
    copies = [torch.randn(rows, width, dtype=dt, device=device)
              for _ in range(max(1, copies_bytes // (rows * width * torch.finfo(dt).bits // 8)))]
    idx = torch.randperm(rows, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    turn = iter(range(1 << 62))

    def gather():
        copies[next(turn) % len(copies)].index_select(0, idx)
        sync()

    def scatter():
        x = copies[next(turn) % len(copies)]
        torch.zeros_like(x).index_add_(0, idx, x)
        sync()
    t_gather, t_scatter = timeit(gather), timeit(scatter)
    moved = 2 * copies[0].numel() * copies[0].element_size()
    return 2 * moved / (t_gather + t_scatter)


def measure_op_overhead(*, device: str = "cpu") -> float:
    """Host seconds of one small op with autograd recording it (dispatcher, allocation, an autograd node): the
    fixed cost every op of a layer's graph pays whatever its size, the mean over a forward and its backward."""
    import torch

    x = torch.ones(8, device=device, requires_grad=True)

    def chain():
        y = x
        for _ in range(16):
            y = y * 1.0
        y.sum().backward()
    return timeit(chain) / 34  # 16 products, a sum, and as many backward nodes


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def fit_gemm_table(overhead_s: float, samples: list[GemmSample], *, dtype: str = "float32") -> GemmTable:
    """Per measured row count, the geometric-mean throughput over the measured shapes (profile.py says why rows)."""
    by_rows: dict[int, list[float]] = {}
    for s in samples:
        compute = max(s.seconds - overhead_s, 0.05 * s.seconds)
        by_rows.setdefault(s.m, []).append(s.flops / compute)
    points = [(float(m), float(f"{math.exp(statistics.fmean(math.log(t) for t in by_rows[m])):.4g}"))
              for m in sorted(by_rows)]
    return GemmTable(dtype=dtype, call_overhead_s=float(f"{overhead_s:.4g}"), points=tuple(points))


def gemm_fit_error(table: GemmTable, samples: list[GemmSample]) -> float:
    """Mean absolute relative error of the table's GEMM times against the measurements."""
    return statistics.fmean(abs(table.time_s(s.m, s.k, s.n) - s.seconds) / s.seconds for s in samples)


def calibrate(base: Profile, *, name: str, device: str = "cpu", dtype: str = "float32", shapes=DEFAULT_SHAPES,
              rows=DEFAULT_ROWS, threads: int | None = None, show_progress: bool = True,
              comm_only: bool = False) -> tuple[Profile, float | None]:
    """Measure this machine and return (the fitted profile, the GEMM fit error; None when ``comm_only``).

    ``threads`` sets torch's intra-op threads first: a profile holds for the thread count it was measured with
    (on a CPU shared with other work, one thread gives steady timings; OpenMP barriers wait on descheduled threads).
    Besides the GEMMs and the activation: the row-permute bandwidth and the per-op host cost (the whole-step
    model's terms), and under torchrun the all-to-all at this group size (kept by size in
    ``step.all_to_all_measured`` beside the base's other sizes, so running it at 2 then 4 ranks keeps both) and the
    overlap efficiency. ``comm_only`` measures only what needs several processes and keeps the rest from ``base``.
    """
    import torch
    from rich.progress import Progress

    if threads:
        torch.set_num_threads(threads)
    steps = 0 if comm_only else len(shapes) * len(rows) + 3
    with Progress(disable=not show_progress, transient=False) as bar:
        task = bar.add_task("GEMMs", total=steps + 2)
        table, error, samples = base.gemm, None, []
        mem_bw, st = base.memory_bandwidth_Bps, base.step_terms
        measured = []
        if not comm_only:
            overhead, samples = measure_gemms(shapes, rows, dtype=dtype, device=device,
                                              progress=lambda: bar.advance(task))
            table = fit_gemm_table(overhead, samples, dtype=dtype)
            error = gemm_fit_error(table, samples)
            bar.update(task, description="elementwise bandwidth")
            mem_bw = float(f"{measure_elementwise_bandwidth(device=device, dtype=dtype):.4g}")
            bar.advance(task)
            bar.update(task, description="row permutes")
            st = dataclasses.replace(st, permute_bandwidth_Bps=float(
                f"{measure_permute_bandwidth(device=device, dtype=dtype):.4g}"))
            bar.advance(task)
            bar.update(task, description="per-op overhead")
            st = dataclasses.replace(st, op_overhead_s=float(f"{measure_op_overhead(device=device):.4g}"))
            bar.advance(task)
            measured += ["gemm", "memory_bandwidth_Bps", "step.permute_bandwidth_Bps", "step.op_overhead_s"]
        bar.update(task, description="all-to-all")
        a2a = measure_all_to_all(device=device)
        bar.advance(task)
        bar.update(task, description="overlap")
        efficiency = measure_overlap_efficiency() if a2a is not None and device == "cpu" else None
        bar.advance(task)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    intra, inter = base.intra_node, base.inter_node
    if a2a is not None:
        a2a = Link(bandwidth_Bps=float(f"{a2a.bandwidth_Bps:.4g}"), latency_s=float(f"{a2a.latency_s:.4g}"))
        same_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == world
        intra, inter = (a2a, inter) if same_node else (intra, a2a)
        measured.append(f"all_to_all.{'intra' if same_node else 'inter'}_node at {world} ranks")
        if same_node:
            kept = [m for m in st.all_to_all_measured if m.ranks != world]
            point = MeasuredExchange(ranks=world, bandwidth_Bps=a2a.bandwidth_Bps, latency_s=a2a.latency_s)
            st = dataclasses.replace(st, all_to_all_measured=tuple(sorted(kept + [point], key=lambda m: m.ranks)))
            measured.append(f"step.all_to_all_measured[{world} ranks]")
    if efficiency is not None:
        st = dataclasses.replace(st, overlap_efficiency=float(f"{efficiency:.3g}"))
        measured.append(f"step.overlap_efficiency at {world} ranks")

    source = (f"measured by moecc calibrate ({', '.join(measured)}) on {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; other fields from base profile {base.name!r}")
    if comm_only:
        source = f"{base.source}; then {source}"
    notes = base.notes
    if error is not None:
        notes = (f"GEMM table fit error {100 * error:.1f}% mean absolute over {len(samples)} measured shapes. "
                 + re.sub(r"GEMM table fit error .*?shapes\.\s*", "", base.notes))
    profile = dataclasses.replace(base, name=name, source=source, gemm=table, memory_bandwidth_Bps=mem_bw,
                                  intra_node=intra, inter_node=inter, step=st, notes=notes)
    return profile, error


# -- fitting measured step times ------------------------------------------------------------------------------

class StepsError(ValueError):
    """A ``--fit-steps`` file (or sample list) that cannot be fitted; the message names the offending field."""


_STEPS_FIELDS = {"d_model", "d_ffn", "training", "act_bytes", "samples"}


def steps_from_dict(data: object) -> tuple[ExpertDims, list[tuple[list[float], float]]]:
    """Validate a parsed ``--fit-steps`` document: ``{"d_model": D, "d_ffn": F, "training": false, "act_bytes": 4,
    "samples": [{"tokens_per_slot": [...], "seconds": s}, ...]}`` (``training`` and ``act_bytes`` optional)."""
    if not isinstance(data, dict):
        raise StepsError(f"fit-steps document must be a JSON object with {sorted(_STEPS_FIELDS)}, "
                         f"got {type(data).__name__}")
    for key in ("d_model", "d_ffn", "samples"):
        if key not in data:
            raise StepsError(f"fit-steps field '{key}' is missing")
    unknown = sorted(data.keys() - _STEPS_FIELDS)
    if unknown:
        raise StepsError(f"fit-steps field '{unknown[0]}' is not a fit-steps field (typo?); "
                         f"fields: {', '.join(sorted(_STEPS_FIELDS))}")

    def integer(key: str) -> int:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StepsError(f"fit-steps field '{key}' must be a positive integer, got {_short(value)}")
        return value

    training = data.get("training", False)
    if not isinstance(training, bool):
        raise StepsError(f"fit-steps field 'training' must be true or false, got {_short(training)}")
    dims = ExpertDims(d_model=integer("d_model"), d_ffn=integer("d_ffn"), training=training,
                      act_bytes=integer("act_bytes") if "act_bytes" in data else 4)
    samples = data["samples"]
    if not isinstance(samples, list) or not samples:
        raise StepsError("fit-steps field 'samples' must be a non-empty list of "
                         '{"tokens_per_slot": [...], "seconds": s}')
    out = []
    for i, sample in enumerate(samples):
        where = f"samples[{i}]"
        if not isinstance(sample, dict) or set(sample) != {"tokens_per_slot", "seconds"}:
            got = f"fields {_short(sorted(sample))}" if isinstance(sample, dict) else f"a {type(sample).__name__}"
            raise StepsError(f"fit-steps field '{where}' must be an object with exactly 'tokens_per_slot' and "
                             f"'seconds', got {got}")
        tokens, seconds = sample["tokens_per_slot"], sample["seconds"]
        if not isinstance(tokens, list) or not tokens:
            raise StepsError(f"fit-steps field '{where}.tokens_per_slot' must be a non-empty list of token counts, "
                             f"got {_short(tokens)}")
        for j, x in enumerate(tokens):
            if not _number(x) or x < 0:
                raise StepsError(f"fit-steps field '{where}.tokens_per_slot[{j}]' must be a non-negative number, "
                                 f"got {_short(x)}")
        if not _number(seconds) or seconds <= 0:
            raise StepsError(f"fit-steps field '{where}.seconds' must be a number > 0, got {_short(seconds)}")
        out.append(([float(x) for x in tokens], float(seconds)))
    if all(x == 0 for tokens, _ in out for x in tokens):
        raise StepsError("fit-steps field 'samples': every tokens_per_slot is 0, nothing to fit")
    return dims, out


def load_fit_steps(path) -> tuple[ExpertDims, list[tuple[list[float], float]]]:
    """Read a ``--fit-steps`` file; every failure is a ``StepsError`` naming the file and the field."""
    from .profile import read_json

    data = read_json(path, "fit-steps", StepsError)
    try:
        return steps_from_dict(data)
    except StepsError as err:
        raise StepsError(f"{path}: {err}") from None


def _number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: object, limit: int = 60) -> str:
    big = isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100
    text = f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits" if big else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fit_step_times(profile: Profile, dims: ExpertDims,
                   samples: list[tuple[list[float], float]]) -> tuple[Profile, float, float]:
    """Rescale a profile so the single-device expert step matches measured seconds.

    ``samples`` are ``(tokens per slot, measured seconds)``. The model is ``u * A + v * B + C`` with A the GEMM
    compute seconds at the table's throughput, B the number of GEMM calls and C the elementwise seconds; ``u`` (a
    throughput scale, applied as ``1/u``) and ``v`` (the per-call overhead) minimise the relative squared error.
    Returns (the tuned profile, its mean absolute relative error before, after).
    """
    if not samples:
        raise StepsError("fit_step_times needs at least one measured step")
    if any(not seconds > 0 for _, seconds in samples):
        raise StepsError("every measured step must take > 0 seconds")
    model = compile_cost_model(profile, dims, 1)
    mult = 3 if dims.training else 1
    rows_A, rows_B, rows_C, meas = [], [], [], []
    for tokens, seconds in samples:
        A = B = C = 0.0
        for x in tokens:
            if x <= 0:
                continue
            for k, n_ in ((dims.d_model, dims.d_ffn), (dims.d_model, dims.d_ffn), (dims.d_ffn, dims.d_model)):
                A += mult * 2.0 * x * k * n_ / profile.gemm.flops_per_s(x)
                B += mult
            C += mult * 5 * x * dims.d_ffn * dims.act_bytes / profile.memory_bandwidth_Bps
        rows_A.append(A / seconds), rows_B.append(B / seconds), rows_C.append(C / seconds), meas.append(seconds)
    # weighted least squares on relative error: minimise sum (u a + v b + c - 1)^2
    saa = sum(a * a for a in rows_A)
    sbb = sum(b * b for b in rows_B)
    sab = sum(a * b for a, b in zip(rows_A, rows_B))
    ra = sum(a * (1 - c) for a, c in zip(rows_A, rows_C))
    rb = sum(b * (1 - c) for b, c in zip(rows_B, rows_C))
    det = saa * sbb - sab * sab
    u, v = ((ra * sbb - rb * sab) / det, (saa * rb - sab * ra) / det) if det else (0.0, 0.0)
    if u <= 0 or v < 0:  # degenerate data (or one sample: u and v inseparable): keep the overhead, fit the scale
        v = profile.gemm.call_overhead_s
        u = sum(a * (1 - c - v * b) for a, b, c in zip(rows_A, rows_B, rows_C)) / saa if saa else 0.0
    if not (u > 0 and math.isfinite(u)):
        raise StepsError("the measured steps are no longer than the model's elementwise work and GEMM call "
                         "overheads alone, so no positive GEMM throughput scale fits them; check 'seconds' "
                         "(seconds per step, not milliseconds) and 'd_model'/'d_ffn'")
    table = GemmTable(dtype=profile.gemm.dtype, call_overhead_s=v,
                      points=tuple((f, t / u) for f, t in profile.gemm.points))
    tuned = dataclasses.replace(profile, gemm=table, source=profile.source + "; GEMM scale and overhead fitted to "
                                f"{len(samples)} measured steps")
    before = _step_error(model, samples)
    after = _step_error(compile_cost_model(tuned, dims, 1), samples)
    return tuned, before, after


def _step_error(model, samples) -> float:
    return statistics.fmean(abs(sum(model.ffn_s(x) for x in tokens) - s) / s for tokens, s in samples)

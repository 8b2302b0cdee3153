"""``moecc calibrate`` and ``moecc plan``: the cost model's sub-commands (``moecc/cli.py`` mounts them)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .calibrate import StepsError
from .formulas import ExpertDims, a2a_time_expr, compile_cost_model, ffn_time_expr, numeric_formula
from .formulas import N as N_sym
from .formulas import n as n_sym
from .greedy import InfeasibleError
from .placement import EMPTY, SlotLayout
from .profile import ProfileError, builtin_profiles, load_profile, save_profile
from .workload import TraceError, load_trace


def _int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``; argparse names the flag in its one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def writable_file(flag: str, path: str) -> str | None:
    """Why ``path`` cannot be written as a file (None if it can), checked before the work that produces it."""
    target = Path(path)
    if target.is_dir():
        return f"{flag} {path} is a directory; give a file name, e.g. {target / 'profile.json'}"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"{flag} {path}: folder {parent} does not exist; create it first or write elsewhere"
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"{flag} {path} is not writable"
    return None


def add_commands(subparsers) -> None:
    """Add ``calibrate`` and ``plan`` to an argparse sub-parser object; each sets ``run(args) -> exit code``."""
    cal = subparsers.add_parser("calibrate", help="measure this machine and write a hardware profile",
                                description="Measure GEMMs, memory bandwidth (and all-to-all under torchrun), fit "
                                            "a profile, print the fit error, write it. With --fit-steps, rescale an "
                                            "existing profile to measured step times instead.")
    cal.add_argument("--out", required=True, help="profile file to write")
    cal.add_argument("--name", default="cpu-calibrated")
    cal.add_argument("--base", default="cpu",
                     help=f"profile for fields not measured (file or one of {builtin_profiles()})")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="float32")
    cal.add_argument("--threads", type=non_negative_int, default=1,
                     help="torch threads to measure with (0: torch's default)")
    cal.add_argument("--quick", action="store_true", help="fewer shapes (about 5 s)")
    cal.add_argument("--comm-only", action="store_true",
                     help="under torchrun: measure only the all-to-all and the overlap, the rest from --base")
    cal.add_argument("--fit-steps", metavar="FILE",
                     help='JSON {"d_model", "d_ffn", "training", "act_bytes", '
                          '"samples": [{"tokens_per_slot": [...], "seconds": s}]}')
    cal.set_defaults(run=run_calibrate)

    plan = subparsers.add_parser("plan", help="plan a placement pool for a load trace",
                                 description="Choose K placements of experts into ranks x slots for a trace and "
                                             "compare with static expert parallelism and the LPT greedy.")
    plan.add_argument("--trace", required=True, help="load trace JSON (docs/costmodel.md)")
    plan.add_argument("--profile", required=True, help=f"profile file or one of {builtin_profiles()}")
    plan.add_argument("--ranks", type=positive_int, required=True)
    plan.add_argument("--slots-per-rank", type=positive_int, required=True)
    plan.add_argument("--pool", type=positive_int, default=4, help="K, placements in the pool")
    plan.add_argument("--layer", default=None, help="trace layer to plan (default: the first)")
    plan.add_argument("--window", type=positive_int, default=50,
                      help="steps per planning scenario (window of the trace)")
    plan.add_argument("--check-every", type=positive_int, default=10,
                      help="steps between the runtime's decisions in the online estimate")
    plan.add_argument("--d-model", type=positive_int, default=2048)
    plan.add_argument("--d-ffn", type=positive_int, default=1408)
    plan.add_argument("--act-bytes", type=positive_int, default=2)
    plan.add_argument("--param-bytes", type=positive_int, default=2)
    plan.add_argument("--state-bytes", type=non_negative_int, default=12,
                      help="optimizer bytes moved per parameter on a switch")
    plan.add_argument("--inference", action="store_true", help="forward only (no backward pass in the step)")
    plan.add_argument("--time-limit", type=positive_seconds, default=2.0, help="seconds for the planner (CBC included)")
    plan.add_argument("--greedy-only", action="store_true", help="skip the ILP (the greedy pool)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(run=run_plan)


def _fail(message: str) -> int:
    message = " ".join(str(message).split("\n"))  # one line, whatever a field name holds
    print(f"moecc: error: {message}", file=sys.stderr)
    return 2


def run_plan(args) -> int:
    from .compare import compare

    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        return _fail(f"--profile: {err}")
    try:
        workload = load_trace(args.trace)
    except TraceError as err:
        return _fail(f"--trace: {err}")
    try:
        rows = workload.layer(args.layer)
    except KeyError as err:
        return _fail(f"--layer: {err.args[0]}")
    layout = SlotLayout(ranks=args.ranks, slots_per_rank=args.slots_per_rank)
    dims = ExpertDims(d_model=args.d_model, d_ffn=args.d_ffn, act_bytes=args.act_bytes,
                      param_bytes=args.param_bytes, state_bytes_per_param=args.state_bytes,
                      training=not args.inference)
    try:
        model = compile_cost_model(profile, dims, args.ranks)
        result = compare(rows, layout, args.pool, model, window=args.window, time_limit_s=args.time_limit,
                         use_ilp=not args.greedy_only, check_every=args.check_every)
    except InfeasibleError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    _print_plan(result, model, rows, args)
    return 0


def _print_plan(result, model, rows, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    pool = result.plan.pool
    table = Table(title=f"pool of {len(pool)} for {args.ranks} ranks x {args.slots_per_rank} slots "
                        f"(expert:share%, * = replica)")
    table.add_column("rank", justify="right")
    for k in range(len(pool)):
        table.add_column(f"plan {k}")
    for r in range(args.ranks):
        cells = []
        for p in pool.placements:
            reps = p.replicas()
            cells.append(" ".join("-" if e == EMPTY else f"{e}{'*' if reps[e] > 1 else ''}:{100 * p.share_S[s]:.0f}"
                                  for s, e in zip(p.layout.slots_of(r), p.experts_per_rank()[r])))
        table.add_row(str(r), *cells)
    console.print(table)

    per = Table(title="predicted step time per window (ms); the pool runs the marked plan")
    per.add_column("window", justify="right")
    per.add_column("steps", justify="right")
    for k in range(len(pool)):
        per.add_column(f"plan {k}", justify="right")
    per.add_column("static EP", justify="right")
    per.add_column("greedy", justify="right")
    for w, row in enumerate(result.step_s_WK):
        cells = [f"[bold green]{1e3 * t:.3f}*[/]" if result.assignment[w] == k else f"{1e3 * t:.3f}"
                 for k, t in enumerate(row)]
        per.add_row(str(w), str(result.steps_W[w]), *cells, f"{1e3 * result.static_step_s_W[w]:.3f}",
                    f"{1e3 * result.greedy_step_s_W[w]:.3f}")
    per.add_row("plan", "", *["-" if t is None else f"{1e3 * t:.3f}" for t in result.predicted_step_s], "", "")
    console.print(per)

    summary = Table(title="expected step time (switches included)", show_header=True)
    for col in ("", "ms / step", "time / planned pool"):
        summary.add_column(col, justify="right")
    pool_s = result.pool_expected_step_s
    summary.add_row("static EP (round robin)", f"{1e3 * result.static_step_s:.3f}",
                    f"{result.static_step_s / pool_s:.2f}x")
    summary.add_row("greedy (LPT) pool", f"{1e3 * result.greedy_step_s:.3f}", f"{result.greedy_step_s / pool_s:.2f}x")
    summary.add_row("planned pool", f"{1e3 * pool_s:.3f}", "1.00x")
    summary.add_row("planned pool, online choice", f"{1e3 * result.pool_online_step_s:.3f}",
                    f"{result.pool_online_step_s / pool_s:.2f}x")
    console.print(summary)
    console.print(f"planner: {result.plan.status}, {result.plan.solve_s:.2f} s, optimality gap "
                  f"{100 * result.plan.gap:.1f}% (vs max of CBC bound and perfect balance); "
                  f"switches: {result.switches}, "
                  f"{1e3 * result.switch_s_total:.2f} ms in all")

    # the formulas, symbolic and with this case's numbers, for the busiest slot and rank of window 0
    from .workload import window_loads

    k0 = result.assignment[0]
    load_E = window_loads(rows, args.window)[0]
    placement = pool.placements[k0]
    n_max = max(placement.tokens_per_slot(load_E))
    N_max = max(placement.tokens_per_rank(load_E))
    for label, expr, values in (("t_ffn(n)", ffn_time_expr(), {n_sym: n_max}),
                                ("t_a2a", a2a_time_expr(), {N_sym: N_max})):
        text, value = numeric_formula(expr, model.profile, model.dims, model.ranks, values)
        console.print(f"[bold]{label}[/] = {expr}\n    with {text}\n    = {1e3 * value:.4f} ms")


def _check_calibrate_target(args) -> str | None:
    """Why ``--device`` / ``--dtype`` cannot be measured with (None if they can), before any measuring."""
    import torch

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"--dtype {args.dtype!r} is not a torch floating-point dtype (e.g. float32, bfloat16, float16)"
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        return f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    try:
        torch.ones(2, 2, dtype=dtype, device=device) @ torch.ones(2, 2, dtype=dtype, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:  # torch raises AssertionError for CUDA-less builds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"--device {args.device} --dtype {args.dtype}: torch cannot compute there ({first})"
    return None


def run_calibrate(args) -> int:
    from .calibrate import DEFAULT_ROWS, DEFAULT_SHAPES, calibrate, fit_step_times, load_fit_steps

    try:
        base = load_profile(args.base)
    except ProfileError as err:
        return _fail(f"--base: {err}")
    problem = writable_file("--out", args.out)
    if problem:
        return _fail(problem)
    if args.fit_steps:
        try:
            dims, samples = load_fit_steps(args.fit_steps)
            tuned, before, after = fit_step_times(base, dims, samples)
        except StepsError as err:
            return _fail(f"--fit-steps: {err}")
        try:
            save_profile(tuned, args.out)
        except OSError as err:
            return _fail(f"--out {args.out}: cannot write: {err.strerror or err}")
        print(f"fitted {len(samples)} steps: mean abs error {100 * before:.1f}% -> {100 * after:.1f}%; "
              f"wrote {args.out}")
        return 0
    problem = _check_calibrate_target(args)
    if problem:
        return _fail(problem)
    shapes = DEFAULT_SHAPES[:2] if args.quick else DEFAULT_SHAPES
    rows = DEFAULT_ROWS[::2] if args.quick else DEFAULT_ROWS
    if args.comm_only and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return _fail("--comm-only measures the all-to-all and the overlap, which need several processes: run it "
                     "under torchrun --nproc-per-node N")
    profile, error = calibrate(base, name=args.name, device=args.device, dtype=args.dtype, shapes=shapes, rows=rows,
                               threads=args.threads or None, comm_only=args.comm_only)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank measures (the all-to-all needs them all); rank 0 writes
    try:
        save_profile(profile, args.out)
    except OSError as err:
        return _fail(f"--out {args.out}: cannot write: {err.strerror or err}")
    st = profile.step_terms
    parts = []
    if error is not None:
        parts.append(f"GEMM table: {len(profile.gemm.points)} points, call overhead "
                     f"{1e6 * profile.gemm.call_overhead_s:.1f} us, fit error {100 * error:.1f}% mean absolute; "
                     f"memory {profile.memory_bandwidth_Bps / 1e9:.1f} GB/s; permutes "
                     f"{st.permute_bandwidth_Bps / 1e9:.1f} GB/s; {1e6 * st.op_overhead_s:.2f} us per op")
    parts += [f"all-to-all at {m.ranks} ranks: {1e6 * m.latency_s:.0f} us + bytes / {m.bandwidth_Bps / 1e9:.2f} GB/s"
              for m in st.all_to_all_measured]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parts.append(f"overlap efficiency {st.overlap_efficiency:.2f}")
    print("; ".join(parts + [f"wrote {args.out}"]))
    return 0

"""``moecc report [--graph] [--block PATH] [--timings] [--html FILE] [--svg FILE] SCRIPT_OR_MODULE [ARGS...]``:
run a sample, show what moecc did.

The script (a path) or module (a dotted name, run as ``python -m`` would) runs in this process with ``ARGS`` as its
``sys.argv[1:]``; every ``torch.compile(..., backend="moecc")`` in it records its MoE blocks, and the report of
those blocks is printed afterwards: the summary, with ``--graph`` each block's graph view too, with ``--block``
only the named block's. ``--html`` writes every section (folded) whatever is printed; ``--svg`` what is printed.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback


def add_commands(subparsers) -> None:
    """Add ``report`` to an argparse sub-parser object; it sets ``run(args) -> exit code``."""
    rep = subparsers.add_parser("report", help="run a script or module and print moecc's report of its MoE blocks",
                                description="Run SCRIPT_OR_MODULE (a .py path, or a module name run like "
                                            "`python -m`) in this process, then print moecc.report(): every MoE "
                                            "block compiled, its router, experts and weight layout, and whether "
                                            "it was rewritten or why not.")
    # optional to argparse only so that a missing target gets our message, not "required: ..., args"
    rep.add_argument("target", metavar="SCRIPT_OR_MODULE", nargs="?")
    # Everything after the target is the script's (options of ``report`` itself go before the target).
    rep.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    rep.add_argument("--graph", action="store_true",
                     help="also print each block's graph view: its nodes before and after, stage by stage")
    rep.add_argument("--block", metavar="PATH", action="append", default=[],
                     help="print only this block's graph view (its module path; repeatable)")
    rep.add_argument("--timings", action="store_true",
                     help="also show times that change from run to run (rewrite checks, switches)")
    rep.add_argument("--html", metavar="FILE",
                     help="also write the report as HTML: every section, each block's graph view folded")
    rep.add_argument("--svg", metavar="FILE", help="also write the report as printed as SVG")
    rep.add_argument("--width", type=_width, default=160, help="console width for the table (default 160)")
    rep.set_defaults(run=run_report)


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of columns >= 20, got {text!r}") from None
    if value < 20:
        raise argparse.ArgumentTypeError(f"must be a whole number of columns >= 20, got {value}")
    return value


class TargetError(ValueError):
    """SCRIPT_OR_MODULE names nothing that can run."""


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or (os.altsep is not None and os.altsep in target)


def check_target(target: str) -> None:
    """Raise ``TargetError`` (the fix in its message) unless ``target`` is a script, a folder or zip with a
    ``__main__.py``, or an importable module with code to run."""
    if os.path.isdir(target):
        if not os.path.isfile(os.path.join(target, "__main__.py")):
            raise TargetError(f"SCRIPT_OR_MODULE {target!r} is a directory without a __main__.py; give the .py "
                              f"script inside it, or a module name")
        return
    if os.path.isfile(target):
        return
    if _is_path(target):
        raise TargetError(f"SCRIPT_OR_MODULE {target!r}: no such script (check the path; a module is given by "
                          f"its dotted name, without .py)")
    import importlib.util

    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as err:  # a missing parent package, or an empty/relative name
        spec, why = None, f" ({err})"
    else:
        why = ""
    if spec is None:
        raise TargetError(f"SCRIPT_OR_MODULE {target!r}: no such file, and no importable module of that name{why}; "
                          f"give a .py path or a dotted module name on sys.path")
    if spec.submodule_search_locations is not None:
        try:
            main_spec = importlib.util.find_spec(f"{target}.__main__")
        except ImportError:
            main_spec = None
        if main_spec is None:
            raise TargetError(f"SCRIPT_OR_MODULE {target!r} is a package without a __main__ module; name one of "
                              f"its modules instead")


def _check_output(flag: str, path: str | None) -> str | None:
    if path is None:
        return None
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name, e.g. {os.path.join(path, 'report.' + flag[2:])}"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"{flag} {path}: folder {parent} does not exist; create it first or write elsewhere"
    return None


def run_target(target: str, args: list[str]) -> None:
    """Run a script path or a module as ``__main__`` with ``args`` as its arguments."""
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        if os.path.exists(target):
            if os.path.isfile(target):  # (run_path puts a directory or zip on sys.path itself)
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


def _fail(message: str, code: int = 2) -> int:
    print(f"moecc: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _forget_compiled_graphs() -> None:
    """A graph Dynamo compiled earlier in this process (``moecc report`` called in-process, from a test) would be
    reused by the script for the same model class, and its blocks would not be reported again: start fresh."""
    if "torch" in sys.modules:  # a new process has compiled nothing (and need not import torch for it)
        sys.modules["torch"]._dynamo.reset()


def run_report(args) -> int:
    import importlib

    from rich.console import Group

    report = importlib.import_module("moecc.report")  # the module (``moecc.report`` is also the function)

    if args.target is None:
        return _fail("moecc report needs SCRIPT_OR_MODULE: a .py path or a module name, e.g. "
                     "'moecc report samples/demo.py'")
    try:
        check_target(args.target)
    except TargetError as err:
        return _fail(str(err))
    for flag, path in (("--html", args.html), ("--svg", args.svg)):
        problem = _check_output(flag, path)
        if problem:
            return _fail(problem)
    before = len(report.report().blocks)
    _forget_compiled_graphs()
    try:
        run_target(args.target, [a for i, a in enumerate(args.args) if not (i == 0 and a == "--")])
    except SystemExit as exc:  # a script that calls sys.exit(0) still ran
        if exc.code not in (None, 0):
            code = exc.code if isinstance(exc.code, int) else 1
            return _fail(f"{args.target} exited with status {exc.code!r}; no report", code)
    except Exception as err:  # the script's own error: its traceback is the script's, not moecc's
        traceback.print_exc()
        return _fail(f"{args.target} raised {type(err).__name__}: {err} (its traceback is above); no report", 1)
    rep = report.Report(report.report().blocks[before:], detail="graph" if args.graph else "summary",
                        show_timings=args.timings)
    if not rep.blocks:
        print(f"moecc report: {args.target} compiled no MoE block with backend='moecc'", file=sys.stderr)
    try:
        shown = Group(*(rep.block(path) for path in args.block)) if args.block else rep
    except KeyError as err:
        return _fail(err.args[0])
    console = report.console(width=args.width)
    console.print(shown)
    try:
        if args.html:
            rep.save_html(args.html, width=args.width)
        if args.svg:
            console.save_svg(args.svg, clear=False, title="moecc report")
    except OSError as err:
        return _fail(f"cannot write the report: {err}")
    return 0 if rep.blocks else 1

"""``moecc report [--html FILE] [--svg FILE] SCRIPT_OR_MODULE [ARGS...]``: run a sample, show what moecc did.

The script (a path) or module (a dotted name, run as ``python -m`` would) runs in this process with ``ARGS`` as its
``sys.argv[1:]``; every ``torch.compile(..., backend="moecc")`` in it records its MoE blocks, and the report of
those blocks is printed afterwards, and written as HTML and/or SVG (rich's export) for sharing.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def add_commands(subparsers) -> None:
    """Add ``report`` to an argparse sub-parser object; it sets ``run(args) -> exit code``."""
    rep = subparsers.add_parser("report", help="run a script or module and print moecc's report of its MoE blocks",
                                description="Run SCRIPT_OR_MODULE (a .py path, or a module name run like "
                                            "`python -m`) in this process, then print moecc.report(): every MoE "
                                            "block compiled, its router, experts and weight layout, and whether "
                                            "it was rewritten or why not.")
    rep.add_argument("target", metavar="SCRIPT_OR_MODULE")
    # Everything after the target is the script's (options of ``report`` itself go before the target).
    rep.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    rep.add_argument("--html", metavar="FILE", help="also write the report as HTML")
    rep.add_argument("--svg", metavar="FILE", help="also write the report as SVG")
    rep.add_argument("--width", type=int, default=160, help="console width for the table (default 160)")
    rep.set_defaults(run=run_report)


def run_target(target: str, args: list[str]) -> None:
    """Run a script path or a module as ``__main__`` with ``args`` as its arguments."""
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        if target.endswith(".py") or os.path.isfile(target):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


def run_report(args) -> int:
    import importlib

    report = importlib.import_module("moecc.report")  # the module (``moecc.report`` is also the function)

    before = len(report.report().blocks)
    try:
        run_target(args.target, [a for i, a in enumerate(args.args) if not (i == 0 and a == "--")])
    except SystemExit as exc:  # a script that calls sys.exit(0) still ran
        if exc.code not in (None, 0):
            raise
    rep = report.Report(report.report().blocks[before:])
    if not rep.blocks:
        print(f"moecc report: {args.target} compiled no MoE block with backend='moecc'", file=sys.stderr)
    console = report.console(width=args.width)
    console.print(rep)
    if args.html:
        console.save_html(args.html, clear=False)
    if args.svg:
        console.save_svg(args.svg, clear=False, title="moecc report")
    return 0 if rep.blocks else 1

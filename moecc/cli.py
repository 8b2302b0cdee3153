"""The ``moecc`` command line: one sub-command per job, each defined next to the code it drives.

Bad input is refused with one line on stderr, ``moecc: error: <what is wrong and how to fix it>``, and exit
status 2, never a traceback: argparse's own errors (a missing flag, a value of the wrong type or range) go through
``Parser.error``, the sub-commands' (files, infeasible layouts) through their ``_fail``. Anything else escaping a
sub-command is a moecc bug: its traceback is printed with a line saying so, exit status 70.
"""
from __future__ import annotations

import argparse
import sys
import traceback

BUG_EXIT = 70  # EX_SOFTWARE: an internal error, not the user's input


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``moecc: error: ...``) instead of a usage block; sub-parsers inherit it."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"moecc: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moecc", description="moecc: a compiler for Mixture-of-Experts models")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{calibrate,plan,report}")
    from moecc.costmodel import cli as costmodel_cli

    costmodel_cli.add_commands(commands)
    from moecc import report_cli

    report_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Exception as err:  # bad input is refused before this; what gets here is a bug in moecc
        traceback.print_exc()
        print(f"moecc: error: internal error in 'moecc {args.command}' ({type(err).__name__}: {err}); this is a "
              f"moecc bug, please report it with the command line and the traceback above", file=sys.stderr)
        return BUG_EXIT


if __name__ == "__main__":
    sys.exit(main())

"""The ``moecc`` command line: one sub-command per job, each defined next to the code it drives."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecc", description="moecc: a compiler for Mixture-of-Experts models")
    commands = parser.add_subparsers(dest="command", required=True)
    from moecc.costmodel import cli as costmodel_cli

    costmodel_cli.add_commands(commands)
    from moecc import report_cli

    report_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``streamline`` command: a dispatcher over :mod:`.commands`, one module per subcommand."""

from __future__ import annotations

import argparse
from typing import Sequence

from .commands import bench, calibrate, profile, selftest, simulate

COMMANDS = (simulate, bench, profile, calibrate, selftest)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``streamline``."""
    parser = argparse.ArgumentParser(
        prog="streamline", description="Memory-efficient inference for video diffusion U-Nets: measure and simulate."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub_parser = command.add_parser(sub)
        sub_parser.set_defaults(parser=sub_parser, run=command.run)  # errors name the subcommand's usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamline`` command."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())

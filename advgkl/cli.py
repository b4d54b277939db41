"""The `advgkl` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from advgkl import __version__
from advgkl.config import dump_config, load_config
from advgkl.errors import UserError


def _cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advgkl", description="Adversarial training with GKL/IKL and AutoAttack evaluation.")
    parser.add_argument("--version", action="version", version=f"advgkl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser(
        "config", help="print the resolved config (defaults < YAML < overrides)",
        description="Print the resolved config as YAML: defaults, then CONFIG, then overrides.")
    config.add_argument("config", metavar="CONFIG", help="YAML config file")
    config.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides, e.g. attack.eps=8/255 train.epochs=10")
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line to stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"advgkl: error: {exc}", file=sys.stderr)
        return 2

"""The `advgkl` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from advgkl import __version__
from advgkl.errors import UserError


# Commands import what they need, so `advgkl --version` and `advgkl config` start fast.


def _cmd_config(args: argparse.Namespace) -> int:
    from advgkl.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def _cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from advgkl.checkpoint import import_checkpoint, save_checkpoint

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out (nothing was overwritten)")
    ckpt = import_checkpoint(args.src, arch=args.arch, num_classes=args.num_classes)
    save_checkpoint(out, ckpt)
    print(f"wrote {out}: {args.arch}, {args.num_classes} classes, {len(ckpt['model'])} tensors")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from advgkl.config import load_config
    from advgkl.train import run_dir_for, train

    if args.resume:
        if args.config or args.overrides:
            raise UserError("--resume continues a run with its saved config.yaml; "
                            "pass no CONFIG or overrides with it")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml); nothing to resume")
        cfg = load_config(run_dir / "config.yaml")
        train(cfg, run_dir, resume=True)
        return 0
    if not args.config:
        raise UserError("give a CONFIG file, or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    train(cfg, run_dir_for(cfg, args.config))
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

    train = commands.add_parser(
        "train", help="adversarial training from a config (or resume a run)",
        description="Train CONFIG (with section.key=value overrides) into "
                    "run.out_dir/run.name (default checkpoints/<config name>/), or continue an "
                    "interrupted run from its last.pt with --resume RUN_DIR.")
    train.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from last.pt")
    train.set_defaults(func=_cmd_train)

    imp = commands.add_parser(
        "import-checkpoint", help="turn a foreign weights file into an advgkl checkpoint",
        description="Import a plain state dict (the paper's files, RobustBench zoo files; "
                    "possibly wrapped in state_dict/model_state_dict, with module. prefixes), "
                    "verify it loads into --arch, and save it as a self-describing checkpoint. "
                    "The file is read with weights_only=True: nothing in it can run code.")
    imp.add_argument("src", metavar="SRC", help="foreign .pt/.pth file")
    imp.add_argument("--arch", required=True, help="registered model name, e.g. wrn-34-10")
    imp.add_argument("--num-classes", type=int, required=True)
    imp.add_argument("--out", required=True, help="output checkpoint path (must not exist)")
    imp.set_defaults(func=_cmd_import_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line to stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"advgkl: error: {exc}", file=sys.stderr)
        return 2

"""The `advgkl` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from advgkl.errors import UserError, check_plain_name, worker_message

# Commands import what they need, so `advgkl --version` and `advgkl config` start fast.


def _notes(notes: list[str]) -> None:
    for line in notes:
        print(f"advgkl: note: {line}", file=sys.stderr)


def _cmd_config(args: argparse.Namespace) -> int:
    from advgkl.config import dump_config, load_config

    notes: list[str] = []
    text = dump_config(load_config(args.config, args.overrides, notes=notes))
    _notes(notes)
    sys.stdout.write(text)
    return 0


def _new_path(path: str) -> Path:
    """An --out that must not exist yet (nothing is ever overwritten)."""
    out = Path(path)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out (nothing was overwritten)")
    return out


def _cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from advgkl.checkpoint import save_checkpoint
    from advgkl.models.loading import import_checkpoint

    out = _new_path(args.out)
    ckpt = import_checkpoint(args.src, arch=args.arch, num_classes=args.num_classes)
    save_checkpoint(out, ckpt)
    print(f"wrote {out}: {args.arch}, {args.num_classes} classes, {len(ckpt['model'])} tensors")
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from advgkl.data.generated import convert, locate

    out = convert(args.src, args.out)
    n = locate(out, "image").shape[0]
    print(f"wrote {out}/image.npy and label.npy ({n} images); train with data.generated={out}")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from advgkl.checkpoint import save_checkpoint
    from advgkl.training.average import average_run

    out = _new_path(args.out)
    ckpt = average_run(args.run_dir, tau=args.tau, start=args.start, end=args.end)
    save_checkpoint(out, ckpt)
    avg = ckpt["averaged"]
    print(f"wrote {out}: epochs {avg['start']}-{avg['end']} averaged with tau {avg['tau']}; "
          f"evaluate it with `advgkl eval {out}`")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from advgkl.studies.report import write_report
    from advgkl.studies.study import find_run, load_study, run_study, scheduler_commands

    study = load_study(args.study, args.out)
    if args.jobs < 1:
        raise UserError("-j: needs at least 1 process")
    if args.print:
        commands, script = scheduler_commands(study, args.study)
        study.dir.mkdir(parents=True, exist_ok=True)
        (study.dir / "slurm_array.sh").write_text(script)
        print("\n".join(commands))
        print(f"# a Slurm array script for them: {study.dir / 'slurm_array.sh'}", file=sys.stderr)
        return 0
    failed: list[str] = []
    if not args.aggregate:
        only = [find_run(study, args.run)] if args.run else None
        outcomes = run_study(study, jobs=args.jobs, only=only)
        order = [r.name for r in study.runs]  # the study's order, not the finishing order
        failed = [f"{name}: {why}" for name, why in sorted(
            outcomes.items(), key=lambda item: order.index(item[0]) if item[0] in order else -1)
            if why != "done"]
        if args.run:  # a scheduler's task: its own run only; --aggregate collects at the end
            if failed:
                raise UserError(failed[0])
            return 0
    summary = write_report(study)
    print(f"wrote {summary} (and summary.csv, runs.csv, robust_vs_clean.png, per_class.png, "
          "curves.png)")
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {'; '.join(failed)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from advgkl.config import load_config
    from advgkl.training.build import run_dir_for
    from advgkl.training.loop import train

    if args.resume:
        if args.config or args.overrides:
            raise UserError("--resume continues a run with its saved config.yaml; "
                            "pass no CONFIG or overrides with it")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml); nothing to resume")
        notes = []
        cfg = load_config(run_dir / "config.yaml", saved=True, notes=notes)
        train(cfg, run_dir, resume=True, notes=notes)
        return 0
    if not args.config:
        raise UserError("give a CONFIG file, or --resume RUN_DIR")
    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes=notes)
    train(cfg, run_dir_for(cfg, args.config), notes=notes)
    return 0


def _meta(args: argparse.Namespace) -> dict:
    return {"link": args.link, "name": args.paper_name, "authors": args.authors,
            "venue": args.venue, "additional_data": args.additional_data,
            "reported": args.reported, "footnote": args.footnote}


LP_BOARDS = ("Linf", "L2")


def _boards(args: argparse.Namespace) -> list[str]:
    """The boards to score: --threat's (in order), else --norm's Lp board; options that a board
    does not take are refused before anything runs."""
    if args.threat and args.norm:
        raise UserError("--norm and --threat: give the boards with --threat only")
    boards = list(dict.fromkeys(args.threat or [args.norm or "Linf"]))
    lp = [b for b in boards if b in LP_BOARDS]
    if args.eps and not lp:
        raise UserError("--eps: the corruption boards have no eps (RobustBench's corruptions "
                        "model_info holds eps null); add --threat Linf or L2 to use it")
    if args.eps and len(lp) > 1:
        raise UserError("--eps: one size cannot serve both Linf and L2; score them one at a time")
    if (args.corruptions_dir or args.corruptions) and len(lp) == len(boards):
        raise UserError("--corruptions-dir and --corruptions are for --threat corruptions or "
                        "corruptions_3d")
    return boards


def _cmd_eval(args: argparse.Namespace) -> int:
    from advgkl.config import parse_number
    from advgkl.evaluation.job import EvalJob, parse_shard

    boards = _boards(args)
    job = EvalJob(
        checkpoint=args.checkpoint, dataset=args.dataset, n_examples=args.n_examples,
        eps=parse_number("--eps", args.eps) if args.eps else None, norm="Linf",
        version=args.version,
        attacks=args.attacks.split(",") if args.attacks else None, quick=args.quick,
        batch_size=None if args.batch_size == "auto" else args.batch_size, seed=args.seed,
        state=args.state, model_name=args.model_name,
        out=args.out, weights=args.weights, device=args.device, data_root=args.data_root,
        preprocessing=args.preprocessing,
        shard=parse_shard(args.shard) if args.shard else None, meta=_meta(args),
        robustbench=args.robustbench, model_dir=args.model_dir, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile,
        cudnn_benchmark=args.cudnn_benchmark, compare_with=args.compare_with,
        sanity=args.sanity, corruptions_dir=args.corruptions_dir,
        corruptions=args.corruptions.split(",") if args.corruptions else None)
    for board in boards:
        state = f"{args.state}.{board}" if args.state and len(boards) > 1 else args.state
        if board in LP_BOARDS:
            _eval_lp(replace(job, norm=board, state=state), args)
        else:
            _eval_corruptions(replace(job, norm="corruptions", state=state), board)
    return 0


def _eval_lp(job, args: argparse.Namespace) -> None:
    from advgkl.evaluation.job import run_eval_job

    result, paths = run_eval_job(job)
    steps = ", ".join(f"{a['attack']} {100 * a['robust'] / result.n_examples:.2f}%"
                      for a in result.per_attack)
    print(f"{result.label}: clean {100 * result.clean_acc:.2f}%, robust "
          f"{100 * result.robust_acc:.2f}% on {result.n_examples} points ({steps})")
    if args.robustbench:
        board = _zoo_leaderboard(paths)
        print("RobustBench's leaderboard: " + (
            f"clean {board['clean_acc']}%, AutoAttack {board['autoattack_acc']}%" if board else
            "no numbers in the installed robustbench (its PyPI package ships no model_info)"))
    compared = _record(paths).get("flags_vs_reference") if args.compare_with else None
    if compared:
        print(f"robust flags vs {compared['reference']}: {compared['differ']} of "
              f"{result.n_examples} points differ" + (f" ({compared['points'][:10]})"
                                                     if compared["differ"] else ""))
    worst = result.worst_class()
    if worst is not None:
        print(f"worst class: {worst['class']}, robust {100 * worst['robust_acc']:.2f}% "
              f"(clean {100 * worst['clean_acc']:.2f}%) of its {worst['n']} points")
    _wrote(paths)


def _eval_corruptions(job, board: str) -> None:
    from advgkl.evaluation.corruption_job import run_corruption_job

    result, paths = run_corruption_job(job, board)
    per = result.per_corruption()
    worst = min(per, key=per.get)
    mce = result.mce()
    print(f"{result.label}: clean {100 * result.clean_acc:.2f}%, mean over "
          f"{len(result.cells)} cells {100 * result.corruptions_acc:.2f}%"
          + (f", mCE {100 * mce:.2f}%" if mce is not None else "")
          + f" on {result.n_examples} points; worst corruption {worst} {100 * per[worst]:.2f}%")
    _wrote(paths)


def _wrote(paths: dict) -> None:
    for path in paths.values():
        if path.exists():
            print(f"wrote {path}")


def _record(paths: dict) -> dict:
    """The detailed (or shard) record an evaluation just wrote; {} on the ranks that wrote none."""
    import json

    record = next((p for k, p in paths.items() if k in ("detailed", "shard")), None)
    return json.loads(record.read_text()) if record is not None and record.exists() else {}


def _zoo_leaderboard(paths: dict) -> dict | None:
    return (_record(paths).get("config") or {}).get("robustbench", {}).get("leaderboard")


def _cmd_eval_merge(args: argparse.Namespace) -> int:
    from advgkl.evaluation import corruption_job
    from advgkl.evaluation.job import merge_shard_files, output_paths, read_record

    name = args.model_name or Path(args.shards[0]).name.split(".shard-")[0]
    check_plain_name(name, "--model-name")
    first = read_record(Path(args.shards[0]))
    shards = [Path(p) for p in args.shards]
    board = first["result"].get("threat")
    if board:   # a corruption board's shards
        out_dir = Path(args.out) / first["dataset"] / board
        paths = corruption_job.output_paths(out_dir, name, first["kind"], None)
        corruption = corruption_job.merge_files(shards, paths, _meta(args))
        print(f"merged {len(shards)} shards: clean {100 * corruption.clean_acc:.2f}%, mean over "
              f"the cells {100 * corruption.corruptions_acc:.2f}% on {corruption.n_examples} "
              "points")
        return 0
    out_dir = Path(args.out) / first["dataset"] / first["result"]["norm"]
    paths = output_paths(out_dir, name, first["kind"], None)
    paths.pop("log", None)
    result = merge_shard_files(shards, paths, _meta(args))
    print(f"merged {len(shards)} shards: clean {100 * result.clean_acc:.2f}%, robust "
          f"{100 * result.robust_acc:.2f}% on {result.n_examples} points")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from advgkl.evaluation.export import export_submission

    weights = export_submission(args.checkpoint, args.eval, args.out,
                                allow_partial=args.allow_partial, threat=args.threat)
    print(f"wrote the RobustBench submission bundle to {weights.parent}")
    return 0


def _cmd_data_corrupt(args: argparse.Namespace) -> int:
    from advgkl.data.corrupting import corrupt_dataset
    from advgkl.evaluation.corruptions import CORRUPTIONS

    index = corrupt_dataset(dataset=args.dataset, root=args.root, out=args.out,
                            corruptions=(args.corruptions.split(",") if args.corruptions
                                         else list(CORRUPTIONS)), n=args.n, seed=args.seed)
    print(f"wrote {index.parent} (and {index.name}: generated, NOT the released sets); evaluate "
          f"with advgkl eval CHECKPOINT --threat corruptions --corruptions-dir {index.parent}")
    return 0


def _cmd_data_shards(args: argparse.Namespace) -> int:
    from advgkl.data.shards import write_shards

    index = write_shards(args.root, args.out, dataset=args.dataset, shard_size=args.shard_size)
    print(f"wrote {index} and its shards; train with data.shards={args.out}")
    return 0


HANDLERS = {"config": _cmd_config, "train": _cmd_train, "data convert": _cmd_data_convert,
            "data shards": _cmd_data_shards, "data corrupt": _cmd_data_corrupt, "eval": _cmd_eval,
            "eval-merge": _cmd_eval_merge, "export": _cmd_export, "study": _cmd_study,
            "average": _cmd_average, "import-checkpoint": _cmd_import_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    from advgkl.cli.parsers import build_parser as build

    return build(HANDLERS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors (and files that cannot be read or written) print one line to
    stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        message = worker_message(str(exc))
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    print(f"advgkl: error: {' '.join(message.split())}", file=sys.stderr)
    return 2

"""The `advgkl` command: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from advgkl import __version__
from advgkl.errors import UserError, check_plain_name


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
    from advgkl.checkpoint import import_checkpoint, save_checkpoint

    out = _new_path(args.out)
    ckpt = import_checkpoint(args.src, arch=args.arch, num_classes=args.num_classes)
    save_checkpoint(out, ckpt)
    print(f"wrote {out}: {args.arch}, {args.num_classes} classes, {len(ckpt['model'])} tensors")
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from advgkl.generated import convert, locate

    out = convert(args.src, args.out)
    n = locate(out, "image").shape[0]
    print(f"wrote {out}/image.npy and label.npy ({n} images); train with data.generated={out}")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from advgkl.average import average_run
    from advgkl.checkpoint import save_checkpoint

    out = _new_path(args.out)
    ckpt = average_run(args.run_dir, tau=args.tau, start=args.start, end=args.end)
    save_checkpoint(out, ckpt)
    avg = ckpt["averaged"]
    print(f"wrote {out}: epochs {avg['start']}-{avg['end']} averaged with tau {avg['tau']}; "
          f"evaluate it with `advgkl eval {out}`")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from advgkl.study import find_run, load_study, run_study, scheduler_commands
    from advgkl.study_report import write_report

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
        failed = [f"{name}: {why}" for name, why in outcomes.items() if why != "done"]
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
    from advgkl.train import run_dir_for, train

    if args.resume:
        if args.config or args.overrides:
            raise UserError("--resume continues a run with its saved config.yaml; "
                            "pass no CONFIG or overrides with it")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml); nothing to resume")
        cfg = load_config(run_dir / "config.yaml", saved=True)
        train(cfg, run_dir, resume=True)
        return 0
    if not args.config:
        raise UserError("give a CONFIG file, or --resume RUN_DIR")
    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes=notes)
    train(cfg, run_dir_for(cfg, args.config), notes=notes)
    return 0


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or auto") from None


def _meta(args: argparse.Namespace) -> dict:
    return {"link": args.link, "name": args.paper_name, "authors": args.authors,
            "venue": args.venue, "additional_data": args.additional_data,
            "reported": args.reported, "footnote": args.footnote}


def _cmd_eval(args: argparse.Namespace) -> int:
    from advgkl.config import parse_number
    from advgkl.eval_job import EvalJob, parse_shard, run_eval_job

    job = EvalJob(
        checkpoint=args.checkpoint, dataset=args.dataset, n_examples=args.n_examples,
        eps=parse_number("--eps", args.eps), norm=args.norm, version=args.version,
        attacks=args.attacks.split(",") if args.attacks else None, quick=args.quick,
        batch_size=None if args.batch_size == "auto" else args.batch_size, seed=args.seed,
        state=args.state, model_name=args.model_name,
        out=args.out, weights=args.weights, device=args.device, data_root=args.data_root,
        shard=parse_shard(args.shard) if args.shard else None, meta=_meta(args),
        robustbench=args.robustbench, model_dir=args.model_dir, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile,
        cudnn_benchmark=args.cudnn_benchmark, compare_with=args.compare_with)
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
    for path in paths.values():
        if path.exists():
            print(f"wrote {path}")
    return 0


def _record(paths: dict) -> dict:
    """The detailed (or shard) record an evaluation just wrote; {} on the ranks that wrote none."""
    import json

    record = next((p for k, p in paths.items() if k in ("detailed", "shard")), None)
    return json.loads(record.read_text()) if record is not None and record.exists() else {}


def _zoo_leaderboard(paths: dict) -> dict | None:
    return (_record(paths).get("config") or {}).get("robustbench", {}).get("leaderboard")


def _cmd_eval_merge(args: argparse.Namespace) -> int:
    from advgkl.eval_job import merge_shard_files, output_paths, read_record

    name = args.model_name or Path(args.shards[0]).name.split(".shard-")[0]
    check_plain_name(name, "--model-name")
    first = read_record(Path(args.shards[0]))
    out_dir = Path(args.out) / first["dataset"] / first["result"]["norm"]
    paths = output_paths(out_dir, name, first["kind"], None)
    paths.pop("log", None)
    result = merge_shard_files([Path(p) for p in args.shards], paths, _meta(args))
    print(f"merged {len(args.shards)} shards: clean {100 * result.clean_acc:.2f}%, robust "
          f"{100 * result.robust_acc:.2f}% on {result.n_examples} points")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from advgkl.leaderboard import export_submission

    weights = export_submission(args.checkpoint, args.eval, args.out,
                                allow_partial=args.allow_partial)
    print(f"wrote the RobustBench submission bundle to {weights.parent}")
    return 0


def _add_meta_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("RobustBench metadata (left empty unless given)")
    group.add_argument("--link", default="", help="paper URL")
    group.add_argument("--paper-name", default="", help="paper title")
    group.add_argument("--authors", default="")
    group.add_argument("--venue", default="")
    group.add_argument("--additional-data", action="store_true",
                       help="trained with extra real data (RobustBench's additional_data)")
    group.add_argument("--reported", default="", help="robust accuracy the paper reports")
    group.add_argument("--footnote", default="")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr, exit status 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"advgkl: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    data = commands.add_parser("data", help="prepare generated training data",
                               description="Prepare generated training data.")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    conv = data_commands.add_parser(
        "convert", help="stream an .npz (image, label) into a folder of .npy files",
        description="Stream SRC.npz (DM-AT's format: image (N, H, W, 3) uint8, label (N,); "
                    "compressed or not) chunk by chunk into OUT/image.npy and OUT/label.npy, "
                    "never holding the data in memory. Needs the data's size in free disk; "
                    "OUT must not exist. Uncompressed .npz files can also be trained on directly.")
    conv.add_argument("src", metavar="SRC.npz")
    conv.add_argument("out", metavar="OUT")
    conv.set_defaults(func=_cmd_data_convert)

    ev = commands.add_parser(
        "eval", help="AutoAttack evaluation and RobustBench records",
        description="Evaluate CHECKPOINT on the first N test images (torchvision order, as "
                    "RobustBench) with standard AutoAttack (pyautoattack), or a quick, clearly "
                    "labelled non-standard check. Under torchrun each process evaluates a "
                    "contiguous shard and rank 0 merges them.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                    help="an advgkl checkpoint (or give --robustbench NAME instead)")
    ev.add_argument("--robustbench", metavar="NAME",
                    help="a RobustBench model-zoo entry instead, loaded by RobustBench's own "
                         "loader for --dataset (default cifar10) and threat --norm")
    ev.add_argument("--model-dir", default="models",
                    help="RobustBench's weights folder (MODEL_DIR/<dataset>/<threat>/NAME.pt)")
    ev.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"),
                    help="default: the checkpoint's training data")
    ev.add_argument("--n-examples", type=int, default=10_000)
    ev.add_argument("--eps", default="8/255", help="e.g. 8/255 (Linf) or 0.5 (L2)")
    ev.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    ev.add_argument("--version", choices=("standard", "plus", "rand", "custom"),
                    default="standard")
    ev.add_argument("--attacks", help="comma-separated, with --version custom")
    ev.add_argument("--quick", metavar="KIND",
                    help="non-standard check instead: pgd-K (CE), cw-K, or apgd (APGD-CE + APGD-T)")
    ev.add_argument("--batch-size", type=_batch_size, default=500,
                    help="images per AutoAttack batch, or auto: half the largest power of two "
                         "whose forward and backward fit on the GPU (500 off the GPU)")
    speed = ev.add_argument_group("speed (what AutoAttack computes is unchanged; recorded in "
                                  "the detailed record)")
    speed.add_argument("--channels-last", action="store_true",
                       help="run the model in channels_last memory format")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the model (dynamic shapes: AutoAttack's batches shrink)")
    speed.add_argument("--cudnn-benchmark", action="store_true",
                       help="let cuDNN pick the fastest kernels (CUDA)")
    speed.add_argument("--compare-with", metavar="RECORD.json",
                       help="a detailed record of the same points (e.g. the plain fp32 run): "
                            "count and list the points whose robust flag differs")
    ev.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: AutoAttack under bf16 autocast, a NON-STANDARD screening "
                         "(NAME.standard-bf16.json only, never model_info)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--state", help="state file: a restarted evaluation continues from it")
    ev.add_argument("--model-name", help="record name; default: the run folder's name")
    ev.add_argument("--out", default="results")
    ev.add_argument("--weights", choices=("auto", "avg", "ema", "model"), default="auto",
                    help="avg: the epoch average (the paper's final model); ema: the per-step "
                         "EMA; model: the raw weights; auto: avg, else ema, else model, as the "
                         "checkpoint has them")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--data-root", default="data")
    ev.add_argument("--shard", metavar="I/N", help="evaluate shard I of N (without torchrun)")
    _add_meta_options(ev)
    ev.set_defaults(func=_cmd_eval)

    merge = commands.add_parser(
        "eval-merge", help="merge shard results exactly (counts, not percentages)",
        description="Merge NAME.shard-I-of-N.json files into NAME.json and NAME.detailed.json.")
    merge.add_argument("shards", nargs="+", metavar="SHARD.json")
    merge.add_argument("--out", default="results")
    merge.add_argument("--model-name")
    _add_meta_options(merge)
    merge.set_defaults(func=_cmd_eval_merge)

    export = commands.add_parser(
        "export", help="write a RobustBench New Model submission bundle",
        description="Write the plain state dict RobustBench's class loads with strict=True "
                    "(verified), its sha256, the model_info JSON, the model-zoo entry and the "
                    "New Model issue text.")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("--eval", required=True, metavar="NAME.json",
                        help="the model_info JSON `advgkl eval` wrote for this checkpoint")
    export.add_argument("--out", required=True, help="empty or new folder")
    export.add_argument("--allow-partial", action="store_true",
                        help="export an evaluation on fewer than 10,000 points, marked partial")
    export.set_defaults(func=_cmd_export)

    study = commands.add_parser(
        "study", help="rows x seeds: train and evaluate each, then one table and plots",
        description="Train and evaluate every (row, seed) of STUDY.yaml (each an ordinary run "
                    "folder under STUDY_DIR/runs), then write STUDY_DIR/summary.md, summary.csv, "
                    "runs.csv and plots. Finished runs are skipped, stopped ones resumed; "
                    "rerunning a finished study only re-aggregates.")
    study.add_argument("study", metavar="STUDY.yaml")
    study.add_argument("-j", "--jobs", type=int, default=1,
                       help="runs at a time, each with its share of the CPU threads or one GPU")
    study.add_argument("--out", help="study folder (default: studies/<name>)")
    mode = study.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true",
                      help="print one command per run and write a Slurm array script")
    mode.add_argument("--run", metavar="NAME|INDEX", help="bring only this run to done")
    mode.add_argument("--aggregate", action="store_true",
                      help="only collect the records into the table and plots")
    study.set_defaults(func=_cmd_study)

    avg = commands.add_parser(
        "average", help="the epoch average of a run's per-epoch checkpoints",
        description="Average RUN_DIR/epoch-NNN.pt (kept with train.save_every=1) as the paper's "
                    "final step does: avg <- the weights of epoch START, then avg <- (1 - tau) w_e "
                    "+ tau avg for each later epoch up to END, over the whole state dict. Gives "
                    "the same weights as train.epoch_avg_tau kept online.")
    avg.add_argument("run_dir", metavar="RUN_DIR")
    avg.add_argument("--tau", type=float, default=0.9)
    avg.add_argument("--start", type=int, default=1)
    avg.add_argument("--end", type=int, help="default: the last saved epoch")
    avg.add_argument("--out", required=True, help="output checkpoint (must not exist)")
    avg.set_defaults(func=_cmd_average)

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
    """Run the CLI; user errors (and files that cannot be read or written) print one line to
    stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    print(f"advgkl: error: {' '.join(message.split())}", file=sys.stderr)
    return 2

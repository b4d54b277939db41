"""The `advgkl` argument parser: one small function per command. Each command's parser names
its handler (`func`), which `advgkl.cli` supplies."""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

from advgkl import __version__

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr, exit status 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"advgkl: error: {self.prog}: {message} (see {self.prog} --help)\n")


def batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or auto") from None


def add_meta_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("RobustBench metadata (left empty unless given)")
    group.add_argument("--link", default="", help="paper URL")
    group.add_argument("--paper-name", default="", help="paper title")
    group.add_argument("--authors", default="")
    group.add_argument("--venue", default="")
    group.add_argument("--additional-data", action="store_true",
                       help="trained with extra real data (RobustBench's additional_data)")
    group.add_argument("--reported", default="", help="robust accuracy the paper reports")
    group.add_argument("--footnote", default="")


def _config(commands, func: Handler) -> None:
    config = commands.add_parser(
        "config", help="print the resolved config (defaults < YAML < overrides)",
        description="Print the resolved config as YAML: defaults, then CONFIG, then overrides.")
    config.add_argument("config", metavar="CONFIG", help="YAML config file")
    config.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides, e.g. attack.eps=8/255 train.epochs=10")
    config.set_defaults(func=func)


def _train(commands, func: Handler) -> None:
    train = commands.add_parser(
        "train", help="adversarial training from a config (or resume a run)",
        description="Train CONFIG (with section.key=value overrides) into "
                    "run.out_dir/run.name (default checkpoints/<config name>/), or continue an "
                    "interrupted run from its last.pt with --resume RUN_DIR.")
    train.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from last.pt")
    train.set_defaults(func=func)


def _data(commands, convert: Handler, shards: Handler, corrupt_handler: Handler) -> None:
    data = commands.add_parser("data", help="prepare data (generated files, shards, corrupted "
                                            "copies)", description="Prepare data.")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    conv = data_commands.add_parser(
        "convert", help="stream an .npz (image, label) into a folder of .npy files",
        description="Stream SRC.npz (DM-AT's format: image (N, H, W, 3) uint8, label (N,); "
                    "compressed or not) chunk by chunk into OUT/image.npy and OUT/label.npy, "
                    "never holding the data in memory. Needs the data's size in free disk; "
                    "OUT must not exist. Uncompressed .npz files can also be trained on directly.")
    conv.add_argument("src", metavar="SRC.npz")
    conv.add_argument("out", metavar="OUT")
    conv.set_defaults(func=convert)
    shard = data_commands.add_parser(
        "shards", help="write an image folder's training images as WebDataset tar shards",
        description="Write ROOT/train/<class>/<image> into OUT/train-NNNNNN.tar (the files' "
                    "own bytes, in folder order) and OUT/train.json, the index train reads "
                    "with data.shards=OUT. A stopped run continues where it stopped: complete "
                    "shards are kept. Needs the split's size in free disk.")
    shard.add_argument("root", metavar="ROOT")
    shard.add_argument("--out", required=True, metavar="OUT")
    shard.add_argument("--dataset", choices=("imagenet", "folder"), default="imagenet",
                       help="imagenet: the class folders must be ImageNet's 1000 wnids")
    shard.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    shard.set_defaults(func=shards)
    corrupt = data_commands.add_parser(
        "corrupt", help="a corrupted copy of a data set's test points (imagecorruptions)",
        description="Corrupt the test points of --dataset (the digits, CIFAR-10/100; or ROOT/val "
                    "of an image folder, RobustBench's 5,000 ImageNet points) with every "
                    "corruption at severities 1-5 using the imagecorruptions package, in the "
                    "released sets' layouts (.npy blocks, or severity folders), with "
                    "OUT/index.json labelling the copy as generated: NOT the released sets, not "
                    "comparable to RobustBench's board. Needs pip install 'advgkl[corruptions]'. "
                    "The digits (16 px) are corrupted at 32 px and stored back at 16 px. A "
                    "stopped copy continues when rerun with the same options.")
    corrupt.add_argument("root", metavar="ROOT", nargs="?", default="data",
                         help="the data root: torchvision's folder, or an image folder's ROOT")
    corrupt.add_argument("--dataset", required=True,
                         choices=("digits", "cifar10", "cifar100", "imagenet", "folder"))
    corrupt.add_argument("--out", required=True, help="the new folder (e.g. data/digits-C)")
    corrupt.add_argument("--n", type=int, help="the first N test points (default: all; "
                                               "ImageNet: 5,000)")
    corrupt.add_argument("--corruptions", help="comma-separated (default: RobustBench's 15)")
    corrupt.add_argument("--seed", type=int, default=0)
    corrupt.set_defaults(func=corrupt_handler)


def _eval(commands, func: Handler) -> None:
    ev = commands.add_parser(
        "eval", help="AutoAttack evaluation and RobustBench records",
        description="Evaluate CHECKPOINT on the first N test images (torchvision order, as "
                    "RobustBench; on ImageNet RobustBench's 5,000 validation ids) with standard "
                    "AutoAttack (pyautoattack), or a quick, clearly labelled non-standard check. "
                    "Under torchrun each process evaluates a contiguous shard and rank 0 merges "
                    "them.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                    help="an advgkl checkpoint (or give --robustbench NAME instead)")
    ev.add_argument("--robustbench", metavar="NAME",
                    help="a RobustBench model-zoo entry instead, loaded by RobustBench's own "
                         "loader for --dataset (default cifar10) and threat --norm")
    ev.add_argument("--model-dir", default="models",
                    help="RobustBench's weights folder (MODEL_DIR/<dataset>/<threat>/NAME.pt)")
    ev.add_argument("--dataset", choices=("cifar10", "cifar100", "digits", "imagenet", "folder"),
                    help="default: the checkpoint's training data")
    ev.add_argument("--n-examples", type=int,
                    help="default: 5,000 on ImageNet (RobustBench's), else 10,000")
    ev.add_argument("--eps", help="e.g. 8/255 (Linf) or 0.5 (L2); default 4/255 on ImageNet, "
                                  "else 8/255")
    ev.add_argument("--norm", choices=("Linf", "L2"),
                    help="the Lp board (default Linf); or give the boards with --threat")
    ev.add_argument("--threat", action="append", metavar="BOARD",
                    choices=("Linf", "L2", "corruptions", "corruptions_3d"),
                    help="RobustBench's board: Linf, L2 (AutoAttack), corruptions (CIFAR-10-C, "
                         "CIFAR-100-C, ImageNet-C; a generated copy for other data) or "
                         "corruptions_3d (ImageNet-3DCC); repeat it to score several boards "
                         "in one command, each with its own records")
    corr = ev.add_argument_group("corruption boards")
    corr.add_argument("--corruptions-dir", metavar="DIR",
                      help="the corrupted sets (default: DATA_ROOT/CIFAR-10-C, CIFAR-100-C, "
                           "ImageNet-C, ImageNet-3DCC or digits-C)")
    corr.add_argument("--corruptions", metavar="A,B",
                      help="only these corruptions: a partial, NON-STANDARD evaluation")
    ev.add_argument("--version", choices=("standard", "plus", "rand", "custom"),
                    default="standard")
    ev.add_argument("--attacks", help="comma-separated, with --version custom")
    ev.add_argument("--quick", metavar="KIND",
                    help="non-standard check instead: pgd-K (CE), cw-K, or apgd (APGD-CE + APGD-T)")
    ev.add_argument("--sanity", nargs="?", type=int, const=500, default=0, metavar="N",
                    help="first run the sanity battery (eps sweep to an unbounded attack, FGSM "
                         "vs PGD, more steps and restarts, noise vs PGD; after the attack the "
                         "PGD-to-AutoAttack gap) on the first N points (default 500); its rows "
                         "go into the detailed record")
    ev.add_argument("--batch-size", type=batch_size, default=500,
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
    ev.add_argument("--data-root", help="default: data, or the image folder the checkpoint "
                                        "was trained on (ROOT with ROOT/val)")
    ev.add_argument("--preprocessing", help="image folders: RobustBench's preprocessing name "
                                            "(default: the checkpoint's data.preprocessing, or "
                                            "the zoo entry's)")
    ev.add_argument("--shard", metavar="I/N", help="evaluate shard I of N (without torchrun)")
    add_meta_options(ev)
    ev.set_defaults(func=func)


def _eval_merge(commands, func: Handler) -> None:
    merge = commands.add_parser(
        "eval-merge", help="merge shard results exactly (counts, not percentages)",
        description="Merge NAME.shard-I-of-N.json files into NAME.json and NAME.detailed.json.")
    merge.add_argument("shards", nargs="+", metavar="SHARD.json")
    merge.add_argument("--out", default="results")
    merge.add_argument("--model-name")
    add_meta_options(merge)
    merge.set_defaults(func=func)


def _export(commands, func: Handler) -> None:
    export = commands.add_parser(
        "export", help="write a RobustBench New Model submission bundle",
        description="Write the plain state dict RobustBench's class loads with strict=True "
                    "(verified), its sha256, the model_info JSON, the model-zoo entry and the "
                    "New Model issue text.")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("--eval", required=True, metavar="NAME.json", action="append",
                        help="the model_info JSON `advgkl eval` wrote for this checkpoint; on "
                             "ImageNet give the corruptions and corruptions_3d records both to "
                             "merge them into one model_info")
    export.add_argument("--threat", choices=("Linf", "L2", "corruptions"),
                        help="the board the bundle is for (default: the record's); a record of "
                             "another board is refused")
    export.add_argument("--out", required=True, help="empty or new folder")
    export.add_argument("--allow-partial", action="store_true",
                        help="export an evaluation on fewer points than the leaderboard's "
                             "(10,000; 5,000 on ImageNet), marked partial")
    export.set_defaults(func=func)


def _study(commands, func: Handler) -> None:
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
    study.set_defaults(func=func)


def _average(commands, func: Handler) -> None:
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
    avg.set_defaults(func=func)


def _import_checkpoint(commands, func: Handler) -> None:
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
    imp.set_defaults(func=func)


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The whole parser; `handlers` maps each command (and "data convert" / "data shards") to
    the function that runs it."""
    parser = Parser(
        prog="advgkl", description="Adversarial training with GKL/IKL and AutoAttack evaluation.")
    parser.add_argument("--version", action="version", version=f"advgkl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _config(commands, handlers["config"])
    _train(commands, handlers["train"])
    _data(commands, handlers["data convert"], handlers["data shards"], handlers["data corrupt"])
    _eval(commands, handlers["eval"])
    _eval_merge(commands, handlers["eval-merge"])
    _export(commands, handlers["export"])
    _study(commands, handlers["study"])
    _average(commands, handlers["average"])
    _import_checkpoint(commands, handlers["import-checkpoint"])
    return parser

"""The `advgkl eval` job: checkpoint -> the first n test points -> evaluation -> records.

Records go to OUT/<dataset>/<Linf|L2>/: NAME.json (RobustBench model_info, standard AutoAttack
only), NAME.detailed.json (everything behind the number), NAME.log (AutoAttack's log). A
non-standard evaluation (another AutoAttack version, or --quick) writes only NAME.<kind>.json,
labelled as such. Sharded runs write
NAME.shard-I-of-N.json each; under torchrun rank 0 merges them, else `advgkl eval-merge` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from advgkl.checkpoint import default_weights, load_checkpoint, sha256_file
from advgkl.data.folders import (FOLDER_DATASETS, check_preprocessing, default_points,
                                 folder_classes, load_points)
from advgkl.data.tensors import NUM_CLASSES, as_float, load_split, to_unit_float
from advgkl.errors import UserError, check_plain_name
from advgkl.evaluation import sanity
from advgkl.evaluation.autoattack import (APGD_ONLY, EvalResult, check_eps, evaluate_autoattack,
                                          merge_results, resolve_attacks)
from advgkl.evaluation.leaderboard import detailed_record, model_info, write_new
from advgkl.evaluation.quick import evaluate_pgd
from advgkl.evaluation.speed import probe_batch_size, speed_up
from advgkl.evaluation.subject import Subject, selection_of, training_of
from advgkl.machine import describe_machine
from advgkl.models.loading import model_from_checkpoint
from advgkl.models.zoo import load_zoo_model


@dataclass
class EvalJob:
    checkpoint: str | None              # an advgkl checkpoint, or None with `robustbench`
    dataset: str | None = None
    n_examples: int | None = None       # None: 5,000 on ImageNet (RobustBench's), else 10,000
    eps: float | None = None            # None: 4/255 on ImageNet, else 8/255 (Linf)
    norm: str = "Linf"
    version: str = "standard"
    attacks: list[str] | None = None
    quick: str | None = None            # "pgd-K", "cw-K" or "apgd": non-standard checks
    batch_size: int | None = 500        # None: the largest that fits, found by a short probe
    seed: int = 0
    state: str | None = None
    model_name: str | None = None
    out: str = "results"
    weights: str = "auto"
    device: str = "auto"
    data_root: str | None = None        # None: "data", or an image folder's training root
    preprocessing: str | None = None    # image folders: None = the model's own (recorded)
    shard: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    robustbench: str | None = None      # a RobustBench model-zoo entry instead of a checkpoint
    model_dir: str = "models"           # where RobustBench keeps (and downloads) zoo weights
    precision: str = "fp32"             # "bf16": autocast screening, NON-STANDARD
    channels_last: bool = False         # speed only: what AutoAttack computes is unchanged
    compile: bool = False
    cudnn_benchmark: bool = False
    compare_with: str | None = None     # a detailed record of the same points: list differing flags
    sanity: int = 0                     # run the sanity battery on the first N points first
    corruptions_dir: str | None = None  # corruption boards: the sets (default DATA/<its folder>)
    corruptions: list[str] | None = None  # corruption boards: a subset (a partial evaluation)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def _torchrun_shard() -> tuple[int, int] | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]), world) if world > 1 else None


@dataclass
class ShardPlan:
    """Which points this process evaluates: [first, end) of shard `shard` (None: all), with its
    own state file; under torchrun the process group is joined here."""

    shard: tuple[int, int] | None
    first: int
    end: int
    state: str | None


def plan_shard(job: EvalJob, n: int) -> ShardPlan:
    shard = job.shard or _torchrun_shard()
    state = job.state
    if shard and state:
        state = f"{state}.shard-{shard[0]}-of-{shard[1]}"
    if shard and job.shard is None and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(hours=48))  # a shard of AutoAttack takes hours
    if not shard:
        return ShardPlan(None, 0, n, state)
    return ShardPlan(shard, shard[0] * n // shard[1], (shard[0] + 1) * n // shard[1], state)


def refuse_existing(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.exists():
            raise UserError(f"{path} already exists; pick another --model-name or --out "
                            "(nothing was overwritten)")


def finish_shard(plan: ShardPlan, record: dict, paths: dict[str, Path], out_dir: Path, name: str,
                 merge: Callable[[list[Path]], Any]) -> Any:
    """Write this shard's record; under torchrun rank 0 then merges every shard's with `merge`
    (returning its result; None on the other ranks and without torchrun)."""
    write_new(paths["shard"], json.dumps(record, indent=2) + "\n")
    if not dist.is_initialized():
        return None
    dist.barrier()
    merged = None
    if dist.get_rank() == 0:
        merged = merge([out_dir / f"{name}.shard-{i}-of-{plan.shard[1]}.json"
                        for i in range(plan.shard[1])])
    dist.barrier()
    dist.destroy_process_group()
    return merged


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available")
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _run(job: EvalJob, model, x, y, device, first: int, log_path: Path | None,
         state: str | None, batch: int) -> EvalResult:
    progress = not dist.is_initialized() or dist.get_rank() == 0
    if job.quick is None:
        return evaluate_autoattack(model, x, y, eps=job.eps, norm=job.norm, version=job.version,
                                   attacks=job.attacks, batch_size=batch, seed=job.seed,
                                   state_path=state, device=device, log_path=log_path,
                                   progress=progress, first_index=first, precision=job.precision)
    if job.quick == "apgd":
        return evaluate_autoattack(
            model, x, y, eps=job.eps, norm=job.norm, version="custom", attacks=APGD_ONLY,
            batch_size=batch, seed=job.seed, state_path=state, device=device,
            log_path=log_path, progress=progress, first_index=first,
            label="APGD-CE + APGD-T screening, NON-STANDARD (not AutoAttack)")
    kind, steps = _quick_pgd(job.quick)
    torch.manual_seed(job.seed)
    return evaluate_pgd(model, x, y, eps=job.eps, norm=job.norm, steps=steps,
                        loss="ce" if kind == "pgd" else "cw", batch_size=batch,
                        device=device, progress=progress, first_index=first)


def _quick_pgd(quick: str) -> tuple[str, int]:
    """--quick pgd-K / cw-K -> (kind, K)."""
    kind, _, steps = quick.partition("-")
    if kind not in ("pgd", "cw") or not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--quick {quick!r}: expected pgd-K, cw-K or apgd")
    return kind, int(steps)


def check_job(job: EvalJob) -> None:
    """Every option of `job` that can be checked without the checkpoint or the data."""
    if job.eps is not None:
        check_eps(job.eps, job.norm)
    if job.preprocessing is not None:
        check_preprocessing(job.preprocessing)
    if job.model_name is not None:
        check_plain_name(job.model_name, "--model-name")
    if (job.checkpoint is None) == (job.robustbench is None):
        raise UserError("give a CHECKPOINT or --robustbench NAME (one of them)")
    if any(v is not None and v < 1 for v in (job.n_examples, job.batch_size)):
        raise UserError("--n-examples and --batch-size must be at least 1")
    if job.precision == "bf16" and job.quick is not None:
        raise UserError("--precision bf16 is a screening mode of AutoAttack; not with --quick")
    if job.compare_with:
        read_record(Path(job.compare_with))  # a bad path fails now, not after the evaluation
    if job.sanity and job.shard is not None:
        raise UserError("--sanity checks a whole evaluation; run it without --shard")
    if job.quick is None:
        resolve_attacks(job.version, job.attacks)
    elif job.quick != "apgd":
        _quick_pgd(job.quick)


def _selection_footnote(selection: dict | None) -> str:
    if not selection or not selection.get("on_test_points"):
        return ""
    return (f"Checkpoint selected by {selection['metric']} on the first "
            f"{selection['points'].split('-')[-1]} test points, which this evaluation includes.")


def output_paths(out_dir: Path, name: str, kind: str,
                 shard: tuple[int, int] | None) -> dict[str, Path]:
    """Where records go; `kind` is "standard" or the non-standard evaluation's name."""
    if shard is not None:
        return {"shard": out_dir / f"{name}.shard-{shard[0]}-of-{shard[1]}.json"}
    if kind != "standard":
        return {"detailed": out_dir / f"{name}.{kind}.json"}
    return {"info": out_dir / f"{name}.json", "detailed": out_dir / f"{name}.detailed.json",
            "log": out_dir / f"{name}.log"}


def write_records(result: EvalResult, base: dict, paths: dict[str, Path],
                  meta: dict[str, Any]) -> None:
    """The final records of an evaluation (merged, when sharded); `base` is a detailed record of
    the same checkpoint and settings."""
    detailed = {"kind": base["kind"], **detailed_record(
        result, dataset=base["dataset"], arch=base["architecture"], checkpoint=base["checkpoint"],
        checkpoint_sha256=base["checkpoint_sha256"], weights=base["weights"],
        config=base["config"]),
        **{key: base.get(key) for key in ("selection", "training", "speed", "machine", "data",
                                          "flags_vs_reference", "sanity")}}
    write_new(paths["detailed"], json.dumps(detailed, indent=2) + "\n")
    if "info" in paths:
        warning = _selection_footnote(detailed["selection"])
        if warning:
            meta = {**meta, "footnote": " ".join(filter(None, (meta.get("footnote"), warning)))}
        info = model_info(result, dataset=detailed["dataset"], arch=detailed["architecture"],
                          meta=meta)
        write_new(paths["info"], json.dumps(info, indent=2) + "\n")
    if "log" in paths and partial_log(paths["log"]).exists():
        os.replace(partial_log(paths["log"]), paths["log"])


def partial_log(log: Path) -> Path:
    """Where AutoAttack's log grows until the records are written: a killed run leaves no NAME.log
    to block its rerun, and the rerun (with --state) appends to it."""
    return log.with_name(log.name + ".partial")


def load_subject(job: EvalJob) -> Subject:
    """The model to evaluate and its description: an advgkl checkpoint's weights, or a RobustBench
    zoo entry loaded by RobustBench."""
    if job.robustbench is not None:
        dataset = job.dataset or "cifar10"
        model, zoo = load_zoo_model(job.robustbench, dataset=dataset, threat=job.norm,
                                    model_dir=job.model_dir)
        inner = getattr(model, "model", model)   # behind RobustBench's normalize_model
        return Subject(model, dataset, type(inner).__name__,
                       f"robustbench:{dataset}/{job.norm}/{job.robustbench}",
                       zoo["weights_sha256"], "zoo", {"robustbench": zoo}, None, job.robustbench,
                       preprocessing=zoo["preprocessing"], data_root=job.data_root)
    ckpt = load_checkpoint(job.checkpoint)
    config = ckpt.get("config") or {}
    data = config.get("data") or {}
    dataset = job.dataset or data.get("dataset")
    if dataset not in (*NUM_CLASSES, *FOLDER_DATASETS):
        raise UserError(f"--dataset: give one of {', '.join((*NUM_CLASSES, *FOLDER_DATASETS))} "
                        "(the checkpoint does not say which data it was trained on)")
    root = job.data_root or (data.get("root") if dataset == data.get("dataset") else None)
    classes = (folder_classes(dataset, root) if dataset in FOLDER_DATASETS
               else NUM_CLASSES[dataset])
    if classes != ckpt.get("num_classes"):
        raise UserError(f"the checkpoint has {ckpt.get('num_classes')} classes, {dataset} has "
                        f"{classes}")
    weights = default_weights(ckpt) if job.weights == "auto" else job.weights
    model = model_from_checkpoint(ckpt, what=job.checkpoint, weights=weights)
    return Subject(model, dataset, ckpt["arch"], job.checkpoint, sha256_file(job.checkpoint),
                   weights, config, selection_of(ckpt, job.checkpoint),
                   Path(job.checkpoint).resolve().parent.name, training_of(ckpt),
                   preprocessing=data.get("preprocessing"), data_root=root)


def read_test_points(job: EvalJob, subject: Subject, first: int, end: int
                     ) -> tuple[Tensor, Tensor, dict]:
    """Points [first, end) of the test set: floats for the in-memory sets, uint8 after the
    model's preprocessing for image folders; and what the records say about them."""
    dataset = subject.dataset
    if dataset not in FOLDER_DATASETS:
        if job.preprocessing:
            raise UserError(f"--preprocessing is for image folders (imagenet, folder); {dataset} "
                            "images are used as they are")
        test = load_split(dataset, train=False, root=job.data_root or "data")
        if job.n_examples > len(test.labels):
            raise UserError(f"--n-examples {job.n_examples} is more than the {len(test.labels)} "
                            f"test images of {dataset}")
        return to_unit_float(test.images[first:end]), test.labels[first:end], {}
    prep = job.preprocessing or subject.preprocessing
    if prep is None:
        raise UserError(f"--preprocessing: {subject.checkpoint} does not say how its images are "
                        "preprocessed; give one (e.g. Res256Crop224)")
    root = subject.data_root or "data"
    points = load_points(root, dataset, end, prep, first=first)
    return points.images, points.labels, {"preprocessing": prep, "data_root": str(root),
                                          "points": ("RobustBench's ImageNet ids"
                                                     if dataset == "imagenet" else
                                                     "ROOT/val in sorted order")}


def run_eval_job(job: EvalJob) -> tuple[EvalResult, dict[str, Path]]:
    """Evaluate (one shard of) a checkpoint and write its records."""
    check_job(job)
    subject = load_subject(job)
    device = resolve_device(job.device)
    model, dataset = subject.model.to(device).eval(), subject.dataset
    default_eps = (4 if dataset == "imagenet" else 8) / 255
    job = replace(job, eps=default_eps if job.eps is None else job.eps,
                  n_examples=job.n_examples or default_points(dataset, subject.data_root))
    if job.compare_with and (job.shard or _torchrun_shard()):
        raise UserError("--compare-with compares whole evaluations; compare the merged record")
    plan = plan_shard(job, job.n_examples)
    shard, first, end, state = plan.shard, plan.first, plan.end, plan.state
    name = job.model_name or subject.name
    out_dir = Path(job.out) / dataset / job.norm
    kind = job.quick or (job.version if job.precision == "fp32" else f"{job.version}-bf16")
    paths = output_paths(out_dir, name, kind, shard)
    final = output_paths(out_dir, name, kind, None)
    refuse_existing([*paths.values(), *(final.values() if job.shard is None else ())])
    x, y, points = read_test_points(job, subject, first, end)  # read before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    log = paths.get("log")
    if log is not None and not (state and Path(state).exists()):
        partial_log(log).unlink(missing_ok=True)  # a stopped run's log, with nothing to continue

    model, speed = speed_up(model, device, channels_last=job.channels_last, compile=job.compile,
                            cudnn_benchmark=job.cudnn_benchmark)
    batch = job.batch_size or probe_batch_size(model, as_float(x[:1]), device, limit=len(y))
    speed.update(batch_size=batch, batch_size_probed=job.batch_size is None,
                 precision=job.precision)
    checks = (sanity.before_attack(model, x[:job.sanity], y[:job.sanity], eps=job.eps,
                                   norm=job.norm, batch_size=batch, device=device,
                                   attack=job.quick or "AutoAttack") if job.sanity else None)
    result = _run(job, model, x, y, device, first, log and partial_log(log), state, batch)
    detailed = {"kind": kind, **detailed_record(
        result, dataset=dataset, arch=subject.arch, checkpoint=subject.checkpoint,
        checkpoint_sha256=subject.sha256, weights=subject.weights, config=subject.config),
        "selection": subject.selection, "training": subject.training, "speed": speed,
        "machine": describe_machine(device), "sanity": checks and sanity.after_attack(
            checks, None if job.quick else result.robust_flags,
            sum(a["seconds"] for a in result.per_attack)),
        "data": points or None,
        "flags_vs_reference": (compare_flags(result, job.compare_with) if job.compare_with
                               else None)}
    if shard is None:
        write_records(result, detailed, paths, job.meta)
        return result, paths
    torchrun = dist.is_initialized()
    merged = finish_shard(plan, detailed, paths, out_dir, name,
                          lambda files: merge_shard_files(files, final, job.meta))
    return (merged or result, final) if torchrun else (result, paths)


def compare_flags(result: EvalResult, reference: str) -> dict[str, Any]:
    """Where `result`'s robust flags differ from those of the detailed record `reference` on the
    same points (global indices)."""
    ref = EvalResult.from_dict(read_record(Path(reference))["result"])
    if (ref.first_index, ref.n_examples, ref.eps, ref.norm) != (
            result.first_index, result.n_examples, result.eps, result.norm):
        raise UserError(f"--compare-with {reference}: evaluated other points, eps or norm")
    differ = [result.first_index + i for i, (a, b) in
              enumerate(zip(result.robust_flags, ref.robust_flags)) if a != b]
    return {"reference": str(reference), "reference_label": ref.label, "differ": len(differ),
            "points": differ, "robust_acc_difference": result.robust_acc - ref.robust_acc}


def read_record(path: Path) -> dict:
    """A detailed (shard) record written by `advgkl eval`."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a JSON record of advgkl eval") from None
    if not isinstance(record, dict) or not {"result", "first_index", "dataset",
                                             "checkpoint_sha256"} <= set(record):
        raise UserError(f"{path}: not a record of advgkl eval (no result, dataset or checkpoint)")
    return record


def read_shard_records(files: Sequence[Path]) -> list[dict]:
    """The shard records of one evaluation, in point order; shards of different checkpoints
    are refused."""
    records = sorted((read_record(Path(f)) for f in files), key=lambda r: r["first_index"])
    if len({r["checkpoint_sha256"] for r in records}) > 1:
        raise UserError("the shards evaluated different checkpoints; they cannot merge")
    return records


def merge_shard_files(files: Sequence[Path], paths: dict[str, Path],
                      meta: dict[str, Any]) -> EvalResult:
    """Merge shard records (same checkpoint and settings) into the final records."""
    records = read_shard_records(files)
    result = merge_results([EvalResult.from_dict(r["result"]) for r in records])
    write_records(result, records[0], paths, meta)
    return result

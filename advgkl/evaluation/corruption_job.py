"""`advgkl eval --threat corruptions | corruptions_3d`: a checkpoint (or a zoo entry) on one of
RobustBench's corruption boards, from the corrupted sets as released (or a copy made by
`advgkl data corrupt`, labelled as such), resumable per cell, sharded by points.

Records go to OUT/<dataset>/<corruptions|corruptions_3d>/: NAME.json (RobustBench's corruptions
model_info: the released sets, every corruption, fp32 only), NAME.detailed.json, NAME.cells.csv and
NAME.heatmap.png; anything else is non-standard and writes NAME.<kind>.json (+ .cells.csv,
.heatmap.png) only. Shards write NAME.shard-I-of-N.json; rank 0 (torchrun) or `advgkl eval-merge`
merges them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from advgkl import __version__
from advgkl.data.corrupted import (GENERATED_NOTE, check_folder_set, check_npy_set, folder_cell,
                                   layout, npy_cell, read_index)
from advgkl.data.folders import default_points
from advgkl.data.tensors import Split
from advgkl.errors import UserError
from advgkl.evaluation.corruption_records import write_records
from advgkl.evaluation.corruptions import (Board, CorruptionResult, board_for, choose_corruptions,
                                           evaluate_corruptions, merge_corruption_results)
from advgkl.evaluation.job import (EvalJob, check_job, finish_shard, load_subject, plan_shard,
                                   read_shard_records, read_test_points, refuse_existing,
                                   resolve_device)
from advgkl.evaluation.speed import speed_up
from advgkl.machine import describe_machine

IMAGENET_CELLS = "Res224"   # RobustBench's benchmark: "for corruptions ... only resizing to 224"


def check_corruption_job(job: EvalJob) -> None:
    """What the corruption boards do not take."""
    if job.quick or job.version != "standard" or job.attacks:
        raise UserError("--quick, --version and --attacks choose attacks; the corruption boards "
                        "run none")
    if job.sanity or job.compare_with:
        raise UserError("--sanity and --compare-with check attacks; not with the corruption boards")


def output_paths(out_dir: Path, name: str, kind: str,
                 shard: tuple[int, int] | None) -> dict[str, Path]:
    if shard is not None:
        return {"shard": out_dir / f"{name}.shard-{shard[0]}-of-{shard[1]}.json"}
    stem = name if kind == "standard" else f"{name}.{kind}"
    paths = {"detailed": out_dir / f"{stem}.{'detailed.json' if kind == 'standard' else 'json'}",
             "csv": out_dir / f"{stem}.cells.csv", "heatmap": out_dir / f"{stem}.heatmap.png"}
    if kind == "standard":
        paths["info"] = out_dir / f"{name}.json"
    return paths


def _cells(board: Board, folder: Path, corruptions: tuple[str, ...], index: dict | None,
           preprocessing: str | None):
    """(images per severity, a reader of the cells) of the corrupted sets in `folder`."""
    if layout(folder) == "npy":
        block = check_npy_set(folder, corruptions, board.block if index is None else None)
        return block, lambda c, s, first, end: npy_cell(folder, c, s, first, end, block)
    if board.dataset not in ("imagenet", "folder"):
        raise UserError(f"{folder}: no labels.npy; {board.dataset}'s corruptions are .npy blocks")
    prep = IMAGENET_CELLS if board.dataset == "imagenet" else preprocessing
    if prep is None:
        raise UserError("--preprocessing: give the model's (e.g. Res40Crop32) for the folders")
    workers = min(4, os.cpu_count() or 1)
    points = index["settings"]["points"] if index else default_points(board.dataset, None)
    return points, lambda c, s, first, end: folder_cell(folder, board.dataset, c, s, first, end,
                                                        prep, workers=workers)


def record_kind(released: bool, partial: bool, precision: str) -> str:
    """"standard" (the released sets, every corruption, fp32: the records RobustBench takes), or
    what makes the evaluation non-standard, e.g. "generated-partial"."""
    parts = [p for p, on in (("generated", not released), ("partial", partial),
                             ("bf16", precision == "bf16")) if on]
    return "-".join(parts) or "standard"


def _label(board: Board, kind: str) -> str:
    label = (f"common corruptions ({board.folder}, RobustBench's {board.threat} board)"
             if board.released else f"common corruptions ({board.folder})")
    notes = {"generated": f"generated corruptions, {GENERATED_NOTE}",
             "partial": "a subset of the corruptions", "bf16": "bf16 autocast screening"}
    extra = [notes[p] for p in kind.split("-") if p in notes]
    return label + (f", NON-STANDARD: {'; '.join(extra)}" if extra else "")


def run_corruption_job(job: EvalJob, threat: str) -> tuple[CorruptionResult, dict[str, Path]]:
    """Evaluate (one shard of) a checkpoint on the corruption board `threat`; write records."""
    check_corruption_job(job)
    check_job(job)
    subject = load_subject(job)
    board = board_for(subject.dataset, threat)
    folder = Path(job.corruptions_dir or Path(job.data_root or subject.data_root or "data")
                  / board.folder)
    index = read_index(folder)
    if index is None and not board.released:
        raise UserError(f"{folder}: {board.dataset} has no released corruption set; make a copy "
                        f"with `advgkl data corrupt --dataset {board.dataset} --out {folder}`")
    # a generated copy's own corruptions by default (`advgkl data corrupt --corruptions`)
    corruptions = choose_corruptions(board, job.corruptions or (
        index["settings"]["corruptions"] if index else None))
    points, read_cell = _cells(board, folder, corruptions, index,
                               job.preprocessing or subject.preprocessing)
    n = job.n_examples or points
    if n > points:
        raise UserError(f"--n-examples {n}: {folder} has {points} points per cell")
    job = replace(job, n_examples=n)
    plan = plan_shard(job, n)
    kind = record_kind(index is None, len(corruptions) < len(board.corruptions), job.precision)
    name = job.model_name or subject.name
    out_dir = Path(job.out) / subject.dataset / threat
    paths = output_paths(out_dir, name, kind, plan.shard)
    final = output_paths(out_dir, name, kind, None)
    refuse_existing([*paths.values(), *(final.values() if job.shard is None else ())])
    if layout(folder) == "folders":
        check_folder_set(folder, board.dataset, corruptions, plan.end)
    x, y, clean_points = read_test_points(job, subject, plan.first, plan.end)
    device = resolve_device(job.device)
    model, speed = speed_up(subject.model.to(device).eval(), device,
                            channels_last=job.channels_last, compile=job.compile,
                            cudnn_benchmark=job.cudnn_benchmark)
    batch = job.batch_size or 500
    speed.update(batch_size=batch, precision=job.precision)
    result = evaluate_corruptions(
        model, Split(x, y), lambda c, s: read_cell(c, s, plan.first, plan.end), threat=threat,
        dataset=subject.dataset, corruptions=corruptions, batch_size=batch, device=device,
        data_id=f"{folder.resolve()} {index['created'] if index else 'released'}",
        state_path=plan.state,
        first_index=plan.first, precision=job.precision, label=_label(board, kind),
        progress=not dist.is_initialized() or dist.get_rank() == 0)
    base = _base(subject, kind, speed, device, folder, index, clean_points)
    if plan.shard is None:
        write_records(result, base, paths, job.meta)
        return result, paths
    torchrun = dist.is_initialized()
    merged = finish_shard(plan, {**base, "result": result.to_dict(), "first_index": plan.first},
                          paths, out_dir, name, lambda files: merge_files(files, final, job.meta))
    return (merged or result, final) if torchrun else (result, paths)


def _base(subject: Any, kind: str, speed: dict, device: torch.device,
          folder: Path, index: dict | None, clean_points: dict) -> dict[str, Any]:
    """What a record says besides the numbers."""
    data = {"corruptions_dir": str(folder), "released": index is None,
            "generated": index, "clean_points": clean_points or None,
            "cells_preprocessing": IMAGENET_CELLS if subject.dataset == "imagenet" else None}
    return {"kind": kind, "dataset": subject.dataset, "architecture": subject.arch,
            "weights": subject.weights,
            "checkpoint": subject.checkpoint, "checkpoint_sha256": subject.sha256,
            "config": dict(subject.config or {}), "selection": subject.selection,
            "training": subject.training, "speed": speed, "machine": describe_machine(device),
            "data": data, "partial_corruptions": "partial" in kind,
            "versions": {"advgkl": __version__, "torch": torch.__version__}}


def merge_files(files: list[Path], paths: dict[str, Path],
                meta: dict[str, Any]) -> CorruptionResult:
    """Merge shard records of one corruption evaluation into its final records."""
    records = read_shard_records(files)
    result = merge_corruption_results([CorruptionResult.from_dict(r["result"]) for r in records])
    base = {k: v for k, v in records[0].items() if k not in ("result", "first_index")}
    write_records(result, base, paths, meta)
    return result

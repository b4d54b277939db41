"""`advgkl export`: the RobustBench New Model bundle of a checkpoint from its evaluation records:
the plain state dict RobustBench's class loads strictly (verified), its sha256, the model_info
JSON, the model-zoo entry and the issue text, for the Linf / L2 board or the corruptions board
(on ImageNet one model_info holds both ImageNet-C's and ImageNet-3DCC's fields)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from advgkl.checkpoint import load_checkpoint, sha256_file
from advgkl.data.folders import crop_size
from advgkl.errors import UserError, check_plain_name
from advgkl.evaluation import corruption_records, leaderboard
from advgkl.evaluation.leaderboard import leaderboard_points, write_new
from advgkl.models.robustbench import export_for_robustbench, robustbench_constructor

CORRUPTION_BOARDS = ("corruptions", "corruptions_3d")


def read_records(eval_json: Path) -> tuple[dict, dict]:
    """(model_info, detailed record) of a record `advgkl eval` wrote."""
    check_plain_name(eval_json.stem, "--eval: the record's name, which the bundle's files take,")
    detailed_path = eval_json.with_name(eval_json.stem + ".detailed.json")
    if not eval_json.is_file() or not detailed_path.is_file():
        raise UserError(f"{eval_json}: needs the model_info JSON and its {detailed_path.name} "
                        "beside it, as `advgkl eval` writes them")
    return json.loads(eval_json.read_text()), json.loads(detailed_path.read_text())


def board_of(detailed: dict) -> str:
    return detailed.get("board") or detailed["result"]["norm"]


def _check_boards(paths: list[Path], boards: list[str], threat: str | None) -> bool:
    """The records make one bundle (one Lp record, or ImageNet's two corruption boards);
    returns whether it is the corruptions board's."""
    for path, board in zip(paths, boards):
        wanted = threat and (CORRUPTION_BOARDS if threat == "corruptions" else (threat,))
        if wanted and board not in wanted:
            raise UserError(f"{path}: a record of the {board} board; --threat {threat} exports "
                            f"{threat} records")
    corruption = [b in CORRUPTION_BOARDS for b in boards]
    if any(corruption) and not all(corruption):
        raise UserError("--eval: a bundle is for one board; give Linf / L2 and corruption "
                        "records to separate exports")
    if len(set(boards)) != len(boards) or (not any(corruption) and len(boards) > 1):
        raise UserError("--eval: one record per board (on ImageNet: corruptions and "
                        "corruptions_3d)")
    return all(corruption)


def _robustbench_order(info: dict) -> dict:
    """The fields in the order of RobustBench's corruptions files: ImageNet-3DCC's before
    ImageNet-C's, the footnote last."""
    corruption = ("corruptions_acc_3d", "corruptions_mce_3d", "corruptions_acc",
                  "corruptions_mce")
    return {**{k: v for k, v in info.items() if k not in (*corruption, "footnote")},
            **{k: info[k] for k in (*corruption, "footnote") if k in info}}


def export_submission(checkpoint: str | os.PathLike, eval_json: Any, out_dir: str | os.PathLike,
                      *, allow_partial: bool = False, threat: str | None = None) -> Path:
    """Write the bundle for the records `eval_json` (a path, or a list of them) of
    `checkpoint` into the empty or new `out_dir`; returns the weights' path."""
    paths = [Path(p) for p in (eval_json if isinstance(eval_json, list) else [eval_json])]
    records = [read_records(p) for p in paths]
    corruption = _check_boards(paths, [board_of(d) for _, d in records], threat)
    sha256 = sha256_file(checkpoint)
    for path, (_, detailed) in zip(paths, records):
        if detailed["checkpoint_sha256"] != sha256:
            raise UserError(f"{checkpoint} is not the checkpoint {path.name} evaluated "
                            "(sha256 differs)")
    info, detailed = records[0]
    needed = leaderboard_points(detailed["dataset"])
    if corruption:
        partial = any([corruption_records.check_exportable(d, p, needed, allow_partial)
                       for p, (_, d) in zip(paths, records)])
        for other, _ in records[1:]:
            info = {**info, **{k: v for k, v in other.items() if k not in info}}
        info = _robustbench_order(info)
    else:
        partial = detailed["n_examples"] < needed
        if partial and not allow_partial:
            raise UserError(f"{paths[0].name} covers {detailed['n_examples']} points, "
                            f"RobustBench needs {needed}; pass --allow-partial to export it "
                            "marked partial")
    out_dir, name = Path(out_dir), paths[0].stem
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty (nothing was overwritten)")
    ckpt = load_checkpoint(checkpoint)
    prep = (detailed.get("data") or {}).get("preprocessing")
    state = export_for_robustbench(ckpt, weights=detailed["weights"],
                                   image_size=crop_size(prep) if prep else 32)
    if partial:
        info = {**info, "footnote": (info.get("footnote") + " " if info.get("footnote") else "")
                + f"PARTIAL: evaluated on {detailed['n_examples']} points."}
    weights_path = out_dir / f"{name}.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, weights_path)
    write_new(out_dir / f"{name}.pt.sha256", f"{sha256_file(weights_path)}  {name}.pt\n")
    write_new(out_dir / f"{name}.json", json.dumps(info, indent=2) + "\n")
    constructor = robustbench_constructor(ckpt["arch"], ckpt["num_classes"],
                                          ckpt.get("arch_kwargs"))
    zoo = corruption_records.zoo_entry if corruption else leaderboard.zoo_entry
    write_new(out_dir / "model_zoo_entry.py", zoo(name, constructor, info["dataset"], prep))
    issue = (corruption_records.new_model_issue(info, [d for _, d in records]) if corruption
             else leaderboard.new_model_issue(info, detailed, detailed["result"]["norm"], partial))
    write_new(out_dir / "new_model_issue.md", issue)
    return weights_path

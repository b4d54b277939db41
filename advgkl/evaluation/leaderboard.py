"""RobustBench records: the model_info JSON, the detailed result JSON, and the submission bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from advgkl import __version__
from advgkl.checkpoint import sha256_file
from advgkl.errors import UserError, check_plain_name
from advgkl.evaluation.autoattack import EvalResult
from advgkl.evaluation.sanity import autoattack_checks
from advgkl.models import WRN_PATTERN

LEADERBOARD_N = {"imagenet": 5_000}   # RobustBench's points per board; 10,000 elsewhere


def eps_text(eps: float, norm: str) -> str:
    """RobustBench writes Linf sizes as k/255."""
    k = round(eps * 255)
    return f"{k}/255" if norm == "Linf" and k / 255 == eps else f"{eps:g}"


def leaderboard_points(dataset: str) -> int:
    return LEADERBOARD_N.get(dataset, 10_000)


def architecture_name(arch: str) -> str:
    """RobustBench's display name: wrn-34-10 -> WideResNet-34-10, convstem-convnext-t ->
    ConvNeXt-T + ConvStem, timm:convnext_base -> convnext_base."""
    from advgkl.models.imagenet import display_name

    match = WRN_PATTERN.fullmatch(arch)
    return f"WideResNet-{match.group(1)}-{match.group(2)}" if match else display_name(arch)


def model_info(result: EvalResult, *, dataset: str, arch: str,
               meta: Mapping[str, Any]) -> dict[str, Any]:
    """RobustBench's model_info record; metadata not given stays empty, never invented."""
    if not result.standard:
        raise UserError(f"{result.label} is not standard AutoAttack; RobustBench's model_info "
                        "needs version standard")
    info = {"link": meta.get("link") or "", "name": meta.get("name") or "",
            "authors": meta.get("authors") or "",
            "additional_data": bool(meta.get("additional_data", False)),
            "number_forward_passes": 1, "dataset": dataset, "venue": meta.get("venue") or "",
            "architecture": architecture_name(arch), "eps": eps_text(result.eps, result.norm),
            "clean_acc": f"{100 * result.clean_acc:.2f}", "reported": meta.get("reported") or "",
            "autoattack_acc": f"{100 * result.robust_acc:.2f}",
            "footnote": meta.get("footnote") or ""}
    if dataset == "imagenet":   # the ImageNet board's records add `unreliable`, footnote optional
        info["unreliable"] = False
        if not info["footnote"]:
            del info["footnote"]
    return info


def detailed_record(result: EvalResult, *, dataset: str, arch: str, checkpoint: str | None,
                    checkpoint_sha256: str | None, weights: str,
                    config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Everything behind the number: per-attack accuracy and time, versions, checkpoint hash."""
    import pyautoattack

    return {
        "label": result.label, "dataset": dataset, "architecture": arch, "weights": weights,
        "n_examples": result.n_examples, "first_index": result.first_index,
        "clean_acc": result.clean_acc, "robust_acc": result.robust_acc,
        "per_attack": [{**a, "robust_acc": a["robust"] / result.n_examples}
                       for a in result.per_attack],
        "per_class": result.per_class(), "worst_class": result.worst_class(),
        "worst_case": "per point over all attacks: a point counts as robust only if every "
                      "attack failed on it (result.robust_flags)",
        "autoattack_checks": (None if result.version == "quick" else autoattack_checks(
            result.check_flags, result.attacks, result.version)),
        "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256,
        "versions": {"advgkl": __version__, "torch": torch.__version__,
                     "pyautoattack": pyautoattack.__version__},
        "config": dict(config or {}), "result": result.to_dict()}


def write_new(path: Path, text: str) -> None:
    """Write a new file; an existing one is never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise UserError(f"{path} already exists; pick another --model-name or --out "
                        "(nothing was overwritten)") from None


def zoo_entry(name: str, constructor: str, dataset: str, preprocessing: str | None = None) -> str:
    prep = f"    'preprocessing': '{preprocessing}',\n" if preprocessing else ""
    return (f"# Add to robustbench/model_zoo/{dataset}.py, in the Linf (or L2) OrderedDict:\n"
            f"('{name}', {{\n    'model': lambda: {constructor},\n"
            f"    'gdrive_id': '<upload {name}.pt and put its file id here>',\n{prep}}}),\n")


def new_model_issue(info: Mapping[str, Any], detailed: Mapping[str, Any], norm: str,
                    partial: bool) -> str:
    per_attack = "\n".join(f"  - after {a['attack']}: {100 * a['robust_acc']:.2f} % "
                           f"({a['seconds']:.0f} s)" for a in detailed["per_attack"])
    warning = ("\n**PARTIAL evaluation**: only the first "
               f"{detailed['n_examples']} test points, not "
               f"{leaderboard_points(info['dataset']):,}.\n" if partial else "")
    return f"""## New Model: {info['name'] or '<paper title>'}
{warning}
- **Paper**: {info['link'] or '<link>'} ({info['venue'] or '<venue>'})
- **Authors**: {info['authors'] or '<authors>'}
- **Architecture**: {info['architecture']}
- **Threat model**: {norm}, eps = {info['eps']}
- **Dataset**: {info['dataset']}
- **Additional data**: {info['additional_data']}
- **Clean accuracy**: {info['clean_acc']} %
- **Robust accuracy (AutoAttack, standard)**: {info['autoattack_acc']} %
- **Reported in the paper**: {info['reported'] or '<reported>'}
- **Evaluation**: standard AutoAttack (pyautoattack {detailed['versions']['pyautoattack']}),
  first {detailed['n_examples']} test points, seed {detailed['result']['seed']}, fp32, eval mode;
  per attack:
{per_attack}
- **Checkpoint**: sha256 {detailed['checkpoint_sha256']}
"""


def export_submission(checkpoint: str | os.PathLike, eval_json: str | os.PathLike,
                      out_dir: str | os.PathLike, *, allow_partial: bool = False) -> Path:
    """Write a RobustBench "New Model" bundle: the weights RobustBench's class loads strictly,
    their sha256, model_info JSON, model-zoo entry and issue text. Returns the weights path."""
    from advgkl.checkpoint import load_checkpoint
    from advgkl.data.folders import crop_size
    from advgkl.models.robustbench import export_for_robustbench, robustbench_constructor

    eval_json = Path(eval_json)
    check_plain_name(eval_json.stem, "--eval: the record's name, which the bundle's files take,")
    detailed_path = eval_json.with_name(eval_json.stem + ".detailed.json")
    if not eval_json.is_file() or not detailed_path.is_file():
        raise UserError(f"{eval_json}: needs the model_info JSON and its {detailed_path.name} "
                        "beside it, as `advgkl eval` writes them")
    info, detailed = json.loads(eval_json.read_text()), json.loads(detailed_path.read_text())
    if detailed["checkpoint_sha256"] != sha256_file(checkpoint):
        raise UserError(f"{checkpoint} is not the checkpoint {eval_json.name} evaluated "
                        "(sha256 differs)")
    needed = leaderboard_points(detailed["dataset"])
    partial = detailed["n_examples"] < needed
    if partial and not allow_partial:
        raise UserError(f"{eval_json.name} covers {detailed['n_examples']} points, RobustBench "
                        f"needs {needed}; pass --allow-partial to export it marked partial")
    out_dir, name = Path(out_dir), eval_json.stem
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
    write_new(out_dir / "model_zoo_entry.py", zoo_entry(name, constructor, info["dataset"], prep))
    write_new(out_dir / "new_model_issue.md",
              new_model_issue(info, detailed, detailed["result"]["norm"], partial))
    return weights_path

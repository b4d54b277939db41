"""RobustBench's Linf / L2 board: the model_info JSON, the detailed result JSON, and the
submission bundle's zoo entry and New Model issue text (written by `advgkl.evaluation.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from advgkl import __version__
from advgkl.errors import UserError
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


def info_head(meta: Mapping[str, Any], *, dataset: str, arch: str, eps: str | None,
              clean_acc: str) -> dict[str, Any]:
    """The fields every board's model_info opens with, in RobustBench's order; metadata not
    given stays empty, never invented."""
    return {"link": meta.get("link") or "", "name": meta.get("name") or "",
            "authors": meta.get("authors") or "",
            "additional_data": bool(meta.get("additional_data", False)),
            "number_forward_passes": 1, "dataset": dataset, "venue": meta.get("venue") or "",
            "architecture": architecture_name(arch), "eps": eps, "clean_acc": clean_acc,
            "reported": meta.get("reported") or ""}


def model_info(result: EvalResult, *, dataset: str, arch: str,
               meta: Mapping[str, Any]) -> dict[str, Any]:
    """RobustBench's model_info record; metadata not given stays empty, never invented."""
    if not result.standard:
        raise UserError(f"{result.label} is not standard AutoAttack; RobustBench's model_info "
                        "needs version standard")
    info = {**info_head(meta, dataset=dataset, arch=arch, eps=eps_text(result.eps, result.norm),
                        clean_acc=f"{100 * result.clean_acc:.2f}"),
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


def zoo_entry(name: str, constructor: str, dataset: str, preprocessing: str | None = None, *,
              where: str = "the Linf (or L2) OrderedDict") -> str:
    """The entry for RobustBench's model zoo file of `dataset`, to go `where`."""
    prep = f"    'preprocessing': '{preprocessing}',\n" if preprocessing else ""
    return (f"# Add to robustbench/model_zoo/{dataset}.py, in {where}:\n"
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

"""The records of a corruption evaluation: RobustBench's model_info in its corruptions form (the
fields and order of RobustBench's model_info/<dataset>/corruptions/*.json), the detailed record
with the per-cell table, the same table as CSV, a heatmap (corruption x severity, clean as a
reference column), and the New Model submission bundle for the corruptions board."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

from advgkl.data.corrupted import GENERATED_NOTE, SEVERITIES
from advgkl.errors import UserError
from advgkl.evaluation import leaderboard
from advgkl.evaluation.corruptions import CorruptionResult, cell_key
from advgkl.evaluation.leaderboard import info_head, write_new

MCE_REFERENCE = ("AlexNet's cells from RobustBench's model_info/imagenet/corruptions/"
                 "unaggregated_results[_3d].csv (commit fe235fb)")
MCE_NONE = ("none: RobustBench publishes no AlexNet cells for CIFAR-10-C / CIFAR-100-C (its own "
            "CIFAR evaluation stops with KeyError: 'AlexNet', RobustBench issue #194)")
BOARD_TITLES = {"corruptions": "Common Corruptions", "corruptions_3d": "3D Common Corruptions"}
MCE_FIELDS = {"corruptions": "corruptions_mce", "corruptions_3d": "corruptions_mce_3d"}
ACC_FIELDS = {"corruptions": "corruptions_acc", "corruptions_3d": "corruptions_acc_3d"}


def percent(value: float) -> str:
    """RobustBench's update_json form: str(round(100 x, 2)), e.g. "76.38", "80.0"."""
    return str(round(value * 100, 2))


def model_info(result: CorruptionResult, *, arch: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """RobustBench's corruptions model_info (eps null; the mCE on ImageNet); metadata not given
    stays empty, never invented."""
    info = {**info_head(meta, dataset=result.dataset, arch=arch, eps=None,
                        clean_acc=percent(result.clean_acc)),
            ACC_FIELDS[result.threat]: percent(result.corruptions_acc)}
    mce = result.mce()
    if mce is not None:
        info[MCE_FIELDS[result.threat]] = percent(mce)
    if meta.get("footnote"):
        info["footnote"] = meta["footnote"]
    return info


def cell_rows(result: CorruptionResult) -> list[dict[str, Any]]:
    rows = [{"corruption": "clean", "severity": 0, "correct": result.clean_correct,
             "n": result.n_examples, "accuracy": result.clean_acc, "seconds": None}]
    for c in result.corruptions:
        for s in SEVERITIES:
            key = cell_key(c, s)
            rows.append({"corruption": c, "severity": s, "correct": result.cells[key],
                         "n": result.n_examples, "accuracy": result.accuracy(c, s),
                         "seconds": result.seconds.get(key)})
    return rows


def detailed_record(result: CorruptionResult, base: Mapping[str, Any]) -> dict[str, Any]:
    """Everything behind the numbers; `base` carries the checkpoint's side (architecture,
    weights, sha256, config, selection, training, data, speed, machine, versions)."""
    per = result.per_corruption()
    worst = min(per, key=per.get)
    mce = result.mce()
    return {**base, "board": result.threat, "label": result.label, "dataset": result.dataset,
            "n_examples": result.n_examples, "first_index": result.first_index,
            "clean_acc": result.clean_acc, "corruptions_acc": result.corruptions_acc,
            "mce": mce, "mce_reference": MCE_REFERENCE if mce is not None else MCE_NONE,
            "per_corruption": per,
            "worst_corruption": {"corruption": worst, "accuracy": per[worst]},
            "cell_accuracy": cell_accuracies(result), "cells": cell_rows(result),
            "result": result.to_dict()}


def cells_csv(result: CorruptionResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["corruption", "severity", "correct", "n",
                                             "accuracy", "seconds"])
    writer.writeheader()
    writer.writerows(cell_rows(result))
    return out.getvalue()


def heatmap(cells: Mapping[str, float], clean: float, corruptions: list[str], path: Path,
            title: str) -> None:
    """Accuracy (%) of each corruption (rows) and severity (columns) from `cells` ("c/s" ->
    accuracy), the `clean` accuracy as a last column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[100 * cells[cell_key(c, s)] for s in SEVERITIES] + [100 * clean]
                       for c in corruptions])
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(corruptions) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                color="white" if v < 55 else "black")
    ax.set_xticks(range(len(SEVERITIES) + 1), [str(s) for s in SEVERITIES] + ["clean"])
    ax.set_yticks(range(len(corruptions)), corruptions)
    ax.set_xlabel("severity")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cell_accuracies(result: CorruptionResult) -> dict[str, float]:
    return {cell_key(c, s): result.accuracy(c, s) for c in result.corruptions for s in SEVERITIES}


def write_records(result: CorruptionResult, base: Mapping[str, Any], paths: dict[str, Path],
                  meta: Mapping[str, Any]) -> dict[str, Any]:
    """The detailed record (+ CSV and heatmap) and, for a standard evaluation, the model_info."""
    detailed = detailed_record(result, base)
    write_new(paths["detailed"], json.dumps(detailed, indent=2) + "\n")
    write_new(paths["csv"], cells_csv(result))
    standard = "" if "NON-STANDARD" not in result.label else " (NON-STANDARD)"
    heatmap(cell_accuracies(result), result.clean_acc, result.corruptions, paths["heatmap"],
            f"{paths['detailed'].name}{standard}\nclean {100 * result.clean_acc:.1f}%, mean "
            f"over the cells {100 * result.corruptions_acc:.1f}%")
    if "info" in paths:
        info = model_info(result, arch=base["architecture"], meta=meta)
        write_new(paths["info"], json.dumps(info, indent=2) + "\n")
    return detailed


def zoo_entry(name: str, constructor: str, dataset: str, preprocessing: str | None) -> str:
    return leaderboard.zoo_entry(name, constructor, dataset, preprocessing,
                                 where="the common_corruptions OrderedDict\n# (ThreatModel."
                                       "corruptions; ImageNet-3DCC is scored from the same entry)")


def new_model_issue(info: Mapping[str, Any], records: list[Mapping[str, Any]]) -> str:
    lines = []
    for r in records:
        mce = f", mCE {100 * r['mce']:.2f} % (vs AlexNet)" if r["mce"] is not None else ""
        lines.append(f"- **{BOARD_TITLES[r['board']]}**: {100 * r['corruptions_acc']:.2f} % mean "
                     f"over {len(r['per_corruption'])} corruptions x 5 severities{mce}; worst "
                     f"{r['worst_corruption']['corruption']} "
                     f"{100 * r['worst_corruption']['accuracy']:.2f} %")
    first = records[0]
    return f"""## New Model: {info['name'] or '<paper title>'}

- **Paper**: {info['link'] or '<link>'} ({info['venue'] or '<venue>'})
- **Authors**: {info['authors'] or '<authors>'}
- **Architecture**: {info['architecture']}
- **Threat model**: Common Corruptions
- **Dataset**: {info['dataset']}
- **Additional data**: {info['additional_data']}
- **Clean accuracy**: {info['clean_acc']} %
{chr(10).join(lines)}
- **Evaluation**: RobustBench's corruption sets as released, first {first['n_examples']} points
  per cell, fp32, eval mode (advgkl {first['versions']['advgkl']}; the per-cell table is in the
  bundle's records)
- **Checkpoint**: sha256 {first['checkpoint_sha256']}
"""


def check_exportable(record: Mapping[str, Any], path: Path, needed: int,
                     allow_partial: bool) -> bool:
    """A record that can go to RobustBench's board; returns whether it is partial."""
    if not record.get("data", {}).get("released", False):
        raise UserError(f"{path}: evaluated on generated corruptions ({GENERATED_NOTE}); only "
                        "the released sets go to RobustBench")
    if record["result"]["precision"] != "fp32" or record.get("partial_corruptions"):
        raise UserError(f"{path}: {record['label']} is not RobustBench's evaluation")
    partial = record["n_examples"] < needed
    if partial and not allow_partial:
        raise UserError(f"{path.name} covers {record['n_examples']} points, RobustBench needs "
                        f"{needed}; pass --allow-partial to export it marked partial")
    return partial

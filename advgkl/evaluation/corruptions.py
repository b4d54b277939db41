"""RobustBench's common-corruption boards (`corruptions`: CIFAR-10-C, CIFAR-100-C, ImageNet-C;
`corruptions_3d`: ImageNet-3DCC) as RobustBench's `corruptions_evaluation` scores them: the
clean accuracy, the accuracy of every (corruption, severity) cell on the first n points,
`corruptions_acc` = the plain mean over the cells and, on ImageNet, the mCE against AlexNet's
published cells. Each cell is a count of correct points, so shards merge exactly, and a state
file lets a killed evaluation continue with its next cell.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from advgkl.data.corrupted import SEVERITIES
from advgkl.data.tensors import Split
from advgkl.errors import UserError
from advgkl.evaluation.autoattack import (Bf16Model, correct_clean, fingerprint, in_point_order,
                                          load_state, write_json)

# RobustBench 1.1.1's lists, in its order (robustbench.data.CORRUPTIONS, CORRUPTIONS_3DCC).
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur",
               "brightness", "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise",
               "contrast", "jpeg_compression", "elastic_transform")
CORRUPTIONS_3DCC = ("near_focus", "far_focus", "bit_error", "color_quant", "flash", "fog_3d",
                    "h265_abr", "h265_crf", "iso_noise", "low_light", "xy_motion_blur",
                    "z_motion_blur")
THREATS = ("corruptions", "corruptions_3d")
STATE_VERSION = 1


@dataclass(frozen=True)
class Board:
    """A corruption board of a data set: its folder name (RobustBench's), corruptions, the
    model_info fields it fills, and the images per severity of its released .npy files."""

    threat: str
    dataset: str
    folder: str
    corruptions: tuple[str, ...]
    acc_field: str
    mce_field: str | None = None
    block: int | None = None        # released .npy: images per severity (10,000 on CIFAR)
    released: bool = True           # False: only generated copies exist (the digits, folders)


BOARDS = {
    ("cifar10", "corruptions"): Board("corruptions", "cifar10", "CIFAR-10-C", CORRUPTIONS,
                                      "corruptions_acc", block=10_000),
    ("cifar100", "corruptions"): Board("corruptions", "cifar100", "CIFAR-100-C", CORRUPTIONS,
                                       "corruptions_acc", block=10_000),
    ("imagenet", "corruptions"): Board("corruptions", "imagenet", "ImageNet-C", CORRUPTIONS,
                                       "corruptions_acc", "corruptions_mce"),
    ("imagenet", "corruptions_3d"): Board("corruptions_3d", "imagenet", "ImageNet-3DCC",
                                          CORRUPTIONS_3DCC, "corruptions_acc_3d",
                                          "corruptions_mce_3d"),
    ("digits", "corruptions"): Board("corruptions", "digits", "digits-C", CORRUPTIONS,
                                     "corruptions_acc", released=False),
    ("folder", "corruptions"): Board("corruptions", "folder", "folder-C", CORRUPTIONS,
                                     "corruptions_acc", released=False),
}
# Only the ImageNet boards have AlexNet's cells: RobustBench's CIFAR result files have no
# AlexNet row, which is why its own CIFAR evaluation stops with KeyError: 'AlexNet' (#194).


def board_for(dataset: str, threat: str) -> Board:
    if (dataset, threat) not in BOARDS:
        have = sorted({d for d, t in BOARDS if t == threat})
        raise UserError(f"--threat {threat}: RobustBench's board exists for {', '.join(have)}, "
                        f"not {dataset}")
    return BOARDS[(dataset, threat)]


def choose_corruptions(board: Board, names: list[str] | None) -> tuple[str, ...]:
    """The board's corruptions, or a subset of them (a partial evaluation)."""
    if not names:
        return board.corruptions
    unknown = [n for n in names if n not in board.corruptions]
    if unknown:
        raise UserError(f"--corruptions: {', '.join(unknown)} not among {board.threat}'s "
                        f"{len(board.corruptions)} ({', '.join(board.corruptions)})")
    return tuple(c for c in board.corruptions if c in names)


def alexnet_accuracies(threat: str) -> dict[str, list[float]]:
    """AlexNet's accuracy per cell of the ImageNet board `threat`, from RobustBench's result CSV
    (advgkl/evaluation/alexnet_corruptions.json names its source)."""
    data = json.loads((Path(__file__).parent / "alexnet_corruptions.json").read_text())
    return data[threat]


def cell_key(corruption: str, severity: int) -> str:
    return f"{corruption}/{severity}"


@dataclass
class CorruptionResult:
    """Counts of correct points on [first_index, first_index + n_examples): the clean test points
    and each (corruption, severity) cell, in the board's order."""

    threat: str
    dataset: str
    corruptions: list[str]
    n_examples: int
    clean_correct: int
    cells: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    first_index: int = 0
    precision: str = "fp32"
    label: str = "common corruptions"

    def accuracy(self, corruption: str, severity: int) -> float:
        return self.cells[cell_key(corruption, severity)] / self.n_examples

    @property
    def clean_acc(self) -> float:
        return self.clean_correct / self.n_examples

    @property
    def corruptions_acc(self) -> float:
        """The plain mean over the cells, as RobustBench's numpy mean of its results row."""
        return float(np.array([self.accuracy(c, s) for c in self.corruptions
                               for s in SEVERITIES]).mean())

    def per_corruption(self) -> dict[str, float]:
        return {c: float(np.mean([self.accuracy(c, s) for s in SEVERITIES]))
                for c in self.corruptions}

    def mce(self) -> float | None:
        """RobustBench's mCE: the mean over corruptions of the model's mean error over the
        severities divided by AlexNet's (ImageNet boards; None elsewhere)."""
        if self.dataset != "imagenet":
            return None
        alexnet = alexnet_accuracies(self.threat)
        total = 0.0
        for c in self.corruptions:
            reference = float(np.mean([1 - a for a in alexnet[c]]))
            total += float(np.mean([(1 - self.accuracy(c, s)) / reference
                                    for s in SEVERITIES])) / len(self.corruptions)
        return total

    def to_dict(self) -> dict:
        return {**asdict(self), "clean_acc": self.clean_acc,
                "corruptions_acc": self.corruptions_acc, "mce": self.mce()}

    @classmethod
    def from_dict(cls, d: dict) -> "CorruptionResult":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def merge_corruption_results(results: list[CorruptionResult]) -> CorruptionResult:
    """The union of shard results over contiguous point ranges: every count is added."""
    results = in_point_order(results, lambda r: (r.threat, r.dataset, tuple(r.corruptions),
                                                 r.precision))
    first = results[0]
    return CorruptionResult(
        first.threat, first.dataset, first.corruptions, sum(r.n_examples for r in results),
        sum(r.clean_correct for r in results),
        {k: sum(r.cells[k] for r in results) for k in first.cells},
        {k: sum(r.seconds.get(k, 0.0) for r in results) for k in first.cells},
        first.first_index, first.precision, first.label)


def evaluate_corruptions(model: nn.Module, clean: Split, read_cell: Callable[[str, int], Split],
                         *, threat: str, dataset: str, corruptions: tuple[str, ...],
                         batch_size: int, device: torch.device, data_id: str,
                         state_path: str | Path | None = None, first_index: int = 0,
                         precision: str = "fp32", label: str = "common corruptions",
                         progress: bool = True) -> CorruptionResult:
    """Clean accuracy on `clean`, then each cell `read_cell(corruption, severity)` (uint8 or
    float images), model in eval mode, fp32 (bf16 autocast with `precision="bf16"`: a
    NON-STANDARD screening, labelled). With `state_path` each finished cell is saved and a
    restarted call continues with the next one; `data_id` names the corrupted data in it."""
    model.eval()
    n = len(clean.labels)
    state_path = Path(state_path) if state_path is not None else None
    settings = {"v": STATE_VERSION, "threat": threat, "dataset": dataset,
                "corruptions": list(corruptions), "n": n, "first": first_index,
                "precision": precision, "data": data_id,
                "clean": fingerprint([("x", clean.images), ("y", clean.labels)]),
                "model": fingerprint(model.state_dict().items())}
    state = load_state(state_path, settings, {"clean": None, "cells": {}, "seconds": {}},
                       "model weights, points, board, corruptions or data")
    if precision == "bf16":
        model = Bf16Model(model, device.type)

    def count(split: Split) -> int:
        if len(split.labels) != n:
            raise UserError(f"a cell has {len(split.labels)} points, the clean set {n}")
        return int(correct_clean(model, split.images, split.labels, batch_size, device).sum())

    with torch.autocast(device.type, enabled=False):
        if state["clean"] is None:
            state["clean"] = count(clean)
        keys = [(c, s) for c in corruptions for s in SEVERITIES]
        bar = tqdm(keys, desc=f"{threat} cells", unit="cell", disable=not progress,
                   initial=len(state["cells"]), total=len(keys))
        for corruption, severity in keys:
            key = cell_key(corruption, severity)
            if key in state["cells"]:
                continue
            start = time.perf_counter()
            state["cells"][key] = count(read_cell(corruption, severity))
            state["seconds"][key] = time.perf_counter() - start
            if state_path is not None:
                write_json(state_path, state)
            bar.update(1)
            bar.set_postfix(acc=f"{state['cells'][key] / n:.2%}")
        bar.close()
    if state_path is not None:
        write_json(state_path, state)
    return CorruptionResult(threat, dataset, list(corruptions), n, state["clean"],
                            {cell_key(c, s): state["cells"][cell_key(c, s)] for c, s in keys},
                            {cell_key(c, s): state["seconds"][cell_key(c, s)] for c, s in keys},
                            first_index, precision, label)

"""The frozen teacher of a distillation run: an advgkl checkpoint (the weights `advgkl eval` would
score, or `distill.teacher_weights`) or a RobustBench zoo entry (`robustbench:<dataset>/<threat>/
<name>`, loaded by RobustBench's own loader, normalisation inside the model). Everything is
checked before a run folder exists; the teacher's file is identified by its sha256, which the run
records and a resume requires again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from advgkl.checkpoint import default_weights, load_checkpoint, sha256_file
from advgkl.config import DistillConfig
from advgkl.errors import UserError
from advgkl.models.loading import model_from_checkpoint
from advgkl.models.zoo import load_zoo_model, parse_zoo


class FrozenTeacher(nn.Module):
    """A model that stays in eval mode (`train()` leaves it so) and has no trainable parameters;
    gradients can still flow through it to its input (AdaAD's attack)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


@dataclass
class Teacher:
    module: FrozenTeacher
    identity: dict[str, Any]    # source, sha256, and the weights or the zoo entry's file


def _zoo_teacher(spec: str, distill: DistillConfig, dataset: str) -> tuple[nn.Module, dict]:
    zoo_dataset, threat, name = parse_zoo(spec)
    if zoo_dataset != dataset:
        raise UserError(f"distill.teacher: {spec} is a {zoo_dataset} model; this run trains on "
                        f"{dataset}")
    module, info = load_zoo_model(name, dataset=zoo_dataset, threat=threat,
                                  model_dir=distill.model_dir)
    return module, {"source": spec, "sha256": info["weights_sha256"],
                    "weights_file": info["weights_file"], "arch": type(module).__name__}


def _checkpoint_teacher(spec: str, distill: DistillConfig, dataset: str,
                        num_classes: int) -> tuple[nn.Module, dict]:
    ckpt = load_checkpoint(spec)
    what = f"distill.teacher {spec}"
    if ckpt.get("num_classes") != num_classes:
        raise UserError(f"{what}: has {ckpt.get('num_classes')} classes; {dataset} has "
                        f"{num_classes}")
    trained_on = ((ckpt.get("config") or {}).get("data") or {}).get("dataset")
    if trained_on not in (None, dataset):
        raise UserError(f"{what}: was trained on {trained_on}; this run trains on {dataset}")
    weights = (default_weights(ckpt) if distill.teacher_weights == "auto"
               else distill.teacher_weights)
    module = model_from_checkpoint(ckpt, what=what, weights=weights)
    return module, {"source": str(Path(spec).resolve()), "sha256": sha256_file(spec),
                    "weights": weights, "arch": ckpt["arch"]}


def load_teacher(distill: DistillConfig, *, dataset: str, num_classes: int) -> Teacher:
    """The configured teacher, frozen; refused with one line when it cannot serve this run
    (missing or unreadable file, unknown zoo entry, weights absent offline, another data set or
    class count, a sha256 other than `distill.teacher_sha256` when that is set)."""
    spec = distill.teacher
    if parse_zoo(spec):
        module, identity = _zoo_teacher(spec, distill, dataset)
    else:
        module, identity = _checkpoint_teacher(spec, distill, dataset, num_classes)
    pinned = distill.teacher_sha256
    if pinned and identity["sha256"] != pinned:
        raise UserError(f"distill.teacher: {spec} has changed since the run started (sha256 "
                        f"{identity['sha256'][:12]}..., the run recorded {pinned[:12]}...); "
                        "restore that file or start a new run")
    return Teacher(FrozenTeacher(module), identity)

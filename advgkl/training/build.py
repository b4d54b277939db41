"""What a run is built from its config: the device, the run folder, the model, each epoch's
training attack, and the check that the global batch splits over the processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from advgkl.attacks import APGDTrain, AresPGD, PGDAttack, attack_schedule, build_single_step
from advgkl.config import Config
from advgkl.config.methods import METHODS
from advgkl.errors import UserError, check_plain_name
from advgkl.models import create_model

RECIPE_ATTACKS = {"apgd": APGDTrain, "ares_pgd": AresPGD}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


def run_dir_for(cfg: Config, config_path: str | Path) -> Path:
    name = cfg.run.name or Path(config_path).stem
    check_plain_name(name, "run.name")
    return Path(cfg.run.out_dir) / name


def build_attack(cfg: Config, epoch: int) -> PGDAttack:
    """The training attack of `epoch` (1-based), exactly as the trainer runs it: PGD, or a single
    step (the method's own, or N-FGSM's published one with attack.kind n_fgsm), or an ImageNet
    recipe's (apgd: Singh et al.'s APGD; ares_pgd: ARES' best-loss PGD)."""
    a, method = cfg.attack, METHODS[cfg.loss.method]
    eps, step_size, steps = attack_schedule(a.schedule, epoch, cfg.train.epochs, eps=a.eps,
                                            step_size=a.step_size, steps=a.steps)
    common = {"objective": a.objective, "alpha": a.alpha, "beta": a.beta, "gamma": a.gamma,
              "bn_train": method.attack_train_mode}
    if a.kind in RECIPE_ATTACKS:
        return RECIPE_ATTACKS[a.kind](eps=eps, step_size=step_size, steps=steps,
                                      random_start=a.random_start, **common)
    if a.kind != "pgd":
        settings = (cfg.loss.settings if method.attack_kind != "pgd"
                    else METHODS["n_fgsm"].settings())
        return build_single_step(a.kind, settings, eps, random_start=a.random_start, **common)
    return PGDAttack(eps=eps, step_size=step_size, steps=steps, norm=a.norm,
                     random_start=a.random_start,
                     restarts=a.restarts if steps > 0 else 1,
                     final_loss_forward=method.final_loss_forward and steps > 0, **common)


def check_batch_split(cfg: Config, world: int) -> None:
    """The global batch splits evenly over the processes and each process's share over
    train.accumulate micro-batches (of an even size with Mixup/CutMix)."""
    t, parts = cfg.train, world * cfg.train.accumulate
    if t.batch_size % world:
        raise UserError(f"train.batch_size: {t.batch_size} (the global batch) must divide "
                        f"evenly over {world} processes")
    if t.batch_size % parts:
        raise UserError(f"train.accumulate: {t.accumulate} micro-batches do not divide each "
                        f"process's {t.batch_size // world} images (train.batch_size "
                        f"{t.batch_size} over {world} processes)")
    if (cfg.data.mixup or cfg.data.cutmix) and (t.batch_size // parts) % 2:
        raise UserError(f"data.mixup / data.cutmix: the micro-batch of {t.batch_size // parts} "
                        "images must be even (timm's Mixup pairs each image with the batch "
                        "flipped)")


def build_model(arch: str, num_classes: int, key: str = "model.arch",
                **kwargs: Any) -> torch.nn.Module:
    try:
        return create_model(arch, num_classes, **kwargs)
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None

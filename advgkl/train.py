"""Adversarial training: one plain loop (`train`), read top to bottom.

Per step (`advgkl.step.TrainStep`): attack (eval mode, clean logits cached) -> clean and
adversarial forward (train mode) -> objective dict -> backward -> optimizer step (inside an AWP
perturbation when active) -> class-prior update from the clean logits -> weight-EMA update. On
CUDA the forward passes can run in bf16 autocast, channels_last and compiled; evaluation always
runs in fp32.
Per epoch: held-out clean and PGD accuracy, `last.pt` (atomic), `best.pt` by robust accuracy,
a metrics row, the curves. `resume=True` continues bit-exactly from `last.pt`.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from advgkl import distributed
from advgkl.attacks import PGDAttack, attack_schedule
from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from advgkl.config import Config, config_to_dict, save_config
from advgkl.data import NUM_CLASSES, load_split, to_unit_float, train_dataset
from advgkl.errors import UserError
from advgkl.evaluate import evaluate_pgd
from advgkl.generated import MixedBatchSampler, open_generated
from advgkl.models import create_model
from advgkl.runlog import RunLog
from advgkl.step import TrainStep


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint stays valid."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


def learning_rate(schedule: str, epoch: int, epochs: int, progress: float, *, lr: float,
                  warmup: int, milestones: list[int]) -> float:
    """LR in `epoch` (1-based) at fraction `progress` of it.

    cosine (the paper's, set per epoch): lr * epoch / warmup during warm-up, then
    lr * (1 + cos(pi * (epoch - warmup) / (epochs - warmup + 1))) / 2.
    piecewise (TRADES/AWP): divided by 10 at each milestone epoch reached, after the warm-up.
    cosinew (DM-AT, per step): linear warm-up, then cosine to 0 over the remaining steps.
    """
    if schedule == "cosinew":
        t = epoch - 1 + progress
        if t < warmup:
            return lr * t / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))
    if epoch < warmup:
        return lr * epoch / warmup
    if schedule == "piecewise":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup + 1)))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_for(cfg: Config, config_path: str | Path) -> Path:
    return Path(cfg.run.out_dir) / (cfg.run.name or Path(config_path).stem)


def check_data_options(cfg: Config) -> None:
    data = cfg.data
    if data.device_augment and (data.augment != "basic" or data.two_view):
        raise UserError("data.device_augment: runs the basic augmentation only; use it with "
                        "data.augment=basic and data.two_view=false")
    if not data.generated and (data.generated_fraction or data.epoch_samples):
        raise UserError("data.generated_fraction and data.epoch_samples need data.generated "
                        "(a file of generated images)")


def training_set(cfg: Config, num_classes: int) -> tuple[Dataset, int]:
    """The real training set, followed by the generated images when configured; returns the
    data set and how many real images it starts with."""
    real = load_split(cfg.data.dataset, train=True, root=cfg.data.root, download=cfg.data.download)
    kw = {"augment": cfg.data.augment, "two_view": cfg.data.two_view,
          "on_device": cfg.data.device_augment}
    dataset = train_dataset(real, **kw)
    if cfg.data.generated:
        generated = open_generated(cfg.data.generated, num_classes=num_classes,
                                   image_size=real.images.shape[-1])
        dataset = ConcatDataset([dataset, train_dataset(generated, **kw)])
    return dataset, len(real.labels)


def epoch_loader(cfg: Config, dataset: Dataset, n_real: int, ranks: distributed.DistInfo,
                 epoch: int, pin_memory: bool) -> DataLoader:
    """This rank's batches of `epoch`; together the ranks' batches form the global batches a
    single process would draw."""
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": pin_memory,
          "generator": torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)}
    if cfg.data.generated:
        batches = MixedBatchSampler(
            n_real, len(dataset) - n_real, batch_size=cfg.train.batch_size,
            fraction=cfg.data.generated_fraction, epoch_samples=cfg.data.epoch_samples or n_real,
            seed=cfg.train.seed, rank=ranks.rank, world=ranks.world)
        batches.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=batches, **kw)
    # Rank r takes every world-th image of the single-process permutation.
    sampler = DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.train.batch_size // ranks.world, sampler=sampler,
                      **kw)


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False,
          device: torch.device | None = None, echo: bool = True) -> dict[str, float]:
    """Train `cfg` into `run_dir` (created; refused if it exists) or resume it; returns the last
    epoch's metrics."""
    run_dir = Path(run_dir)
    check_data_options(cfg)
    ranks, device_name = distributed.setup(cfg.train.device)
    if cfg.train.batch_size % ranks.world:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} (the global batch) must divide "
                        f"evenly over {ranks.world} processes")
    if resume and not (run_dir / "last.pt").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no last.pt)")
    if not resume and run_dir.exists():
        raise UserError(f"{run_dir} already exists; resume it with --resume {run_dir} or "
                        "choose another run.name (nothing was overwritten)")
    num_classes = NUM_CLASSES[cfg.data.dataset]
    dataset, n_real = training_set(cfg, num_classes)  # data errors come before the run folder
    distributed.barrier(ranks)  # every rank has checked before rank 0 creates the folder
    if not resume and ranks.main:
        run_dir.mkdir(parents=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier(ranks)
    device = device or resolve_device(device_name)
    log = RunLog(run_dir, echo=echo and ranks.main, write=ranks.main)
    seed_everything(cfg.train.seed)

    # The first holdout_size test points for the per-epoch check.
    test = load_split(cfg.data.dataset, train=False, root=cfg.data.root, download=cfg.data.download)
    n_hold = min(cfg.eval.holdout_size, len(test.labels))
    x_hold = to_unit_float(test.images[:n_hold]).to(device)
    y_hold = test.labels[:n_hold].to(device)

    # The model and everything a step updates (optimizer, prior, AWP, EMA).
    parts = TrainStep(cfg, create_model(cfg.model.arch, num_classes), num_classes, device,
                      world=ranks.world, note=log.log)
    model, optimizer, prior, ema = parts.model, parts.optimizer, parts.prior, parts.ema
    start_epoch, step, best = 1, 0, -1.0
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt", map_location=device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        prior.load_state_dict(ckpt["prior"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_robust_acc"]
        if ckpt["epoch"] not in log.logged_epochs():  # killed between last.pt and its row
            log.append_metrics(ckpt["metrics"])
        set_rng_state(ckpt["rng"])
        log.log(f"resumed from {run_dir / 'last.pt'} after epoch {ckpt['epoch']}")
    else:
        log.log(f"training {cfg.model.arch} on {cfg.data.dataset} with {cfg.loss.method} "
                f"on {device} into {run_dir}")
        if cfg.data.generated:
            log.log(f"{n_real} real + {len(dataset) - n_real} generated images from "
                    f"{cfg.data.generated}, {cfg.data.generated_fraction:.0%} generated per batch")

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        eps, step_size, steps = attack_schedule(
            cfg.attack.schedule, epoch, cfg.train.epochs, eps=cfg.attack.eps,
            step_size=cfg.attack.step_size, steps=cfg.attack.steps)
        attack = PGDAttack(eps=eps, step_size=step_size, steps=steps, norm=cfg.attack.norm,
                           objective=cfg.attack.objective, random_start=cfg.attack.random_start)
        loader = epoch_loader(cfg, dataset, n_real, ranks, epoch, device.type == "cuda")
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "robust": 0.0, "correct": 0, "seen": 0}
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
                   disable=None if echo and ranks.main else True)  # None: off if no terminal
        for i, (x, y) in enumerate(bar):
            lr = learning_rate(cfg.train.lr_schedule, epoch, cfg.train.epochs, i / len(loader),
                               lr=cfg.train.lr, warmup=cfg.train.lr_warmup_epochs,
                               milestones=cfg.train.lr_milestones)
            stats = parts(x, y, attack=attack, epoch=epoch, lr=lr)
            if not math.isfinite(stats["loss"]):
                raise TrainingError(f"non-finite loss ({stats['loss']}) at epoch {epoch}, step "
                                    f"{i + 1}; {run_dir / 'last.pt'} holds the last good state")
            step += 1
            for key in ("loss", "ce", "robust"):
                sums[key] += stats[key] * stats["n"]
            sums["correct"] += int(stats["correct"])
            sums["seen"] += stats["n"]
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                            img_s=f"{sums['seen'] / (time.perf_counter() - start):.0f}")
        prior.end_epoch()
        seconds = time.perf_counter() - start
        totals = distributed.all_reduce_sum(
            [sums[k] for k in ("loss", "ce", "robust", "correct", "seen")], ranks, device)
        distributed.assert_ranks_agree(
            torch.stack([p.detach().double().sum() for p in model.parameters()]
                        + [prior.prior.double().sum()]), ranks, "weights or class prior")
        if not ranks.main:  # rank 0 evaluates, logs and saves
            continue

        eval_model = ema.module if cfg.train.select_with_ema and ema.started else model
        check = evaluate_pgd(eval_model, x_hold, y_hold, eps=cfg.eval.eps, norm=cfg.eval.norm,
                             steps=cfg.eval.pgd_steps, batch_size=cfg.eval.batch_size,
                             progress=False)
        clean_acc, robust_acc = check.clean_acc, check.robust_acc
        loss_sum, ce_sum, robust_sum, correct, seen = totals
        metrics = {"epoch": epoch, "lr": lr, "loss": loss_sum / seen, "ce": ce_sum / seen,
                   "robust": robust_sum / seen, "train_acc": correct / seen,
                   "clean_acc": clean_acc, "robust_acc": robust_acc, "eps": eps,
                   "attack_steps": steps,
                   "eval_weights": "ema" if eval_model is ema.module else "model",
                   "images_per_s": seen / seconds, "seconds": seconds}
        is_best = robust_acc > best
        best = max(best, robust_acc)
        ckpt = model_checkpoint(
            model.state_dict(), arch=cfg.model.arch, num_classes=num_classes,
            ema=ema.state_dict(), optimizer=optimizer.state_dict(), prior=prior.state_dict(),
            epoch=epoch, step=step, best_robust_acc=best, rng=rng_state(),
            config=config_to_dict(cfg), metrics=metrics)
        save_checkpoint(run_dir / "last.pt", ckpt)
        log.append_metrics(metrics)
        if is_best:
            save_checkpoint(run_dir / "best.pt", ckpt)
        log.plot()
        log.log(f"epoch {epoch}: loss {metrics['loss']:.4f}, train {100 * metrics['train_acc']:.2f}%"
                f", clean {100 * clean_acc:.2f}%, PGD-{cfg.eval.pgd_steps} {100 * robust_acc:.2f}% "
                f"({metrics['eval_weights']}), {metrics['images_per_s']:.0f} img/s"
                f"{', best' if is_best else ''}")
    distributed.barrier(ranks)
    distributed.teardown(ranks)
    return metrics

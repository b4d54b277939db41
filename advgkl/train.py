"""Adversarial training: one plain loop (`train`), read top to bottom.

Per step: attack (eval mode, clean logits cached) -> clean and adversarial forward (train mode)
-> objective dict -> backward -> optimizer step (inside an AWP perturbation when active)
-> class-prior update from the clean logits -> weight-EMA update. On CUDA the forward passes can
run in bf16 autocast, channels_last and compiled; evaluation always runs in fp32.
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
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from advgkl import distributed
from advgkl.attacks import PGDAttack, attack_schedule
from advgkl.awp import AWP
from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from advgkl.config import Config, config_to_dict, save_config
from advgkl.data import NUM_CLASSES, load_split, to_unit_float, train_dataset
from advgkl.ema import WeightEMA
from advgkl.errors import UserError
from advgkl.evaluate import evaluate_pgd
from advgkl.losses import Objective, build_objective, combine_views
from advgkl.models import create_model
from advgkl.priors import ClassPrior
from advgkl.runlog import RunLog


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


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if cfg.train.no_decay_bn_bias and p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           nesterov=cfg.train.nesterov)


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


def kernel_options(cfg: Config, device: torch.device, log: RunLog) -> dict[str, Any]:
    """bf16 autocast, channels_last, torch.compile and cuDNN benchmark are CUDA options; on
    another device they are switched off with a message, never an error."""
    cuda = device.type == "cuda"
    wanted = {"precision": cfg.train.precision == "bf16",
              "attack_precision": cfg.train.attack_precision == "bf16",
              "channels_last": cfg.train.channels_last, "compile": cfg.train.compile}
    if not cuda:
        for name in (k for k, on in wanted.items() if on):
            log.log(f"train.{name} is a CUDA option; ignored on {device}")
    if cuda:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return {k: on and cuda for k, on in wanted.items()}


def run_dir_for(cfg: Config, config_path: str | Path) -> Path:
    return Path(cfg.run.out_dir) / (cfg.run.name or Path(config_path).stem)


def _step_objective(objective: Objective, logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
                    rows: Tensor | None, two_view: bool, aug_weight: float) -> dict[str, Tensor]:
    if not two_view:
        return objective(logits_nat, logits_adv, y, rows)
    b = len(y) // 2
    halves = [objective(logits_nat[s], logits_adv[s], y[s], None if rows is None else rows[s])
              for s in (slice(0, b), slice(b, None))]
    return combine_views(*halves, aug_weight)


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False,
          device: torch.device | None = None, echo: bool = True) -> dict[str, float]:
    """Train `cfg` into `run_dir` (created; refused if it exists) or resume it; returns the last
    epoch's metrics."""
    run_dir = Path(run_dir)
    if cfg.data.generated:
        raise UserError("data.generated: training on generated data arrives with the scale "
                        "issue; this config validates but cannot run yet")
    ranks, device_name = distributed.setup(cfg.train.device)
    if cfg.train.batch_size % ranks.world:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} (the global batch) must divide "
                        f"evenly over {ranks.world} processes")
    if resume and not (run_dir / "last.pt").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no last.pt)")
    if not resume and run_dir.exists():
        raise UserError(f"{run_dir} already exists; resume it with --resume {run_dir} or "
                        "choose another run.name (nothing was overwritten)")
    distributed.barrier(ranks)  # every rank has checked before rank 0 creates the folder
    if not resume and ranks.main:
        run_dir.mkdir(parents=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier(ranks)
    device = device or resolve_device(device_name)
    log = RunLog(run_dir, echo=echo and ranks.main, write=ranks.main)
    seed_everything(cfg.train.seed)

    # Data: the training set, and the first holdout_size test points for the per-epoch check.
    num_classes = NUM_CLASSES[cfg.data.dataset]
    train_split = load_split(cfg.data.dataset, train=True, root=cfg.data.root,
                             download=cfg.data.download)
    dataset = train_dataset(train_split, augment=cfg.data.augment, two_view=cfg.data.two_view)
    test = load_split(cfg.data.dataset, train=False, root=cfg.data.root, download=cfg.data.download)
    n_hold = min(cfg.eval.holdout_size, len(test.labels))
    x_hold = to_unit_float(test.images[:n_hold]).to(device)
    y_hold = test.labels[:n_hold].to(device)

    # Model (and its compiled training view), optimizer, prior, objective, AWP, EMA.
    kernels = kernel_options(cfg, device, log)
    memory_format = torch.channels_last if kernels["channels_last"] else torch.contiguous_format
    model = create_model(cfg.model.arch, num_classes)
    if cfg.train.sync_bn and ranks.world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.log("train.sync_bn needs CUDA (NCCL); ignored: each process keeps its own BN")
    model = model.to(device, memory_format=memory_format)
    net = torch.compile(model) if kernels["compile"] else model  # same parameters as `model`
    # The attack runs on `net` (no gradient sync); the training forward through DDP.
    train_net = (DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
                 if ranks.world > 1 else net)
    train_amp = torch.autocast(device.type, torch.bfloat16, enabled=kernels["precision"])
    attack_amp = torch.autocast(device.type, torch.bfloat16, enabled=kernels["attack_precision"])
    optimizer = build_optimizer(model, cfg)
    prior = ClassPrior(num_classes, temperature=cfg.loss.prior_temperature,
                       momentum=cfg.loss.prior_momentum, mode=cfg.loss.prior_update, device=device)
    objective = build_objective(cfg.loss.method, alpha=cfg.loss.alpha, beta=cfg.loss.beta,
                                gamma=cfg.loss.gamma, temperature=cfg.loss.temperature)
    awp = (AWP(model, gamma=cfg.awp.gamma, warmup_epochs=cfg.awp.warmup_epochs)
           if cfg.awp.gamma > 0 else None)  # its proxy is a full copy of the model
    ema = WeightEMA(model, tau=cfg.train.ema_tau, start_epoch=cfg.train.ema_start_epoch,
                    warmup=cfg.train.ema_warmup)
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

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        eps, step_size, steps = attack_schedule(
            cfg.attack.schedule, epoch, cfg.train.epochs, eps=cfg.attack.eps,
            step_size=cfg.attack.step_size, steps=cfg.attack.steps)
        attack = PGDAttack(eps=eps, step_size=step_size, steps=steps, norm=cfg.attack.norm,
                           objective=cfg.attack.objective, random_start=cfg.attack.random_start)
        # The same permutation for any number of processes: rank r takes every world-th image,
        # so the ranks' batches at a step together form the single-process batch.
        sampler = DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank,
                                     shuffle=True, seed=cfg.train.seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size // ranks.world,
                            sampler=sampler, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))
        net.train()
        sums = {"loss": 0.0, "ce": 0.0, "robust": 0.0, "correct": 0, "seen": 0}
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
                   disable=None if echo and ranks.main else True)  # None: off if no terminal
        for i, (x, y) in enumerate(bar):
            lr = learning_rate(cfg.train.lr_schedule, epoch, cfg.train.epochs, i / len(loader),
                               lr=cfg.train.lr, warmup=cfg.train.lr_warmup_epochs,
                               milestones=cfg.train.lr_milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.data.two_view:  # (basic, augmented) views: one batch, labels twice
                x, y = torch.cat(x), torch.cat([y, y])
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            n_basic = len(y) // 2 if cfg.data.two_view else len(y)

            with attack_amp:
                x_adv = attack(net, x, y)
            rows = prior.rows(y) if objective.needs_prior else None
            with train_amp:
                diff = (awp.perturb(objective, x, x_adv, y, rows, lr=lr)
                        if awp is not None and awp.active(epoch) else None)
                logits_adv, logits_nat = train_net(x_adv), train_net(x)
                out = _step_objective(objective, logits_nat, logits_adv, y, rows,
                                      cfg.data.two_view, cfg.data.aug_weight)
            # One device sync per step for the logs and the finiteness check.
            loss, ce, robust, correct = torch.stack([
                out["loss"].detach(), out["ce"].detach(), out["robust"].detach(),
                (logits_nat.argmax(1) == y).sum().to(out["loss"].dtype)]).tolist()
            if not math.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss}) at epoch {epoch}, step {i + 1}; "
                                    f"{run_dir / 'last.pt'} holds the last good state")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            if diff is not None:
                awp.restore(diff)
            if objective.needs_prior:
                prior.update(logits_nat[:n_basic], y[:n_basic])
            ema.update(model, epoch)
            step += 1

            b = len(y)
            sums["loss"] += loss * b
            sums["ce"] += ce * b
            sums["robust"] += robust * b
            sums["correct"] += int(correct)
            sums["seen"] += b
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

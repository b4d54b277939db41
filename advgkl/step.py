"""One adversarial training step, as the trainer (and `scripts/bench_step.py`) runs it.

attack (eval mode, clean logits cached) -> clean and adversarial forward (train mode) -> objective
dict -> backward -> optimizer step (inside an AWP perturbation when active) -> class-prior update
from the clean logits -> weight-EMA update. On CUDA the forward passes can run in bf16 autocast,
channels_last and compiled.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from advgkl.attacks import PGDAttack
from advgkl.awp import AWP
from advgkl.config import Config
from advgkl.data import random_crop_flip, to_unit_float
from advgkl.ema import EpochAverage, WeightEMA
from advgkl.losses import Objective, build_objective, combine_views
from advgkl.priors import ClassPrior

STATS = ("loss", "ce", "robust", "correct")


def kernel_options(cfg: Config, device: torch.device,
                   note: Callable[[str], None]) -> dict[str, Any]:
    """bf16 autocast, channels_last, torch.compile and cuDNN benchmark are CUDA options; on
    another device they are switched off with a message (`note`), never an error."""
    cuda = device.type == "cuda"
    wanted = {"precision": cfg.train.precision == "bf16",
              "attack_precision": cfg.train.attack_precision == "bf16",
              "channels_last": cfg.train.channels_last, "compile": cfg.train.compile}
    if not cuda:
        for name in (k for k, on in wanted.items() if on):
            note(f"train.{name} is a CUDA option; ignored on {device}")
    if cuda:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return {k: on and cuda for k, on in wanted.items()}


def build_optimizer(model: nn.Module, cfg: Config, *others: nn.Module) -> torch.optim.SGD:
    """One SGD over the parameters of `model` and `others` (LBGAT's natural model)."""
    decay, no_decay = [], []
    for p in (p for m in (model, *others) for p in m.parameters()):
        (no_decay if cfg.train.no_decay_bn_bias and p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           nesterov=cfg.train.nesterov)


def _ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` behind DistributedDataParallel when there are several processes."""
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def _step_objective(objective: Objective, logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
                    rows: Tensor | None, two_view: bool, aug_weight: float,
                    guide: Tensor | None) -> dict[str, Tensor]:
    if not two_view:
        return objective(logits_nat, logits_adv, y, rows, guide)
    b = len(y) // 2
    halves = [objective(logits_nat[s], logits_adv[s], y[s], None if rows is None else rows[s])
              for s in (slice(0, b), slice(b, None))]
    return combine_views(*halves, aug_weight)


class TrainStep:
    """The model (on `device`, in the configured memory format), its compiled / DDP views, and
    everything training updates: optimizer, class prior, AWP, EMA (per step), the epoch average
    (per epoch, by the trainer; None when off) and LBGAT's natural model (`natural`, trained in
    train mode by the same optimizer; None for the other methods)."""

    def __init__(self, cfg: Config, model: nn.Module, num_classes: int, device: torch.device, *,
                 world: int = 1, note: Callable[[str], None] = print,
                 natural: nn.Module | None = None) -> None:
        self.cfg, self.device = cfg, device
        kernels = kernel_options(cfg, device, note)
        self.memory_format = (torch.channels_last if kernels["channels_last"]
                              else torch.contiguous_format)
        if cfg.train.sync_bn and world > 1:
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                note("train.sync_bn needs CUDA (NCCL); ignored: each process keeps its own BN")
        self.model = model.to(device, memory_format=self.memory_format)
        self.net = torch.compile(self.model) if kernels["compile"] else self.model  # same params
        # The attack runs on `net` (no gradient sync); the training forward through DDP.
        self.train_net = _ddp(self.net, device, world)
        self.train_amp = torch.autocast(device.type, torch.bfloat16, enabled=kernels["precision"])
        self.attack_amp = torch.autocast(device.type, torch.bfloat16,
                                         enabled=kernels["attack_precision"])
        self.natural = self.natural_train = None
        if cfg.loss.method == "lbgat":
            if natural is None:
                raise ValueError("natural: lbgat trains a natural model beside the robust one")
            self.natural = natural.to(device, memory_format=self.memory_format).train()
            self.natural_train = _ddp(self.natural, device, world)
        self.optimizer = build_optimizer(self.model, cfg,
                                         *([self.natural] if self.natural is not None else []))
        self.prior = ClassPrior(num_classes, temperature=cfg.loss.prior_temperature,
                                momentum=cfg.loss.prior_momentum, mode=cfg.loss.prior_update,
                                device=device)
        self.objective = build_objective(cfg.loss.method, alpha=cfg.loss.alpha, beta=cfg.loss.beta,
                                         gamma=cfg.loss.gamma, temperature=cfg.loss.temperature,
                                         label_smoothing=cfg.loss.label_smoothing)
        self.awp = (AWP(self.model, gamma=cfg.awp.gamma, warmup_epochs=cfg.awp.warmup_epochs)
                    if cfg.awp.gamma > 0 else None)  # its proxy is a full copy of the model
        self.ema = WeightEMA(self.model, tau=cfg.train.ema_tau,
                             start_epoch=cfg.train.ema_start_epoch, warmup=cfg.train.ema_warmup)
        self.epoch_avg = (EpochAverage(self.model, tau=cfg.train.epoch_avg_tau,
                                       start=cfg.train.epoch_avg_start)
                          if cfg.train.epoch_avg_tau > 0 else None)
        # The class prior weighs the GKL/IKL loss and the "gkl" attack objective.
        self.uses_prior = self.objective.needs_prior or cfg.attack.objective == "gkl"

    def __call__(self, x: Tensor, y: Tensor, *, attack: PGDAttack, epoch: int,
                 lr: float) -> dict[str, float]:
        """One step on the loader's batch (x, y); returns the batch's mean loss terms, its count
        of correct clean predictions and its size. A non-finite loss returns before any update."""
        data, device = self.cfg.data, self.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if data.two_view:  # (basic, augmented) views: one batch, labels twice
            x, y = torch.cat(x), torch.cat([y, y])
        x = x.to(device, non_blocking=True)
        if data.device_augment:
            x = to_unit_float(random_crop_flip(x))
        x = x.contiguous(memory_format=self.memory_format)
        y = y.to(device, non_blocking=True)
        n_basic = len(y) // 2 if data.two_view else len(y)

        rows = self.prior.rows(y) if self.uses_prior else None
        with self.attack_amp:
            x_adv = attack(self.net, x, y, prior_rows=rows if attack.needs_prior else None)
        awp_on = self.awp is not None and self.awp.active(epoch)
        with self.train_amp:
            diff = (self.awp.perturb(self.objective, x, x_adv, y, rows, lr=lr) if awp_on
                    else None)
            logits_adv, logits_nat = self.train_net(x_adv), self.train_net(x)
            guide = self.natural_train(x) if self.natural is not None else None
            out = _step_objective(self.objective, logits_nat, logits_adv, y, rows, data.two_view,
                                  data.aug_weight, guide)
        # One device sync per step for the logs and the finiteness check.
        values = torch.stack([out["loss"].detach(), out["ce"].detach(), out["robust"].detach(),
                              (logits_nat.argmax(1) == y).sum().to(out["loss"].dtype)]).tolist()
        stats = {**dict(zip(STATS, values)), "n": len(y)}
        if not math.isfinite(stats["loss"]):
            return stats
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        if diff is not None:
            self.awp.restore(diff)
        if self.uses_prior:
            self.prior.update(logits_nat[:n_basic], y[:n_basic])
        self.ema.update(self.model, epoch)
        return stats

"""One adversarial training (or distillation) step, as the trainer and the benchmarks run it.

the teacher's clean logits (distillation; once per batch) -> attack (the method's objective, start
and model mode, PGD or one step; clean logits cached) -> clean and adversarial forward (train
mode, in the method's order; one forward at attack.eps 0; the fast methods none clean, Rice et
al.'s PGD-AT its clean one after the step) -> GradAlign's input-gradient term -> objective dict
-> backward -> optimizer step (inside an AWP perturbation when active) -> class-prior update
(from the model's or the teacher's clean logits) -> weight-EMA update. On CUDA the forward passes can run in bf16 autocast, channels_last and
compiled.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from advgkl.attacks.pgd import PGDAttack
from advgkl.attacks.single_step import gradient_alignment
from advgkl.config import Config
from advgkl.config.methods import METHODS
from advgkl.data.tensors import random_crop_flip, to_unit_float
from advgkl.distributed import broadcast_buffers
from advgkl.losses.functional import cross_entropy
from advgkl.methods.awp import AWP
from advgkl.methods.objectives import Logits, build_objective, two_view_terms
from advgkl.methods.priors import ClassPrior
from advgkl.training.ema import EpochAverage, WeightEMA

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


def _no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names the timm models inside `module` exempt from decay (no_weight_decay())."""
    names = set()
    for prefix, sub in module.named_modules():
        if callable(getattr(sub, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    return names


def build_optimizer(model: nn.Module, cfg: Config, *others: nn.Module) -> torch.optim.Optimizer:
    """One SGD or AdamW over the parameters of `model` and `others` (LBGAT's natural model);
    biases and norm weights (1-d) and the timm models' no_weight_decay() names exempt from decay
    when asked (the groups timm's create_optimizer builds)."""
    t = cfg.train
    decay, no_decay = [], []
    for module in (model, *others):
        skip = _no_decay_names(module) if t.no_decay_list else set()
        for name, p in module.named_parameters():
            exempt = (t.no_decay_bn_bias and p.dim() <= 1) or name in skip
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)


def build_mixup(cfg: Config, num_classes: int) -> Callable | None:
    """timm's Mixup / CutMix (per batch, soft targets with data.smoothing), or None when off."""
    d = cfg.data
    if not (d.mixup or d.cutmix):
        return None
    from advgkl.models.imagenet import import_timm

    return import_timm().data.Mixup(
        mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
        switch_prob=d.mixup_switch_prob, mode="batch", label_smoothing=d.smoothing,
        num_classes=num_classes)


def hard_labels(y: Tensor) -> Tensor:
    """(B,) labels, or the most likely class of (B, C) soft targets."""
    return y.argmax(1) if y.dim() > 1 else y


def _ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` behind DistributedDataParallel when there are several processes."""
    if world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


class TrainStep:
    """The model (on `device`, in the configured memory format), its compiled / DDP views, and
    everything training updates: optimizer, class prior, AWP, EMA (per step), the epoch average
    (per epoch, by the trainer; None when off) and LBGAT's natural model (`natural`, trained in
    train mode by the same optimizer; None for the other methods). A distillation method's frozen
    `teacher` runs beside the student (same device, memory format and autocast; never in the
    optimizer, the EMA or the epoch average; unwrapped under DDP)."""

    def __init__(self, cfg: Config, model: nn.Module, num_classes: int, device: torch.device, *,
                 world: int = 1, note: Callable[[str], None] = print,
                 natural: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        self.cfg, self.device, self.world = cfg, device, world
        self.method = METHODS[cfg.loss.method]
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
        self.natural = self.natural_train = self.teacher = None
        if self.method.natural_model:
            if natural is None:
                raise ValueError("natural: lbgat trains a natural model beside the robust one")
            self.natural = natural.to(device, memory_format=self.memory_format).train()
            self.natural_train = _ddp(self.natural, device, world)
        if self.method.teacher:
            if teacher is None:
                raise ValueError(f"teacher: method {cfg.loss.method} distils a teacher")
            self.teacher = teacher.to(device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, cfg,
                                         *([self.natural] if self.natural is not None else []))
        self.objective = build_objective(cfg.loss.method, cfg.loss.settings,
                                         dataset=cfg.data.dataset)
        prior = self.objective.prior or (cfg.loss.settings.prior() if cfg.attack.objective == "gkl"
                                         else None)
        # The class prior weighs GKL/IKL's loss and "gkl" attack (fed by the model's clean
        # softmax) or a distillation divergence (fed by the teacher's).
        self.prior_source = prior["source"] if prior else None
        prior = prior or {"temperature": 1.0, "momentum": 1.0, "mode": "epoch"}
        self.prior = ClassPrior(num_classes, temperature=prior["temperature"],
                                momentum=prior["momentum"], mode=prior["mode"], device=device)
        self.awp = (AWP(self.model, gamma=cfg.awp.gamma, warmup_epochs=cfg.awp.warmup_epochs,
                        lr=cfg.train.lr) if cfg.awp.gamma > 0 else None)  # the proxy: a full copy
        self.ema = WeightEMA(self.model, tau=cfg.train.ema_tau,
                             start_epoch=cfg.train.ema_start_epoch, warmup=cfg.train.ema_warmup,
                             from_init=cfg.train.ema_from_init)
        self.mixup = build_mixup(cfg, num_classes)
        self.epoch_avg = (EpochAverage(self.model, tau=cfg.train.epoch_avg_tau,
                                       start=cfg.train.epoch_avg_start)
                          if cfg.train.epoch_avg_tau > 0 else None)
        self.teacher_on_clean = self.method.teacher and cfg.loss.settings.teacher_on_clean()

    def _teacher_logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def _attack(self, attack: PGDAttack, x: Tensor, y: Tensor, rows: Tensor | None,
                teacher_nat: Tensor | None) -> Tensor:
        with self.attack_amp:
            return attack(self.net, x, y, prior_rows=rows if attack.needs_prior else None,
                          logits_nat=teacher_nat if attack.objective == "teacher_kl" else None,
                          teacher=self.teacher if attack.objective == "adaad" else None)

    def _forwards(self, x: Tensor, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        """(clean logits, adversarial logits) in the method's order; one forward without an
        attack (attack.eps 0). A method without a clean forward before the step (the fast
        methods, Rice et al.'s PGD-AT) gets its adversarial logits twice."""
        if x_adv is None:
            logits_nat = self.train_net(x)
            return logits_nat, logits_nat
        if self.method.clean_forward != "before":
            logits_adv = self.train_net(x_adv)
            return logits_adv, logits_adv
        if self.method.clean_first:
            logits_nat = self.train_net(x)
            return logits_nat, self.train_net(x_adv)
        logits_adv = self.train_net(x_adv)
        return self.train_net(x), logits_adv

    def __call__(self, x: Tensor, y: Tensor, *, attack: PGDAttack, epoch: int, lr: float,
                 momentum: float | None = None) -> dict[str, float]:
        """One optimizer step on the loader's batch (x, y) at `lr` (and `momentum`, when the
        schedule cycles it), over train.accumulate micro-batches (Mixup/CutMix per micro-batch,
        gradients summed, synchronized under DDP once); returns the batch's mean loss terms, its
        count of correct clean predictions and its size (methods without a clean forward: of the
        adversarial batch, as their authors log). A non-finite loss returns before any update."""
        data, device = self.cfg.data, self.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if momentum is not None:
                group["momentum"] = momentum
        if data.two_view:  # (basic, augmented) views: one batch, labels twice
            x, y = torch.cat(x), torch.cat([y, y])
        x = x.to(device, non_blocking=True)
        if data.device_augment:
            x = to_unit_float(random_crop_flip(x))
        x = x.contiguous(memory_format=self.memory_format)
        y = y.to(device, non_blocking=True)
        if self.world > 1:  # the attack bypasses DDP, which would have synced them
            broadcast_buffers(self.model)
        parts = self.cfg.train.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {k: 0.0 for k in (*STATS, "n")}
        done = []
        for j, (xj, yj) in enumerate(zip(x.chunk(parts), y.chunk(parts))):
            with self._sync(j == parts - 1):
                stats, after = self._micro(xj, yj, attack, epoch, 1.0 / parts)
            for key in STATS:
                totals[key] += stats[key] * (1 if key == "correct" else stats["n"])
            totals["n"] += stats["n"]
            if not math.isfinite(stats["loss"]):
                return stats
            done.append(after)
        self.optimizer.step()
        for after in done:  # Rice et al.'s clean forward: accumulate 1 only (config)
            totals.update(self._after_step(*after))
        self.ema.update(self.model, epoch)
        n = totals["n"]
        return {**{k: totals[k] / n for k in ("loss", "ce", "robust")},
                "correct": totals["correct"], "n": int(n)}

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce only with the last micro-batch's backward."""
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for net in (self.train_net, self.natural_train):
            if isinstance(net, DistributedDataParallel):
                stack.enter_context(net.no_sync())
        return stack

    def _micro(self, x: Tensor, y: Tensor, attack: PGDAttack, epoch: int,
               scale: float) -> tuple[dict[str, float], tuple]:
        """Attack, forwards and backward (of loss * scale) of one micro-batch; (its stats, what
        the after-step work needs)."""
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        n_basic = len(y) // 2 if self.cfg.data.two_view else len(y)
        rows = self.prior.rows(y) if self.prior_source else None
        with self.train_amp:
            teacher_nat = self._teacher_logits(x) if self.teacher_on_clean else None
        x_adv = self._attack(attack, x, y, rows, teacher_nat) if attack.eps > 0 else None
        awp_on = self.awp is not None and self.awp.active(epoch)
        with self.train_amp:
            diff = (self.awp.perturb(self.objective, x, x if x_adv is None else x_adv, y, rows)
                    if awp_on else None)
            logits_nat, logits_adv = self._forwards(x, x_adv)
            reg = (gradient_alignment(self.train_net, x, y, attack.start_grad, attack.eps)
                   if self.method.input_gradient_reg and x_adv is not None else None)
            logits = Logits(
                logits_nat, logits_adv, y, rows, epoch=epoch, teacher_nat=teacher_nat,
                guide=self.natural_train(x) if self.natural is not None else None,
                teacher_adv=(self._teacher_logits(x if x_adv is None else x_adv)
                             if self.method.attack == "adaad" else None), input_reg=reg)
            out = (two_view_terms(self.objective, logits, self.cfg.data.aug_weight)
                   if self.cfg.data.two_view else self.objective(logits))
        # One device sync per micro-batch for the logs and the finiteness check.
        values = torch.stack([out["loss"].detach(), out["ce"].detach(), out["robust"].detach(),
                              (logits_nat.argmax(1) == hard_labels(y)).sum().to(out["loss"].dtype)
                              ]).tolist()
        stats = {**dict(zip(STATS, values)), "n": len(y)}
        if math.isfinite(stats["loss"]):
            (out["loss"] * scale if scale != 1 else out["loss"]).backward()
        clean = x if x_adv is not None and self.method.clean_forward == "after" else None
        return stats, (diff, clean, y, logits_nat[:n_basic].detach(), teacher_nat)

    def _after_step(self, diff: Any, x_clean: Tensor | None, y: Tensor, logits_nat: Tensor,
                    teacher_nat: Tensor | None) -> dict[str, float]:
        """AWP's restore, Rice et al.'s clean forward after the step (its CE and correct count
        replace the logged ones), the class prior's update."""
        if diff is not None:
            self.awp.restore(diff)
        if self.prior_source == "student":
            self.prior.update(logits_nat, y[:len(logits_nat)])
        elif self.prior_source == "teacher":
            self.prior.update(teacher_nat, y)
        if x_clean is None:
            return {}
        with torch.no_grad(), self.train_amp:  # Rice et al.: for the logs; BN moves
            logits_nat = self.net(x_clean)
        ce, correct = torch.stack([cross_entropy(logits_nat, y),
                                   (logits_nat.argmax(1) == hard_labels(y)).sum().float()]).tolist()
        return {"ce": ce * len(y), "correct": correct}

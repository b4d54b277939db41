"""The learning-rate schedules the configs name (`train.lr_schedule`)."""

from __future__ import annotations

import math

import numpy as np


def peak_lr(lr: float, batch_size: int, base_batch: int) -> float:
    """ARES' scaling rule: lr * global batch / base_batch (base_batch 0: lr as given)."""
    return lr * batch_size / base_batch if base_batch else lr


def _singh_epoch_value(t: float, epochs: int, lr: float, warmup: int, start: float,
                       lr_min: float) -> float:
    """Singh et al.'s get_cosine_lr at epoch t (0-based): linear from `start` to lr over the
    warm-up, then cosine to lr_min."""
    if t <= warmup:
        return float(np.interp([t], [0, warmup], [start, lr])[0])
    return lr_min + .5 * (lr - lr_min) * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def _timm_cosine(g: int, total: int, lr: float, warmup_t: int, start: float,
                 lr_min: float) -> float:
    """timm's CosineLRScheduler (one cycle, no warm-up prefix, k 1) at update g of `total`."""
    if g < warmup_t:
        return start + g * ((lr - start) / warmup_t)
    if g >= total:
        return lr_min
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * g ** 1.0 / total ** 1.0))


def _cyclic_scale(epoch: int, epochs: int, step: int, batches: int) -> float:
    """torch's CyclicLR (triangular; half the iterations up, half down) as Wong et al.'s and
    de Jorge et al.'s scripts build it, at the iteration this step runs with: the scheduler steps
    after each optimizer step, so step 0 of epoch 1 runs at lr 0. Same float operations."""
    total = float(epochs * batches)
    g = (epoch - 1) * batches + step
    x = 1.0 + g / total - math.floor(1 + g / total)
    return x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)


def cyclic_momentum(epoch: int, epochs: int, step: int, batches: int) -> float:
    """CyclicLR's default cycle_momentum (base 0.8, max 0.9): 0.9 at lr 0, 0.8 at the peak."""
    return 0.9 - (0.9 - 0.8) * _cyclic_scale(epoch, epochs, step, batches)


def learning_rate(schedule: str, epoch: int, epochs: int, step: int, batches: int, *, lr: float,
                  warmup: int, milestones: list[int], first: list[float] = (),
                  warmup_start: float = 0.0, lr_min: float = 0.0) -> float:
    """LR of step `step` (0-based) of the `batches` steps of `epoch` (1-based).

    first: explicit lrs of the first epochs (a hand-written warm-up, LBGAT's [0.02]), before the
    schedule's own value.
    cosine (the paper's, set per epoch): lr * epoch / warmup during warm-up, then
    lr * (1 + cos(pi * (epoch - warmup) / (epochs - warmup + 1))) / 2.
    cosine_shifted (the paper authors' TRADES-AWP script, per epoch): after the warm-up,
    lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, the full lr in epoch 1.
    piecewise: divided by 10 from each milestone epoch on (a milestone equal to `epochs` divides
    the last epoch only), after the warm-up.
    cosinew (DM-AT, per step): linear warm-up, then cosine to 0 over the remaining steps.
    cyclic (Wong et al., de Jorge et al., per step): torch's CyclicLR from 0 up to lr over the
    first half of all steps and back to 0 over the second.
    superconverge (Andriushchenko & Flammarion's "cyclic", Rice et al.'s "superconverge", per
    step at t = epochs done + (step + 1) / batches): np.interp(t, [0, epochs * 2 // 5, epochs],
    [0, lr, 0]).
    piecewise_step (Rice et al., per step at the same t): lr / 10 ** (milestones passed by t).
    warmup_cosine (Singh et al. 2023, main.py): per epoch, linear from warmup_start to lr over
    `warmup` epochs then cosine to lr_min; per step interpolated linearly between this epoch's
    value and the next's (their np.interp over the epoch's iterations).
    timm_cosine (ARES: timm's CosineLRScheduler stepped on updates): linear from warmup_start
    over `warmup` epochs of updates, then lr_min + (lr - lr_min)(1 + cos(pi g / all updates))/2
    at update g (the warm-up is not a prefix: the cosine counts from update 0).
    """
    if epoch <= len(first):
        return first[epoch - 1]
    if schedule == "cosinew":
        t = epoch - 1 + step / batches
        if t < warmup:
            return lr * t / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))
    if schedule == "cyclic":
        return lr * _cyclic_scale(epoch, epochs, step, batches)
    if schedule == "warmup_cosine":
        a, b = (_singh_epoch_value(t, epochs, lr, warmup, warmup_start, lr_min)
                for t in (epoch - 1, epoch))
        return float(np.interp([step], [0, batches], [a, b])[0])
    if schedule == "timm_cosine":
        return _timm_cosine((epoch - 1) * batches + step, epochs * batches, lr, warmup * batches,
                            warmup_start, lr_min)
    t_end = epoch - 1 + (step + 1) / batches
    if schedule == "superconverge":
        return float(np.interp([t_end], [0, epochs * 2 // 5, epochs], [0, lr, 0])[0])
    if schedule == "piecewise_step":
        return lr / 10 ** sum(t_end >= m for m in milestones)
    if epoch < warmup:
        return lr * epoch / warmup
    if schedule == "piecewise":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    if schedule == "cosine_shifted":
        return lr * 0.5 * (1 + math.cos((epoch - 1) / epochs * math.pi))
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup + 1)))

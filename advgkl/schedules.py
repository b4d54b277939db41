"""The learning-rate schedules the configs name (`train.lr_schedule`)."""

from __future__ import annotations

import math


def learning_rate(schedule: str, epoch: int, epochs: int, progress: float, *, lr: float,
                  warmup: int, milestones: list[int], first: list[float] = ()) -> float:
    """LR in `epoch` (1-based) at fraction `progress` of it.

    first: explicit lrs of the first epochs (a hand-written warm-up, LBGAT's [0.02]), before the
    schedule's own value.
    cosine (the paper's, set per epoch): lr * epoch / warmup during warm-up, then
    lr * (1 + cos(pi * (epoch - warmup) / (epochs - warmup + 1))) / 2.
    cosine_shifted (the paper authors' TRADES-AWP script, per epoch): after the warm-up,
    lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, the full lr in epoch 1.
    piecewise: divided by 10 from each milestone epoch on (a milestone equal to `epochs` divides
    the last epoch only), after the warm-up.
    cosinew (DM-AT, per step): linear warm-up, then cosine to 0 over the remaining steps.
    """
    if epoch <= len(first):
        return first[epoch - 1]
    if schedule == "cosinew":
        t = epoch - 1 + progress
        if t < warmup:
            return lr * t / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))
    if epoch < warmup:
        return lr * epoch / warmup
    if schedule == "piecewise":
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    if schedule == "cosine_shifted":
        return lr * 0.5 * (1 + math.cos((epoch - 1) / epochs * math.pi))
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup + 1)))

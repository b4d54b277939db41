"""Weight averages: the per-step EMA and the epoch-level average, each a copy of all parameters
and buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """EMA of a model's state, as in the paper's code: during epoch `start_epoch` the copy follows
    the weights; from the next epoch on, after each step, ema <- decay * ema + (1 - decay) * w.
    decay = tau, or min(tau, (1 + n) / (10 + n)) after n averaging steps with `warmup` (DM-AT).
    Integer buffers (BatchNorm's step counter) are copied. Epochs count from 1.
    `from_init` (timm's ModelEmaV2, the ImageNet recipes): the copy starts as the initial weights
    and every step averages, whatever the epoch (lerp, where timm computes decay * e + (1 -
    decay) * w: the same up to rounding; timm also averages the integer step counter)."""

    def __init__(self, model: nn.Module, *, tau: float, start_epoch: int,
                 warmup: bool = False, from_init: bool = False) -> None:
        if not 0 <= tau < 1:
            raise ValueError(f"tau: {tau} must be in [0, 1)")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.tau, self.start_epoch, self.warmup = tau, start_epoch, warmup
        self.from_init = self.started = from_init
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        if epoch < self.start_epoch and not self.from_init:
            return
        ours, theirs = self.module.state_dict(), model.state_dict()
        if not self.from_init and (epoch == self.start_epoch or not self.started):
            for key, value in theirs.items():
                ours[key].copy_(value)
            self.started = True
            return
        decay = min(self.tau, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.tau
        for key, value in theirs.items():
            if value.is_floating_point():
                ours[key].lerp_(value, 1 - decay)
            else:
                ours[key].copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "started": self.started,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.started, self.updates = state["started"], state["updates"]


class EpochAverage:
    """The epoch-level weight average the paper's pipeline evaluates: avg <- the weights after
    epoch `start`, then after each later epoch e, avg <- (1 - tau) * w_e + tau * avg over the
    whole state dict (parameters and BatchNorm running statistics, no re-estimation). Integer
    buffers (BatchNorm's step counter, unused in eval mode) take the latest value. `module` holds
    the average, ready to evaluate. Fed the per-epoch checkpoints afterwards, it gives the same
    bits as when kept online during training."""

    def __init__(self, model: nn.Module, *, tau: float, start: int) -> None:
        if not 0 <= tau < 1:
            raise ValueError(f"tau: {tau} must be in [0, 1)")
        if start < 1:
            raise ValueError(f"start: {start} must be an epoch >= 1")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.tau, self.start = tau, start
        self.epochs: list[int] = []     # the epochs averaged so far

    @property
    def started(self) -> bool:
        return bool(self.epochs)

    @torch.no_grad()
    def update(self, state: dict, epoch: int) -> None:
        """Average in the state dict `state`, the weights after `epoch` (epochs in order)."""
        if epoch < self.start:
            return
        if self.epochs and epoch != self.epochs[-1] + 1:
            raise ValueError(f"epoch {epoch} does not follow epoch {self.epochs[-1]}")
        ours = self.module.state_dict()
        for key, value in state.items():
            if self.epochs and value.is_floating_point():
                ours[key].copy_((1 - self.tau) * value.to(ours[key]) + self.tau * ours[key])
            else:
                ours[key].copy_(value)
        self.epochs.append(epoch)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "tau": self.tau, "start": self.start,
                "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.tau, self.start, self.epochs = state["tau"], state["start"], list(state["epochs"])

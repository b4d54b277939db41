"""Class-wise prior: for each true class, the mean clean softmax of its samples (GKL's global
information), replacing per-sample weights with class-level ones."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

MODES = ("epoch", "ema")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ClassPrior:
    """A (C, C) row-stochastic prior, uniform at the start.

    `update(logits_nat, y)` adds softmax(logits_nat / temperature) to the row of each sample's true
    class. In "epoch" mode `end_epoch()` turns the sums into fresh rows and mixes them in,
    P <- momentum * fresh + (1 - momentum) * P (momentum 1 replaces P, as in the paper); in "ema"
    mode every `update` does that with the batch's sums. Classes without samples keep their row.
    Under torch.distributed the sums are all-reduced first, so every rank holds the same prior.
    """

    def __init__(self, num_classes: int, *, temperature: float = 1.0, momentum: float = 1.0,
                 mode: str = "epoch", device: torch.device | str | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes: needs at least 2, got {num_classes}")
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum: {momentum} must be in (0, 1]")
        if temperature <= 0:
            raise ValueError(f"temperature: {temperature} must be > 0")
        self.num_classes, self.temperature, self.momentum, self.mode = (
            num_classes, temperature, momentum, mode)
        self.prior = torch.full((num_classes, num_classes), 1.0 / num_classes, device=device)
        # float64 sums: an epoch of millions of generated images must not lose small additions.
        self._sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    def rows(self, y: Tensor) -> Tensor:
        """(B,) labels -> (B, C): the prior row of each sample's true class; (B, C) soft
        targets (Mixup/CutMix) -> their mixture of rows, targets @ prior."""
        if y.dim() > 1:
            return y.to(self.prior) @ self.prior
        return self.prior[y.to(self.prior.device)]

    @torch.no_grad()
    def update(self, logits_nat: Tensor, y: Tensor) -> None:
        """Accumulate the clean softmax of a batch into its true classes' rows (soft targets:
        into every class's row, weighted by the target)."""
        if logits_nat.shape != (y.shape[0], self.num_classes):
            raise ValueError(f"logits_nat: expected shape ({y.shape[0]}, {self.num_classes}), "
                             f"got {tuple(logits_nat.shape)}")
        probs = F.softmax(logits_nat.detach().double() / self.temperature, dim=1)
        probs = probs.to(self._sums.device)
        if y.dim() > 1:
            self._sums += y.to(self._sums).T @ probs
        else:
            self._sums.index_add_(0, y.to(self._sums.device), probs)
        if self.mode == "ema":
            self._mix_in_sums()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Mix the epoch's sums into the prior (epoch mode) and start a new epoch."""
        self._mix_in_sums()

    def _mix_in_sums(self) -> None:
        if _distributed():
            dist.all_reduce(self._sums)
        totals = self._sums.sum(1, keepdim=True)
        seen = totals.squeeze(1) > 0
        fresh = (self._sums[seen] / totals[seen]).to(self.prior.dtype)
        self.prior[seen] = self.momentum * fresh + (1 - self.momentum) * self.prior[seen]
        self._sums.zero_()

    def state_dict(self) -> dict:
        return {"prior": self.prior.clone(), "sums": self._sums.clone(),
                "temperature": self.temperature, "momentum": self.momentum, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        prior, sums = state["prior"], state["sums"]
        if prior.shape != self.prior.shape:
            raise ValueError(f"prior: saved shape {tuple(prior.shape)} does not match "
                             f"{tuple(self.prior.shape)} (num_classes = {self.num_classes})")
        self.prior.copy_(prior)
        self._sums.copy_(sums)
        self.temperature, self.momentum, self.mode = (
            state["temperature"], state["momentum"], state["mode"])

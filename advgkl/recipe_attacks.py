"""The training attacks of the published ImageNet recipes, Linf, model in eval mode:

- `APGDTrain` (Singh, Croce & Hein 2023, autopgd_train_clean.py's apgd_train): APGD from x itself
  (no random start), initial step 2 eps, momentum 0.75 from the second iteration, the step halved
  per point at APGD's checkpoints; returns, per point, the highest-loss point seen, the clean
  image included. Loss per point: CE on labels or soft targets ("ce"), or the soft CE against
  the clean softmax ("kl", for TRADES-like methods in the same recipe: our extension).
- `AresPGD` (ARES 2.0, ares/utils/adv.py's adv_generator with attack_criterion mixup): uniform
  start in the ball (drawn as ARES draws it), `steps` signed steps, and the best point kept per
  *batch*: SoftTargetCrossEntropy is a batch mean, so the whole batch is replaced when that mean
  improves, the start included. ARES scores the final iterate on un-normalised images (a quirk of
  adv.py L187); we score it as every other iterate (not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgkl.attacks import PGDAttack, _promoted, targets_for


def _into_ball(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


@dataclass
class APGDTrain(PGDAttack):
    """Singh et al.'s APGD for training (`steps` iterations; 2 in their recipe)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm != "Linf" or self.objective not in ("ce", "kl") or self.restarts != 1:
            raise ValueError("APGDTrain: Linf, objective ce or kl, one restart")

    def _per_point(self, model: nn.Module, x_adv: Tensor, y: Tensor,
                   logits_nat: Tensor | None) -> Tensor:
        z = _promoted(model(x_adv))
        if self.objective == "ce":
            return F.cross_entropy(z, targets_for(y, z), reduction="none")
        return -(F.softmax(_promoted(logits_nat), 1) * F.log_softmax(z, 1)).sum(1)

    def _loss_grad(self, model: nn.Module, x_adv: Tensor, y: Tensor,
                   logits_nat: Tensor | None) -> tuple[Tensor, Tensor]:
        x_adv = x_adv.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._per_point(model, x_adv, y, logits_nat)
            (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
        return loss.detach(), grad.detach()

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None,
             prior_rows: Tensor | None, teacher: nn.Module | None) -> Tensor:
        n, eps = self.steps, self.eps
        checkpoint = max(int(0.22 * n), 1)
        shortest, shrink = max(int(0.06 * n), 1), max(int(0.03 * n), 1)
        step = torch.full((x.shape[0], *[1] * (x.dim() - 1)), 2.0 * eps, device=x.device,
                          dtype=x.dtype)
        x_adv = x.clamp(0.0, 1.0)
        loss, grad = self._loss_grad(model, x_adv, y, logits_nat)
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        history = torch.zeros(n, x.shape[0], device=x.device)  # float32, as theirs
        reduced, best_at_check = torch.ones_like(loss_best).float(), loss_best.clone()
        counter, x_old = 0, x_adv.clone()
        for i in range(n):
            a = 0.75 if i > 0 else 1.0
            momentum, x_old = x_adv - x_old, x_adv.clone()
            plain = _into_ball(x_adv + step * torch.sign(grad), x, eps)
            x_adv = _into_ball(x_adv + (plain - x_adv) * a + momentum * (1 - a), x, eps)
            if i < n - 1:
                loss, grad = self._loss_grad(model, x_adv, y, logits_nat)
            else:  # the last iterate needs no gradient
                with torch.no_grad():
                    loss = self._per_point(model, x_adv, y, logits_nat)
            history[i] = loss
            better = loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = (
                x_adv[better], grad[better], loss[better])
            counter += 1
            if counter == checkpoint:
                rises = sum((history[i - c] > history[i - c - 1]).float()
                            for c in range(checkpoint))
                halve = torch.max((rises <= checkpoint * 0.75).float(),
                                  (1 - reduced) * (best_at_check >= loss_best).float())
                reduced, best_at_check = halve.clone(), loss_best.clone()
                idx = halve > 0
                if idx.any():
                    step[idx] /= 2.0
                    x_adv[idx], grad[idx] = x_best[idx].clone(), grad_best[idx].clone()
                counter, checkpoint = 0, max(checkpoint - shrink, shortest)
        return x_best


@dataclass
class AresPGD(PGDAttack):
    """ARES' PGD for training: its step ramp is the attack schedule `ares_ramp`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm != "Linf" or self.objective != "ce" or self.restarts != 1:
            raise ValueError("AresPGD: Linf, objective ce, one restart")

    def _batch_loss(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
        z = _promoted(model(x_adv))
        return F.cross_entropy(z, targets_for(y, z))

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None,
             prior_rows: Tensor | None, teacher: nn.Module | None) -> Tensor:
        noise = torch.rand_like(x)  # ARES draws, then overwrites, one uniform tensor
        x_adv = torch.clamp(x + noise.uniform_(-self.eps, self.eps), 0, 1)
        best, best_loss = None, None
        for _ in range(self.steps):
            x_adv = x_adv.clone().detach().requires_grad_(True)
            with torch.enable_grad():
                loss = self._batch_loss(model, x_adv, y)
                (grad,) = torch.autograd.grad(loss, [x_adv])
            with torch.no_grad():
                if best is None or best_loss < loss:
                    best, best_loss = x_adv.detach().clone(), loss.detach()
                diff = torch.clamp(x_adv + torch.sign(grad) * self.step_size - x,
                                   -self.eps, self.eps)
                x_adv = torch.clamp(diff + x, 0, 1)
        with torch.no_grad():
            loss = self._batch_loss(model, x_adv, y)
        if best is None or best_loss < loss:
            best = x_adv.detach()
        return best

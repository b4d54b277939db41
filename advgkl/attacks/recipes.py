"""The training attacks of the published ImageNet recipes, Linf, model in eval mode:

- `APGDTrain` (Singh, Croce & Hein 2023, autopgd_train_clean.py's apgd_train): APGD from x itself
  (no random start), initial step 2 eps, momentum 0.75 from the second iteration, the step halved
  per point at APGD's checkpoints; returns, per point, the highest-loss point seen, the clean
  image included. Loss per point: CE on labels or soft targets ("ce"), or the soft CE against
  the clean softmax ("kl", for TRADES-like methods in the same recipe: our extension).
- `AresPGD` (ARES 2.0, ares/utils/adv.py's adv_generator): uniform start in the ball (drawn as
  ARES draws it), `steps` signed steps on the mean loss, and the best point kept, the start
  included, as ARES' criterion scores it: per image with hard labels (`regular`,
  CrossEntropyLoss(reduction='none')), per *batch* with Mixup's soft targets (`mixup`,
  SoftTargetCrossEntropy is a batch mean, so the whole batch is replaced when that mean
  improves). ARES scores the final iterate on un-normalised images (a quirk of adv.py L187); we
  score it as every other iterate (not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack, _promoted, targets_for


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

    def _losses(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
        """ARES' attack criterion: (B,) per image for labels, a batch mean for soft targets."""
        z = _promoted(model(x_adv))
        if y.dim() == 1:
            return F.cross_entropy(z, y, reduction="none")
        return F.cross_entropy(z, targets_for(y, z))

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None,
             prior_rows: Tensor | None, teacher: nn.Module | None) -> Tensor:
        noise = torch.rand_like(x)  # ARES draws, then overwrites, one uniform tensor
        x_adv = torch.clamp(x + noise.uniform_(-self.eps, self.eps), 0, 1)
        best, best_loss = None, None
        for _ in range(self.steps):
            x_adv = x_adv.clone().detach().requires_grad_(True)
            with torch.enable_grad():
                losses = self._losses(model, x_adv, y)
                (grad,) = torch.autograd.grad(losses.mean(), [x_adv])
            with torch.no_grad():
                best, best_loss = _keep_best(x_adv.detach(), losses.detach(), best, best_loss)
                diff = torch.clamp(x_adv + torch.sign(grad) * self.step_size - x,
                                   -self.eps, self.eps)
                x_adv = torch.clamp(diff + x, 0, 1)
        with torch.no_grad():
            best, _ = _keep_best(x_adv.detach(), self._losses(model, x_adv, y), best, best_loss)
        return best


def _keep_best(x: Tensor, loss: Tensor, best: Tensor | None, best_loss: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """ARES' replace_best: where the loss (per image, or one for the batch) beats the best so
    far, strictly, the point replaces the best one."""
    if best is None:
        return x.clone(), loss.clone()
    better = best_loss < loss
    mask = better.view(-1, *([1] * (x.dim() - 1))) if better.dim() else better
    return torch.where(mask, x, best), torch.where(better, loss, best_loss)

"""The training attack (inner maximization): PGD under Linf or L2 with each method's objective and
random start, and the schedules that set its size per epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgkl.losses.functional import gkl_loss, soft_cross_entropy

NORMS = ("Linf", "L2")
OBJECTIVES = ("kl", "teacher_kl", "adaad", "gkl", "ce", "cw")
RANDOM_STARTS = ("normal", "uniform", "uniform_unclamped", "none")


def _per_sample_l2(t: Tensor) -> Tensor:
    """(B, ...) -> (B, 1, ..., 1) L2 norms, broadcastable against `t`."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Into the eps ball around x, then into [0, 1] (Linf: min(max(x_adv, x - eps), x + eps), the
    form TRADES' and the paper's code use, so the same inputs give the same bits)."""
    if norm == "Linf":
        return x_adv.clamp(x - eps, x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    delta = delta * (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str, kind: str) -> Tensor:
    if kind == "none":
        return x.clone()
    if kind == "normal":  # TRADES' and the paper's start: 0.001 * N(0, 1)
        return x + 0.001 * torch.randn_like(x)
    if norm == "Linf":  # uniform_unclamped (ARD): the first gradient before any projection
        return x + torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    direction = direction / _per_sample_l2(direction).clamp_min(1e-12)
    radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
    return x + eps * radius.view(-1, *([1] * (x.dim() - 1))) * direction


def _promoted(t: Tensor) -> Tensor:
    """At least float32 (bf16 logits under autocast), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def targets_for(y: Tensor, logits: Tensor) -> Tensor:
    """Labels as they are; soft targets (B, C) in the logits' dtype, for F.cross_entropy."""
    return y if y.dim() == 1 else y.to(logits.dtype)


def _summed_kl(logits: Tensor, target_logits: Tensor) -> Tensor:
    """sum KL(softmax(target) || softmax(logits)) as KLDivLoss computes it (RSLAD's and AdaAD's
    attacks); gradients reach the target too when it has them (AdaAD: through the teacher)."""
    return F.kl_div(F.log_softmax(_promoted(logits), dim=1),
                    F.softmax(_promoted(target_logits), dim=1), reduction="sum")


@dataclass
class PGDAttack:
    """`attack(model, x, y, logits_nat=None, prior_rows=None, teacher=None) -> x_adv` for images
    x in [0, 1].

    objective "kl": soft CE against the clean softmax (KL's gradient; TRADES' and the paper's
    CIFAR-10 inner maximization); "teacher_kl": the same against the teacher's clean softmax
    (`logits_nat` = the teacher's logits, required; RSLAD); "adaad": sum KL(softmax(teacher(x'))
    || softmax(model(x'))) through both networks (`teacher`, required; AdaAD); "gkl": alpha * sCE
    + beta * wMSE with the batch's class-prior rows raised to gamma (`prior_rows`, required), the
    GKL robust term with the clean logits held fixed (the paper's CIFAR-100 inner maximization:
    alpha = beta = gamma = 1); "ce": Madry's cross-entropy; "cw": the Carlini-Wagner margin
    loss. The model runs in eval mode (train mode with `bn_train`, ARD's student) and its mode is
    restored; only the input gets gradients, never the parameters. Clean logits are computed once
    per call when not given.
    Random start "normal" is x + 0.001 * N(0, 1) as is, as in TRADES' and the paper's code: the
    first gradient is taken there, slightly outside [0, 1] at saturated pixels, and only the first
    step projects; "uniform_unclamped" (ARD) is x + U(-eps, eps), likewise unprojected until the
    first step. "uniform" (Madry's) is projected before the first gradient. Every step projects
    into the ball and [0, 1], and so does a 0-step attack: x_adv always satisfies both.
    """

    eps: float
    step_size: float
    steps: int
    norm: str = "Linf"
    objective: str = "kl"
    random_start: str = "normal"
    bn_train: bool = False
    alpha: float = 1.0      # objective "gkl" only: weights of sCE and wMSE, prior exponent
    beta: float = 1.0
    gamma: float = 1.0
    restarts: int = 1
    final_loss_forward: bool = False  # Rice et al.: a per-point CE forward ends each restart

    def __post_init__(self) -> None:
        for name, value, allowed in (("norm", self.norm, NORMS),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("random_start", self.random_start, RANDOM_STARTS)):
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError("eps, step_size and steps must be >= 0")
        if self.restarts < 1 or (self.restarts > 1 and not self.final_loss_forward):
            raise ValueError("restarts: >= 1; several restarts need final_loss_forward (the "
                             "per-point loss that picks the strongest)")

    def _loss(self, logits_adv: Tensor, y: Tensor, logits_nat: Tensor | None,
              prior_rows: Tensor | None) -> Tensor:
        if self.objective == "kl":
            return soft_cross_entropy(logits_adv, logits_nat) * logits_adv.shape[0]
        if self.objective == "teacher_kl":  # RSLAD's form: KLDivLoss summed
            return _summed_kl(logits_adv, logits_nat)
        if self.objective == "gkl":
            return gkl_loss(logits_adv, logits_nat, prior_rows, alpha=self.alpha, beta=self.beta,
                            gamma=self.gamma) * logits_adv.shape[0]
        if self.objective == "cw":  # Carlini-Wagner margin: best other logit minus the true one
            z = _promoted(logits_adv)
            true = z.gather(1, y[:, None]).squeeze(1)
            other = z.scatter(1, y[:, None], float("-inf")).amax(1)
            return (other - true).sum()
        z = _promoted(logits_adv)
        return F.cross_entropy(z, targets_for(y, z), reduction="sum")

    def _step(self, x_adv: Tensor, grad: Tensor) -> Tensor:
        if self.norm == "Linf":
            return x_adv + self.step_size * grad.sign()
        return x_adv + self.step_size * grad / _per_sample_l2(grad).clamp_min(1e-12)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None,
             prior_rows: Tensor | None, teacher: nn.Module | None) -> Tensor:
        """One restart: the start, then `steps` steps."""
        x_adv = _random_start(x, self.eps, self.norm, self.random_start)
        if self.random_start not in ("normal", "uniform_unclamped") or self.steps == 0:
            x_adv = _project(x_adv, x, self.eps, self.norm)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = (_summed_kl(model(x_adv), teacher(x_adv)) if self.objective == "adaad"
                        else self._loss(model(x_adv), y, logits_nat, prior_rows))
                (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = _project(self._step(x_adv.detach(), grad), x, self.eps, self.norm)
        return x_adv.detach()

    @property
    def needs_prior(self) -> bool:
        return self.objective == "gkl"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None = None,
                 prior_rows: Tensor | None = None, teacher: nn.Module | None = None) -> Tensor:
        if self.needs_prior and prior_rows is None:
            raise ValueError("prior_rows: objective 'gkl' needs the class-prior rows of the batch")
        if self.objective == "teacher_kl" and logits_nat is None:
            raise ValueError("logits_nat: objective 'teacher_kl' needs the teacher's logits")
        if self.objective == "adaad" and teacher is None:
            raise ValueError("teacher: objective 'adaad' attacks through the teacher")
        was_training = model.training
        model.train(self.bn_train)
        try:
            x = x.detach()
            if self.objective in ("kl", "gkl") and logits_nat is None:
                with torch.no_grad():
                    logits_nat = model(x)
            if logits_nat is not None:
                logits_nat = logits_nat.detach()
            best, best_loss = None, None
            for _ in range(self.restarts):
                x_adv = self._run(model, x, y, logits_nat, prior_rows, teacher)
                if not self.final_loss_forward:
                    return x_adv
                with torch.no_grad():  # Rice et al.: a forward in the attack's mode, then max
                    z = _promoted(model(x_adv))
                    loss = F.cross_entropy(z, targets_for(y, z), reduction="none")
                if best is None:
                    best, best_loss = x_adv, loss
                    continue
                better = loss >= best_loss
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_loss = torch.maximum(best_loss, loss)
            return best
        finally:
            model.train(was_training)


ScheduleFn = Callable[[int, int, float, float, int], "tuple[float, float, int]"]


def _constant(epoch: int, epochs: int, eps: float, step_size: float, steps: int):
    return eps, step_size, steps


def _linear_ramp(epoch: int, epochs: int, eps: float, step_size: float, steps: int):
    frac = epoch / epochs
    return eps * frac, step_size * frac, steps


def _paper_effective(epoch: int, epochs: int, eps: float, step_size: float, steps: int):
    eps_t = eps * epoch / epochs
    return eps_t, eps_t / 2, 5


def _paper_intended(epoch: int, epochs: int, eps: float, step_size: float, steps: int):
    eps_t = eps * epoch / epochs
    scale = epochs / 200.0
    if epoch <= int(50 * scale):
        return eps_t, eps_t, 2
    if epoch <= int(100 * scale):
        return eps_t, 2 * eps_t / 3, 3
    if epoch <= int(150 * scale):
        return eps_t, eps_t / 2, 4
    return eps_t, eps_t / 2, 5


def _ares_ramp(epoch: int, epochs: int, eps: float, step_size: float, steps: int):
    return eps, step_size * min(epoch - 1, 5) / 5, steps


SCHEDULES: dict[str, ScheduleFn] = {
    "constant": _constant,
    "linear_ramp": _linear_ramp,
    "paper_effective": _paper_effective,
    "paper_intended": _paper_intended,
    "ares_ramp": _ares_ramp,
}
"""Attack schedules, (epoch, epochs, eps, step_size, steps) -> (eps_t, step_size_t, steps_t).

- constant: the configured attack every epoch.
- linear_ramp: eps and step size scaled by epoch / epochs, steps unchanged.
- paper_effective: what the paper's code runs ("high" budget): eps_t = eps * epoch / epochs,
  5 steps of eps_t / 2 every epoch. Its if-chain overwrites the budget, so the intended
  piecewise schedule never took effect; this preset reproduces the published models.
- paper_intended: that intended budget, unreached by the published runs: up to epoch 50 (of 200,
  scaled) 2 steps of eps_t, to 100 3 steps of 2 eps_t / 3, to 150 4 steps of eps_t / 2, then 5.
- ares_ramp (ARES 2.0's adversarial_training.py): the step size times min(epoch - 1, 5) / 5, so
  0 in the first epoch and the full step from the sixth; eps and steps unchanged.
Epochs count from 1, so eps_t reaches eps in the last epoch.
"""


def attack_schedule(name: str, epoch: int, epochs: int, *, eps: float, step_size: float,
                    steps: int) -> tuple[float, float, int]:
    """The attack's (eps, step_size, steps) for `epoch` (1-based) of `epochs` under schedule `name`."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule: {name!r} is not one of {', '.join(SCHEDULES)}")
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch: {epoch} is outside 1..{epochs}")
    return SCHEDULES[name](epoch, epochs, eps, step_size, steps)

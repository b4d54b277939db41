"""Single-step training attacks (FGSM, FGSM-RS, N-FGSM) and GradAlign's input-gradient term,
written in their authors' delta form (delta = x_adv - x; clamps in the authors' order)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack

KINDS = ("fgsm", "n_fgsm")


def _per_channel_uniform(x: Tensor, radius: float) -> Tensor:
    """U(-radius, radius) drawn channel by channel, as Wong et al.'s and de Jorge et al.'s loops
    draw it (the same random stream for the same seed)."""
    delta = torch.zeros_like(x)
    for j in range(x.shape[1]):
        delta[:, j].uniform_(-radius, radius)
    return delta


def clamp_without_gradient_at_bounds(z: Tensor) -> Tensor:
    """clamp(z, 0, 1) whose gradient is 1 strictly inside (0, 1) and 0 at and beyond the
    bounds: what GradAlign's published runs computed through their clamp (max(min(z, 1), 0)
    under their pinned torch 1.4.0), written as a mask so that no torch release's rule at a tie
    (0 for today's torch.clamp, 0.5 for their helper on today's torch, 1 for some releases)
    changes the step."""
    inside = (z > 0) & (z < 1)
    return torch.where(inside, z, z.detach().clamp(0, 1))


def _into_image(delta: Tensor, x: Tensor) -> Tensor:
    """Clamp delta so that x + delta lies in [0, 1] (their clamp(delta, 0 - X, 1 - X))."""
    return torch.max(torch.min(delta, 1 - x), -x)


@dataclass
class SingleStepAttack(PGDAttack):
    """One signed-gradient step from a start, under Linf.

    kind "fgsm" (Wong et al.; GradAlign with start "none"): delta from `random_start` ("uniform":
    U(-noise eps, noise eps) per channel; "none": zero), clamped into the image; gradient there;
    delta + step_size sign(g) clamped to [-eps, eps], then into the image. kind "n_fgsm"
    (de Jorge et al.): the same start; delta + step_size sign(g) clamped into the image only,
    then to [-clip, clip] when clip > 0. The gradient is of the attack objective (the model in
    train mode with `bn_train`, as the authors run it); the last call's gradient at its start
    stays in `start_grad` (GradAlign's first gradient). `through_clamp` (GradAlign's code) takes
    it through clamp(x + delta, 0, 1) with no gradient at saturated pixels
    (`clamp_without_gradient_at_bounds`, the rule of their published runs), so FGSM leaves them
    where they are."""

    steps: int = 1
    kind: str = "fgsm"
    noise: float = 1.0
    clip: float = 0.0
    through_clamp: bool = False  # GradAlign: the gradient of model(clamp(x + delta, 0, 1))
    start_grad: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in KINDS or self.norm != "Linf" or self.steps != 1:
            raise ValueError(f"kind: {self.kind!r}: one Linf step of {', '.join(KINDS)}")
        if self.random_start not in ("uniform", "none"):
            raise ValueError(f"random_start: {self.random_start!r} is not uniform or none")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, logits_nat: Tensor | None,
             prior_rows: Tensor | None, teacher: nn.Module | None) -> Tensor:
        delta = (_per_channel_uniform(x, self.noise * self.eps) if self.random_start == "uniform"
                 else torch.zeros_like(x))
        delta = _into_image(delta, x).requires_grad_(True)
        with torch.enable_grad():
            x_start = (clamp_without_gradient_at_bounds(x + delta) if self.through_clamp
                       else x + delta)
            loss = self._loss(model(x_start), y, logits_nat, prior_rows)
            (grad,) = torch.autograd.grad(loss, [delta])
        self.start_grad = grad.detach()
        delta = delta.detach() + self.step_size * grad.sign()
        if self.kind == "fgsm":
            return x + _into_image(delta.clamp(-self.eps, self.eps), x)
        delta = _into_image(delta, x)
        return x + (delta.clamp(-self.clip, self.clip) if self.clip > 0 else delta)


def gradient_alignment(model: nn.Module, x: Tensor, y: Tensor, grad: Tensor, eps: float) -> Tensor:
    """1 - mean_b cos(grad_b, grad_x CE(model(x + eta))_b), eta ~ U(-eps, eps) unclamped, with
    the graph kept (double backprop) for the second gradient only; points where either gradient
    is zero are left out (none left: 0)."""
    eta = torch.zeros_like(x).uniform_(-eps, eps).requires_grad_(True)
    loss = F.cross_entropy(model(x + eta), y)
    (grad2,) = torch.autograd.grad(loss, [eta], create_graph=True)
    norm1 = (grad.flatten(1) ** 2).sum(1) ** 0.5
    norm2 = (grad2.flatten(1) ** 2).sum(1) ** 0.5
    keep = (norm1 != 0) & (norm2 != 0)
    if not keep.any():
        return grad2.sum() * 0
    shape = (-1, *([1] * (x.dim() - 1)))
    g1 = grad[keep] / norm1[keep].view(shape)
    g2 = grad2[keep] / norm2[keep].view(shape)
    return 1.0 - (g1 * g2).flatten(1).sum(1).mean()


def build_single_step(kind: str, settings: object, eps: float, **attack: object
                      ) -> SingleStepAttack:
    """The `kind` step with a method's settings (FgsmSettings, GradAlignSettings or
    NFgsmSettings: their `step`, `noise`, `clip` in units of eps); `attack` holds the start
    (random_start: uniform or none), the objective, its gkl weights and bn_train."""
    if kind == "n_fgsm":
        return SingleStepAttack(eps=eps, step_size=settings.step * eps, kind=kind,
                                noise=settings.noise, clip=settings.clip * eps, **attack)
    return SingleStepAttack(eps=eps, step_size=settings.step * eps, kind=kind,
                            through_clamp=settings.gradient_through_clamp(), **attack)

"""The catastrophic-overfitting guard: an end-of-epoch check beside the validation check.

After each epoch the model (eval mode) faces, on a fixed batch of the validation split, the
sanity battery's reference attack: the per-point worst of PGD on CE and PGD on the CW margin
(uniform start, k steps of 2.5 eps / k), which a collapsed model's masked CE gradients cannot
fool; and FGSM (one step of eps from x), along whose step Kim et al.'s (2021) decision-boundary
distortion is measured: the share of the points correct at x and at x + delta whose prediction
changes at some x + (j / 10) delta in between (recorded, not a trigger). An epoch is
catastrophic when its robust accuracy falls by more than `drop` from the last good epoch's
(Wong et al.'s early-stop rule, 0.2), or below `fraction` of the best epoch's and by more than
`min_drop` below it (so that a few points' noise at a low accuracy is no event). The mode says
what happens then: warn (a line in train.log), stop (the weights of the epoch the guard rated
best become the final model), rollback (that epoch's state is restored and training goes on from
it at half the lr; after `rollbacks` of them, stop). Its numbers go to metrics.csv; its state into
every checkpoint, the best epoch's state into co_best.pt.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.data.tensors import as_float
from advgkl.evaluation.quick import reference_flags
from advgkl.rng import own_stream

BEST = "co_best.pt"   # the state of the epoch the guard rates best (what stop and rollback keep)
DISTORTION_STEPS = 10  # Kim et al.'s interval, checked at j / 10 of the FGSM step, j = 1..9
SEED = 0  # the guard's own random stream: training draws the same numbers with it on or off


def guard_mode(mode: str, *, single_step: bool, check: str) -> tuple[str, str]:
    """(the mode a run uses, a line for train.log): auto is stop for single-step training with a
    validation split, else off (an explicit mode without one is refused by the config)."""
    if mode != "auto":
        return mode, ""
    if not single_step:
        return "off", ""
    if check != "val":
        return "off", ("the CO guard is off: it needs a validation split (eval.check=val); "
                       "catastrophic overfitting would go unnoticed")
    return "stop", ""


@dataclass
class GuardState:
    """What a resume needs: the last good epoch's and the best robust accuracy, the epoch rated
    best, the lr scale after rollbacks, the events, and the epoch a stop happened in (0: none)."""

    previous: float | None = None
    best: float | None = None
    good_epoch: int = 0
    best_epoch: int = 0
    lr_scale: float = 1.0
    rollbacks: int = 0
    stopped_at: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def distortion(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[int, int]:
    """(distorted, eligible) of Kim et al.'s decision-boundary distortion: of the points correct
    at x and at x_adv, those misclassified somewhere on x + (j / 10)(x_adv - x), j = 1..9."""
    with torch.no_grad():
        correct = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
        distorted = torch.zeros_like(correct)
        for j in range(1, DISTORTION_STEPS):
            point = x + (j / DISTORTION_STEPS) * (x_adv - x)
            distorted |= model(point).argmax(1) != y
    return int((correct & distorted).sum()), int(correct.sum())


class COGuard:
    """`check(model, epoch)` -> metrics and the action ("", "warn", "stop", "rollback")."""

    def __init__(self, mode: str, images: Tensor, labels: Tensor, *, eps: float, steps: int,
                 drop: float, fraction: float, min_drop: float, rollbacks: int,
                 batch_size: int) -> None:
        self.mode, self.images, self.labels = mode, images, labels
        self.eps, self.steps = eps, steps
        self.drop, self.fraction, self.min_drop = drop, fraction, min_drop
        self.max_rollbacks = rollbacks
        self.batch_size = batch_size
        self.fgsm = PGDAttack(eps=eps, step_size=eps, steps=1, objective="ce",
                              random_start="none")
        self.state = GuardState()

    def cost(self) -> str:
        """What a check computes, for train.log."""
        return (f"per point {2 * self.steps} forward-backward passes (CE and margin PGD-"
                f"{self.steps}) + 1 (FGSM) + {DISTORTION_STEPS + 2} forwards")

    def _fgsm(self, model: nn.Module) -> tuple[float, float | None]:
        """FGSM accuracy and Kim et al.'s distortion (None: no point correct at x and x_adv)."""
        right = distorted = eligible = 0
        for i in range(0, len(self.labels), self.batch_size):
            x = as_float(self.images[i:i + self.batch_size])
            y = self.labels[i:i + self.batch_size]
            x_adv = self.fgsm(model, x, y)
            with torch.no_grad():
                right += int((model(x_adv).argmax(1) == y).sum())
            d, e = distortion(model, x, x_adv, y)
            distorted, eligible = distorted + d, eligible + e
        return right / len(self.labels), (distorted / eligible if eligible else None)

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        began = time.perf_counter()
        with own_stream(SEED, self.images.device):
            _, robust = reference_flags(model, self.images, self.labels, eps=self.eps,
                                        norm="Linf", steps=self.steps,
                                        batch_size=self.batch_size, device=self.images.device)
            fgsm, distorted = self._fgsm(model)
        model.train(was_training)
        return {"co_pgd_acc": robust.float().mean().item(), "co_fgsm_acc": fgsm,
                "co_distortion": distorted, "co_seconds": time.perf_counter() - began}

    def check(self, model: nn.Module, epoch: int) -> tuple[dict[str, Any], str]:
        """Measure `model` after `epoch`; (metrics, action). A good epoch becomes the reference,
        and the best one so far what stop and rollback keep."""
        metrics = self._measure(model)
        pgd, s = metrics["co_pgd_acc"], self.state
        collapsed = s.previous is not None and (
            pgd < s.previous - self.drop
            or (pgd < self.fraction * s.best and pgd < s.best - self.min_drop))
        action = ""
        if not collapsed:
            s.previous, s.good_epoch = pgd, epoch
            if s.best is None or pgd > s.best:
                s.best, s.best_epoch = pgd, epoch
        elif self.mode == "rollback" and s.rollbacks < self.max_rollbacks:
            action = "rollback"
            s.rollbacks += 1
            s.lr_scale /= 2
        else:
            action = "warn" if self.mode == "warn" else "stop"
            if action == "stop":
                s.stopped_at = epoch
        if action:
            s.events.append({"epoch": epoch, "pgd": pgd, "fgsm": metrics["co_fgsm_acc"],
                             "distortion": metrics["co_distortion"], "action": action,
                             "previous": s.previous, "best": s.best,
                             "best_epoch": s.best_epoch})
        return {**metrics, "co_event": action}, action

    def message(self, epoch: int) -> str:
        """The train.log line of the event at `epoch`."""
        e, s = self.state.events[-1], self.state
        rated = f"the guard's best, {100 * s.best:.1f}% under CE and margin PGD-{self.steps}"
        what = {"warn": "training goes on (train.co_guard=warn)",
                "stop": f"training stops; the final model is epoch {s.best_epoch}'s ({rated})",
                "rollback": f"epoch {s.best_epoch}'s state ({rated}) is restored and training "
                            f"goes on from epoch {s.best_epoch + 1} at {s.lr_scale:g} x the "
                            f"scheduled lr (rollback {s.rollbacks} of {self.max_rollbacks})"
                }[e["action"]]
        dist = ("" if e["distortion"] is None else
                f", boundary distortion {100 * e['distortion']:.1f}%")
        return (f"CO guard: catastrophic overfitting at epoch {epoch}: CE and margin PGD-"
                f"{self.steps} {100 * e['pgd']:.1f}% (last good {100 * e['previous']:.1f}%, best "
                f"{100 * e['best']:.1f}% at epoch {s.best_epoch}), FGSM {100 * e['fgsm']:.1f}%"
                f"{dist} on {len(self.labels)} validation points; {what}")

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **asdict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = GuardState(**{k: v for k, v in state.items() if k != "mode"})

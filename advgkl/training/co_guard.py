"""The catastrophic-overfitting guard: an end-of-epoch check beside the validation check.

After each epoch the model (eval mode) faces PGD (uniform start, k steps of 2.5 eps / k, as the
quick evaluation) and FGSM (one step of eps from x) on a fixed batch of the validation split. An
epoch is catastrophic when its PGD accuracy falls by more than `drop` from the last good epoch's
(Wong et al.'s early-stop rule, 0.2), or below `fraction` of the best good epoch's and by more
than `min_drop` below it (so that a few points' noise at a low accuracy is no event). The mode says
what happens then: warn (a line in train.log), stop (the last good epoch's weights stay the
final model), rollback (the last good state is restored and the epoch redone at half the lr;
after `rollbacks` of them, stop). Its numbers go to metrics.csv; its state into every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.evaluation.quick import correct_under
from advgkl.rng import own_stream

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
    """What a resume needs: the last good epoch's and the best good PGD accuracy, the lr scale
    after rollbacks, the events, and the epoch a stop happened in (0: none)."""

    previous: float | None = None
    best: float | None = None
    good_epoch: int = 0
    lr_scale: float = 1.0
    rollbacks: int = 0
    stopped_at: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


class COGuard:
    """`check(model, epoch)` -> metrics and the action ("", "warn", "stop", "rollback")."""

    def __init__(self, mode: str, images: Tensor, labels: Tensor, *, eps: float, steps: int,
                 drop: float, fraction: float, min_drop: float, rollbacks: int,
                 batch_size: int) -> None:
        self.mode, self.images, self.labels = mode, images, labels
        self.drop, self.fraction, self.min_drop = drop, fraction, min_drop
        self.max_rollbacks = rollbacks
        self.batch_size = batch_size
        self.pgd = PGDAttack(eps=eps, step_size=2.5 * eps / steps, steps=steps, objective="ce",
                             random_start="uniform")
        self.fgsm = PGDAttack(eps=eps, step_size=eps, steps=1, objective="ce",
                              random_start="none")
        self.state = GuardState()

    def _accuracy(self, model: nn.Module, attack: PGDAttack) -> float:
        return correct_under(model, self.images, self.labels, attack, batch_size=self.batch_size,
                             device=self.images.device).float().mean().item()

    def _measure(self, model: nn.Module) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        with own_stream(SEED, self.images.device):
            pgd, fgsm = self._accuracy(model, self.pgd), self._accuracy(model, self.fgsm)
        model.train(was_training)
        return pgd, fgsm

    def check(self, model: nn.Module, epoch: int) -> tuple[dict[str, Any], str]:
        """Measure `model` after `epoch`; (metrics, action). A good epoch becomes the reference."""
        pgd, fgsm = self._measure(model)
        s = self.state
        collapsed = s.previous is not None and (
            pgd < s.previous - self.drop
            or (pgd < self.fraction * s.best and pgd < s.best - self.min_drop))
        action = ""
        if not collapsed:
            s.previous, s.best, s.good_epoch = pgd, max(pgd, s.best or 0.0), epoch
        elif self.mode == "rollback" and s.rollbacks < self.max_rollbacks:
            action = "rollback"
            s.rollbacks += 1
            s.lr_scale /= 2
        else:
            action = "warn" if self.mode == "warn" else "stop"
            if action == "stop":
                s.stopped_at = epoch
        if action:
            s.events.append({"epoch": epoch, "pgd": pgd, "fgsm": fgsm, "action": action,
                             "previous": s.previous, "best": s.best})
        return {"co_pgd_acc": pgd, "co_fgsm_acc": fgsm, "co_event": action}, action

    def message(self, epoch: int) -> str:
        """The train.log line of the event at `epoch`."""
        e, s = self.state.events[-1], self.state
        what = {"warn": "training goes on (train.co_guard=warn)",
                "stop": f"training stops; the final model is epoch {s.good_epoch}'s",
                "rollback": f"epoch {s.good_epoch}'s state restored; epoch {epoch} is redone at "
                            f"{s.lr_scale:g} x the scheduled lr (rollback {s.rollbacks} of "
                            f"{self.max_rollbacks})"}[e["action"]]
        return (f"CO guard: catastrophic overfitting at epoch {epoch}: PGD {100 * e['pgd']:.1f}% "
                f"(last good {100 * e['previous']:.1f}%, best {100 * e['best']:.1f}%), FGSM "
                f"{100 * e['fgsm']:.1f}% on {len(self.labels)} validation points; {what}")

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **asdict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = GuardState(**{k: v for k, v in state.items() if k != "mode"})


#END

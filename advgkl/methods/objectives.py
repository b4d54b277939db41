"""Each method's training objective: `build_objective(method, settings)(logits)` ->
{"loss", "ce", "robust"}; the trainer backpropagates "loss" and logs the rest (ce: the clean CE on
the labels, logged even where it is not trained on; robust: the method's other terms).

The adversarial-training objectives live here, the distillation ones in
`advgkl.methods.distill`; the maths are the pure functions of `advgkl.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from advgkl.config.methods import METHODS, Settings
from advgkl.losses import (combine_views, cross_entropy, gkl_loss, ikl_loss, lbgat_guidance,
                           mart_loss, trades_kl)
from advgkl.methods.distill import TERMS as DISTILLATION_TERMS
from advgkl.methods.terms import Logits, Terms


def _terms(loss: Tensor, ce: Tensor, robust: Tensor) -> dict[str, Tensor]:
    return {"loss": loss, "ce": ce, "robust": robust}


def _clean_ce(o: Logits) -> Tensor:
    return cross_entropy(o.nat.detach(), o.y)


def _pgd_at(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    robust = cross_entropy(o.adv, o.y, obj.settings.label_smoothing)
    return _terms(robust, _clean_ce(o), robust)


def _single_step(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    """FGSM-RS, N-FGSM: CE on the adversarial batch; GradAlign adds reg_weight * input_reg."""
    robust = cross_entropy(o.adv, o.y)
    if o.input_reg is not None:
        robust = robust + obj.settings.reg_weight * o.input_reg
    return _terms(robust, _clean_ce(o), robust)


def _trades(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    ce = cross_entropy(o.nat, o.y, obj.settings.label_smoothing)
    robust = obj.settings.beta * trades_kl(o.adv, o.nat)
    return _terms(ce + robust, ce, robust)


def _mart(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    s = obj.settings
    robust = mart_loss(o.adv, o.nat, o.y, beta=s.beta, label_smoothing=s.label_smoothing,
                       form=s.form)
    return _terms(robust, _clean_ce(o), robust)


def _lbgat(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    if o.guide is None:
        raise ValueError("guide: method lbgat needs the natural model's logits")
    ce = cross_entropy(o.guide, o.y, obj.settings.label_smoothing)
    robust = lbgat_guidance(o.adv, o.nat, o.guide, beta=obj.settings.beta)
    return _terms(ce + robust, ce, robust)


def _ikl(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    s = obj.settings
    ce = cross_entropy(o.nat, o.y, s.label_smoothing)
    robust = ikl_loss(o.adv, o.nat, o.prior_rows, alpha=s.alpha, beta=s.beta)
    return _terms(ce + robust, ce, robust)


def _gkl(obj: "Objective", o: Logits) -> dict[str, Tensor]:
    s = obj.settings
    ce = cross_entropy(o.nat, o.y, s.label_smoothing)
    robust = gkl_loss(o.adv, o.nat, o.prior_rows, alpha=s.alpha, beta=s.beta, gamma=s.gamma,
                      temperature=s.temperature)
    return _terms(ce + robust, ce, robust)


TERMS: dict[str, Terms] = {"pgd_at": _pgd_at, "trades": _trades, "mart": _mart, "lbgat": _lbgat,
                           "ikl": _ikl, "gkl": _gkl, "fgsm_rs": _single_step,
                           "n_fgsm": _single_step, "grad_align": _single_step, "singh_at": _pgd_at,
                           "ares_at": _pgd_at, **DISTILLATION_TERMS}


@dataclass(frozen=True)
class Objective:
    """The objective of `method` with its `settings`; `dataset` picks the authors' per-data-set
    variants (RSLAD's and AdaAD's CIFAR-100 reductions)."""

    method: str
    settings: Settings
    dataset: str = "cifar10"

    def __post_init__(self) -> None:
        if self.method not in TERMS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(TERMS)}")
        if not isinstance(self.settings, METHODS[self.method].settings):
            raise ValueError(f"settings: {type(self.settings).__name__} are not "
                             f"{self.method}'s")

    @property
    def prior(self) -> dict | None:
        """The class prior the objective reads (whose softmax feeds it), or None."""
        return self.settings.prior()

    def __call__(self, logits: Logits) -> dict[str, Tensor]:
        return TERMS[self.method](self, logits)


def build_objective(method: str, settings: Settings | None = None, *,
                    dataset: str = "cifar10") -> Objective:
    """The objective of `method`; `settings` default to its published values."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return Objective(method, settings if settings is not None else METHODS[method].settings(),
                     dataset)


def two_view_terms(objective: Objective, logits: Logits, aug_weight: float) -> dict[str, Tensor]:
    """A batch of two equal-sized views (basic, augmented): each view's terms, combined."""
    b = len(logits.y) // 2
    return combine_views(objective(logits.part(slice(0, b))),
                         objective(logits.part(slice(b, None))), aug_weight)

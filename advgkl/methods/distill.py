"""Robust distillation objectives: ARD, RSLAD, AdaAD and GKL-KD, each as its authors' released code
computes it (ARD 779ade3, RSLAD c40e04f, AdaAD 9e5c6e5, DKL c5e8ad2). The teacher is frozen; its
logits arrive as constants in `Logits.teacher_nat` (clean batch) and `Logits.teacher_adv`
(AdaAD: the adversarial batch). RSLAD and AdaAD take `divergence: gkl` to put GKL's terms in place
of their KL (our extension; see `advgkl.config.methods.GklDivergence`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from advgkl.losses import cross_entropy, gkl_loss, kl_divergence, rslad_kl
from advgkl.methods.terms import Logits, Setup


def _teacher(logits: Tensor | None, what: str) -> Tensor:
    if logits is None:
        raise ValueError(f"{what}: this method needs the teacher's logits")
    return logits.detach()


def _divergence(obj: Setup, student: Tensor, teacher: Tensor, rows: Tensor | None,
                kl: Callable[[Tensor, Tensor], Tensor], scale: float) -> Tensor:
    """The method's KL(teacher || student), or GKL's terms scaled so that their soft-label half
    has exactly that KL's gradient."""
    s = obj.settings
    if s.divergence == "kl":
        return kl(student, teacher)
    return scale * gkl_loss(student, teacher, rows, alpha=s.gkl_alpha, beta=s.gkl_beta,
                            gamma=s.gkl_gamma, temperature=1.0)


def _ard(obj: Setup, o: Logits) -> dict[str, Tensor]:
    """alpha T^2 KL(t(x) / T || s(x_adv) / T) ('mean' over B * C) + (1 - alpha) CE(s(x), y)."""
    s = obj.settings
    kd = s.alpha * s.temperature * s.temperature * kl_divergence(
        o.adv, _teacher(o.teacher_nat, "teacher_nat"), temperature=s.temperature)
    ce = cross_entropy(o.nat, o.y, s.label_smoothing)
    return {"loss": kd + (1.0 - s.alpha) * ce, "ce": ce, "robust": kd}


def _rslad(obj: Setup, o: Logits) -> dict[str, Tensor]:
    """adv_weight D(t(x), s(x_adv)) + nat_weight D(t(x), s(x)); no CE on the labels."""
    s, teacher = obj.settings, _teacher(o.teacher_nat, "teacher_nat")
    cifar100 = obj.dataset == "cifar100"
    kl = partial(rslad_kl, cifar100=cifar100)
    scale = (10.0 if cifar100 else 1.0) / o.adv.shape[1]
    adv = _divergence(obj, o.adv, teacher, o.prior_rows, kl, scale)
    nat = _divergence(obj, o.nat, teacher, o.prior_rows, kl, scale)
    robust = s.adv_weight * adv + s.nat_weight * nat
    return {"loss": robust, "ce": cross_entropy(o.nat.detach(), o.y), "robust": robust}


def _adaad(obj: Setup, o: Logits) -> dict[str, Tensor]:
    """alpha D(t(x_adv), s(x_adv)) + (1 - alpha) D(t(x), s(x)); the clean term (and the teacher's
    clean forward) only when alpha < 1."""
    s, cifar100 = obj.settings, obj.dataset == "cifar100"
    kl = partial(kl_divergence, reduction="batch" if cifar100 else "elements")
    scale = 1.0 if cifar100 else 1.0 / o.adv.shape[1]
    robust = s.alpha * _divergence(obj, o.adv, _teacher(o.teacher_adv, "teacher_adv"),
                                   o.prior_rows, kl, scale)
    if s.alpha < 1:
        robust = robust + (1 - s.alpha) * _divergence(
            obj, o.nat, _teacher(o.teacher_nat, "teacher_nat"), o.prior_rows, kl, scale)
    return {"loss": robust, "ce": cross_entropy(o.nat.detach(), o.y), "robust": robust}


def _gkl_kd(obj: Setup, o: Logits) -> dict[str, Tensor]:
    """ce_weight CE(s(x), y) + min(epoch / warmup, 1) (beta wMSE + alpha sCE_T) of the teacher's
    clean logits against the student's adversarial ones (its clean ones at attack.eps 0: the
    paper's KD loss), weights from the class prior or softmax(t / T2), each ** gamma."""
    s, teacher = obj.settings, _teacher(o.teacher_nat, "teacher_nat")
    rows = o.prior_rows if s.class_prior else F.softmax(teacher / s.prior_temperature, dim=1)
    kd = min(o.epoch / s.warmup, 1.0) * gkl_loss(o.adv, teacher, rows, alpha=s.alpha,
                                                  beta=s.beta, gamma=s.gamma,
                                                  temperature=s.temperature)
    ce = cross_entropy(o.nat, o.y, s.label_smoothing)
    return {"loss": s.ce_weight * ce + kd, "ce": ce, "robust": kd}


TERMS = {"ard": _ard, "rslad": _rslad, "adaad": _adaad, "gkl_kd": _gkl_kd}

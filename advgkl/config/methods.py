"""Training methods as packages. Each method brings its settings (its own `loss.<method>` config
section, the published values as defaults), its attack (objective, random start, the model's mode
during the attack) and the order of its training forwards; switching `loss.method` therefore never
inherits another method's values. Every default below is what the authors' released code runs;
where the paper differs, the code wins and the docstring says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from advgkl.config.fields import opt

PRIOR_UPDATES = ("epoch", "ema")
SINGLE_STEP_STARTS = ("uniform", "zero")


class Settings:
    """Base of the per-method sections; the defaults are the method's published values."""

    def unused(self) -> tuple[str, ...]:
        """Fields the other values switch off (written only when they are used)."""
        return ()

    def prior(self) -> dict[str, Any] | None:
        """The class prior this method keeps: whose clean softmax feeds it, and how."""
        return None

    def teacher_on_clean(self) -> bool:
        """A distillation method's step needs the teacher's logits on the clean batch."""
        return True

    def caveat(self) -> str:
        """What logs and records must say about these values, if anything."""
        return ""

    def gradient_through_clamp(self) -> bool:
        """A single-step attack's first gradient through clamp(x + delta, 0, 1) (GradAlign)."""
        return False


@dataclass
class PgdAtSettings(Settings):
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the adversarial CE's labels")


@dataclass
class FgsmSettings(Settings):
    """FGSM-RS (Wong et al. 2020, train_fgsm.py): delta ~ U(-eps, eps) clamped into the image,
    one step of `step` eps from there, delta projected into the eps ball and the image again."""

    step: float = opt(1.25, gt=0, doc="FGSM step in units of attack.eps (10/255 at 8/255)")
    start: str = opt("uniform", choices=SINGLE_STEP_STARTS,
                     doc="uniform: U(-eps, eps) per channel (FGSM-RS); zero: plain FGSM")


@dataclass
class NFgsmSettings(Settings):
    """N-FGSM (de Jorge et al. 2022, train.py): eta ~ U(-k eps, k eps) clamped into the image,
    delta = eta + step eps sign(grad), clamped into the image; no eps-ball projection."""

    noise: float = opt(2.0, gt=0, doc="k: the noise's radius in units of attack.eps (k = 4 for "
                       "WRN at 16/255)")
    step: float = opt(1.0, gt=0, doc="the step in units of attack.eps")
    clip: float = opt(0.0, ge=0, doc="projection radius in units of attack.eps (the authors' "
                      "--clip); 0: none, delta can reach (k + 1) eps")


@dataclass
class GradAlignSettings(Settings):
    """GradAlign (Andriushchenko & Flammarion 2020, train.py): FGSM from zero with step 1.25 eps
    projected into the eps ball, plus reg_weight (1 - mean cos(grad l(x), grad l(x + eta))),
    eta ~ U(-eps, eps) unclamped, by double backprop; only the second gradient carries the
    regularizer's gradient (their code detaches the first), points with a zero gradient are left
    out (a batch without any: no regularizer, where their code gives NaN). Their FGSM gradient
    goes through their clamp(x + delta, 0, 1) = max(min(., 1), 0): under their pinned torch 1.4.0
    no gradient reaches saturated pixels (x + delta at 0 or 1), which we reproduce with an
    explicit mask, the same on every torch release (today's torch.clamp also gives 0 there, their
    helper on today's torch 0.5, some releases 1). Their epoch 0 (one batch forwarded, no update)
    is not run."""

    reg_weight: float = opt(0.2, ge=0, doc="lambda (their grad_align_cos_lambda; 0.2 at 8/255, "
                            "2.0 at 16/255, sh/exps_diff_eps_cifar10.sh)")
    step: float = opt(1.25, gt=0, doc="FGSM step in units of attack.eps")

    def gradient_through_clamp(self) -> bool:
        return True


@dataclass
class TradesSettings(Settings):
    beta: float = opt(6.0, ge=0, doc="weight of KL(clean || adversarial) (TRADES' 1/lambda)")
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the clean CE's labels")


@dataclass
class MartSettings(Settings):
    beta: float = opt(6.0, ge=0, doc="weight of the (1 - p_y) weighted KL term")
    form: str = opt("authors", choices=("authors", "exact"),
                    doc="authors: their code's constants, log(1.0001 - p + 1e-12), log(p_adv + "
                    "1e-12), 1.0000001 - p_y; exact: log(1 - p) computed stably (not the "
                    "published form; every record says so)")
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the adversarial CE's labels")

    def caveat(self) -> str:
        return (" -- NOT the authors' form (log(1 - p) without their constants)"
                if self.form == "exact" else "")


@dataclass
class LbgatSettings(Settings):
    beta: float = opt(6.0, ge=0, doc="weight of KL(robust clean || robust adversarial)")
    natural_arch: str = opt("resnet-18-lbgat", doc="the natural model trained alongside (the "
                            "authors' ResNet18_cifar); the robust model is model.arch")
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the natural model's CE")


@dataclass
class IklSettings(Settings):
    alpha: float = opt(4.0, ge=0, doc="weight of the soft-label cross-entropy")
    beta: float = opt(20.0, ge=0, doc="weight of the prior-weighted wMSE")
    prior_temperature: float = opt(4.0, gt=0, doc="softmax temperature of the class prior (T)")
    prior_momentum: float = opt(1.0, gt=0, le=1, doc="1 replaces the prior each epoch")
    prior_update: str = opt("epoch", choices=PRIOR_UPDATES)
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the clean CE's labels "
                                 "(DM-AT: 0.1)")

    def prior(self) -> dict[str, Any]:
        return {"source": "student", "temperature": self.prior_temperature,
                "momentum": self.prior_momentum, "mode": self.prior_update}


@dataclass
class GklSettings(IklSettings):
    gamma: float = opt(1.0, ge=0, doc="exponent of the class-prior weights")
    temperature: float = opt(1.0, gt=0, doc="softmax temperature of the soft-label CE (the "
                             "authors' scripts: 1; T above only sharpens the prior)")


@dataclass
class GklDivergence(Settings):
    """`divergence: gkl` replaces the method's KL(teacher || student) by GKL's terms,
    scale * (gkl_alpha sCE + gkl_beta wMSE), with scale chosen so that the sCE half has exactly
    the gradient of the method's KL (its reduction kept); wMSE weighs the teacher/student logit
    gaps by the teacher's class prior ** gkl_gamma. Our extension: the values are GKL-AT's
    (beta / alpha = 20 / 4, gamma 1, prior T 4), unpublished for distillation and untuned."""

    divergence: str = opt("kl", choices=("kl", "gkl"), doc="kl: the authors' KL; gkl: GKL's terms")
    gkl_alpha: float = opt(1.0, ge=0, doc="divergence gkl: weight of the soft-label CE")
    gkl_beta: float = opt(5.0, ge=0, doc="divergence gkl: weight of the prior-weighted wMSE")
    gkl_gamma: float = opt(1.0, ge=0, doc="divergence gkl: exponent of the prior weights")
    gkl_prior_temperature: float = opt(4.0, gt=0, doc="divergence gkl: temperature of the "
                                       "teacher's class prior")

    def unused(self) -> tuple[str, ...]:
        if self.divergence == "gkl":
            return ()
        return ("gkl_alpha", "gkl_beta", "gkl_gamma", "gkl_prior_temperature")

    def prior(self) -> dict[str, Any] | None:
        if self.divergence != "gkl":
            return None
        return {"source": "teacher", "temperature": self.gkl_prior_temperature, "momentum": 1.0,
                "mode": "epoch"}


@dataclass
class ArdSettings(Settings):
    alpha: float = opt(1.0, ge=0, le=1, doc="weight of T^2 KL(teacher(x) || student(x_adv)) "
                       "(PyTorch's 'mean' over B*C); 1 - alpha weighs CE(student(x), y)")
    temperature: float = opt(30.0, gt=0, doc="distillation temperature T")
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the CE's labels")


@dataclass
class RsladSettings(GklDivergence):
    adv_weight: float = opt(5 / 6, ge=0, doc="weight of D(teacher(x), student(x_adv))")
    nat_weight: float = opt(1 / 6, ge=0, doc="weight of D(teacher(x), student(x))")


@dataclass
class AdaadSettings(GklDivergence):
    alpha: float = opt(1.0, ge=0, le=1, doc="weight of D(teacher(x_adv), student(x_adv)); "
                       "1 - alpha weighs D(teacher(x), student(x))")

    def teacher_on_clean(self) -> bool:
        """Only for the clean term (alpha < 1) or the class prior of divergence gkl."""
        return self.alpha < 1 or self.prior() is not None


@dataclass
class GklKdSettings(Settings):
    alpha: float = opt(1.0, ge=0, doc="weight of the soft-label CE at temperature T (no T^2)")
    beta: float = opt(16.0, ge=0, doc="weight of the wMSE of teacher / student logit gaps")
    gamma: float = opt(0.05, ge=0, doc="exponent of the weights")
    temperature: float = opt(4.0, gt=0, doc="soft-label temperature T")
    prior_temperature: float = opt(4.0, gt=0, doc="temperature T2 of the teacher softmax behind "
                                   "the weights (class prior, or per sample)")
    class_prior: bool = opt(True, doc="weights from the class prior of the teacher's softmax "
                            "(the previous epoch's, uniform in epoch 1); false: per sample")
    warmup: int = opt(20, ge=1, doc="the divergence is scaled by min(epoch / warmup, 1)")
    ce_weight: float = opt(1.0, ge=0, doc="weight of CE(student(x), y)")
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the CE's labels")

    def prior(self) -> dict[str, Any] | None:
        if not self.class_prior:
            return None
        return {"source": "teacher", "temperature": self.prior_temperature, "momentum": 1.0,
                "mode": "epoch"}


@dataclass(frozen=True)
class Method:
    """What travels with a method besides its settings."""

    name: str
    title: str
    settings: type
    attack: str                       # the objective its attack maximizes
    start: str = "normal"             # its attack's random start
    attack_cifar100: str | None = None  # GKL/IKL: the authors' CIFAR-100 scripts' attack
    attack_train_mode: bool = False   # ARD: the student stays in train mode during the attack
    clean_first: bool = False         # training forwards: clean before adversarial
    teacher: bool = False             # distils a frozen teacher
    natural_model: bool = False       # LBGAT: trains a natural model beside the robust one
    awp: bool = True                  # can run inside AWP
    two_view: bool = True             # can train on two views of each image
    attack_kind: str = "pgd"          # pgd, or a single step: fgsm, n_fgsm
    clean_forward: str = "before"     # before / after the optimizer step (Rice et al.), or none
    input_gradient_reg: bool = False  # GradAlign: a regularizer on input gradients
    final_loss_forward: bool = False  # Rice et al.: the attack ends with a per-point loss forward
    soft_targets: bool = True         # its terms take Mixup/CutMix's soft targets

    def attack_objective(self, dataset: str) -> str:
        return self.attack_cifar100 if dataset == "cifar100" and self.attack_cifar100 \
            else self.attack


_AT = {"awp": True, "two_view": True}
_KD = {"teacher": True, "awp": False, "two_view": False, "soft_targets": False}
# The ImageNet recipes: CE on the adversarial batch only, the attack in eval mode.
_RECIPE = {"clean_forward": "none", "awp": False, "two_view": False}
# The fast methods as their authors run them: the model in train mode throughout, no clean forward.
_FAST = {"attack_train_mode": True, "clean_forward": "none", "awp": False, "two_view": False}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pgd_at", "PGD-AT (Madry et al. 2018; Rice et al.'s code)", PgdAtSettings, "ce",
           start="uniform", attack_train_mode=True, clean_forward="after",
           final_loss_forward=True, **_AT),
    Method("trades", "TRADES (Zhang et al. 2019)", TradesSettings, "kl", **_AT),
    Method("mart", "MART (Wang et al. 2020)", MartSettings, "ce", clean_first=True,
           soft_targets=False, **_AT),
    Method("lbgat", "LBGAT (Cui et al. 2021)", LbgatSettings, "kl", natural_model=True,
           awp=False, two_view=False, soft_targets=False),
    Method("ikl", "IKL-AT (Cui et al., NeurIPS 2024)", IklSettings, "kl", attack_cifar100="gkl",
           **_AT),
    Method("gkl", "GKL-AT (Cui et al., TPAMI 2026)", GklSettings, "kl", attack_cifar100="gkl",
           **_AT),
    Method("ard", "ARD (Goldblum et al. 2020)", ArdSettings, "ce", start="uniform_unclamped",
           attack_train_mode=True, **_KD),
    Method("rslad", "RSLAD (Zi et al. 2021)", RsladSettings, "teacher_kl", **_KD),
    Method("adaad", "AdaAD (Huang et al. 2023)", AdaadSettings, "adaad", clean_first=True, **_KD),
    Method("gkl_kd", "GKL-KD (Cui et al., TPAMI 2026)", GklKdSettings, "teacher_kl", **_KD),
    Method("fgsm_rs", "FGSM-RS (Wong et al. 2020)", FgsmSettings, "ce", start="uniform",
           attack_kind="fgsm", **_FAST),
    Method("n_fgsm", "N-FGSM (de Jorge et al. 2022)", NFgsmSettings, "ce", start="uniform",
           attack_kind="n_fgsm", **_FAST),
    Method("grad_align", "GradAlign (Andriushchenko & Flammarion 2020)", GradAlignSettings, "ce",
           start="none", attack_kind="fgsm", input_gradient_reg=True, soft_targets=False,
           **_FAST),
    Method("singh_at", "AT as Singh, Croce & Hein 2023 run it (APGD; revisiting-at's code)",
           PgdAtSettings, "ce", start="none", attack_kind="apgd", **_RECIPE),
    Method("ares_at", "AT as ARES 2.0 (Liu et al. 2023) runs it (best-loss PGD)", PgdAtSettings,
           "ce", start="uniform", attack_kind="ares_pgd", **_RECIPE),
)}
METHOD_NAMES = tuple(METHODS)
DISTILLATION = tuple(name for name, m in METHODS.items() if m.teacher)


def settings_fields(method: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS[method].settings)}


def describe(method: str, settings: Settings) -> str:
    """One line naming the method and its values, for logs and evaluation records."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.name not in settings.unused()}
    text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items())
    return (f"{METHODS[method].title}: {text}{settings.caveat()}" if text
            else METHODS[method].title)

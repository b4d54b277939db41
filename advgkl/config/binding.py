"""How a config's values reach its method: a flat `loss.<key>` belongs to the method named beside
it, a config file's method-bound values stay with the file's method when the command line switches
method, `auto` attack values become the method's own, and values the run does not use are reset
(refused when a user set them to something else)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from advgkl.config.methods import DISTILLATION, METHOD_NAMES, METHODS
from advgkl.errors import ConfigError

# The attack's method-bound keys: a config file's values belong to the file's method.
ATTACK_BOUND = ("kind", "objective", "random_start", "alpha", "beta", "gamma")
GKL_ATTACK_WEIGHTS = ("alpha", "beta", "gamma")
SINGLE_STEPS = ("fgsm", "n_fgsm")  # attack kinds that set their own size and start
PGD_ONLY = ("step_size", "steps", "restarts", "random_start")  # a single step sets its own


def bind(key: str, method: str) -> str:
    """A flat `loss.<key>` is the key of `method`'s section."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "loss" and parts[1] not in ("method", *METHOD_NAMES):
        return f"loss.{method}.{parts[1]}"
    return key


def last_method(items: list[tuple[str, Any]], default: str) -> str:
    methods = [v for k, v in items if k == "loss.method"]
    if methods and methods[-1] not in METHOD_NAMES:
        raise ConfigError(f"loss.method: {methods[-1]!r} is not one of {', '.join(METHOD_NAMES)}")
    return methods[-1] if methods else default


def method_bound(key: str, method: str, run_method: str) -> bool:
    """A config file's `key` belongs to the file's `method`; its PGD budget too when the run's
    method trains with its own single step."""
    parts = key.split(".")
    if parts[0] == "attack" and len(parts) == 2:
        return parts[1] in ATTACK_BOUND or (parts[1] in PGD_ONLY
                                             and METHODS[run_method].attack_kind
                                             in SINGLE_STEPS)
    return parts[0] == "loss" and len(parts) == 3 and parts[1] == method


def _default(obj: Any, name: str) -> Any:
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _drop_unused(obj: Any, names: Iterable[str], prefix: str, why: str, explicit: set[str],
                 saved: bool) -> None:
    """Reset fields the run does not use; one a user set to another value is an error."""
    for name in names:
        key = f"{prefix}.{name}"
        if key in explicit and getattr(obj, name) != _default(obj, name) and not saved:
            raise ConfigError(f"{key}: {getattr(obj, name)!r} is not used: {why}")
        setattr(obj, name, _default(obj, name))


def _resolve_kind(attack: Any, method: Any, settings: Any, explicit: set[str],
                  saved: bool) -> None:
    """`auto` is the method's own attack; a single step sets its own size and start (written
    into attack.random_start: uniform for N-FGSM and FGSM-RS, none for FGSM from x)."""
    if attack.kind == "auto":
        attack.kind = method.attack_kind
    if method.attack_kind != "pgd" and attack.kind != method.attack_kind:
        raise ConfigError(f"attack.kind: method {method.name} trains with its own "
                          f"{method.attack_kind} step; set attack.kind=auto")
    if attack.kind == "fgsm" and method.attack_kind == "pgd":
        raise ConfigError("attack.kind: fgsm is the step of methods fgsm_rs and grad_align; "
                          "another method takes pgd or n_fgsm")
    if attack.kind == "pgd":
        return
    if attack.kind in RECIPE_STARTS:
        _resolve_recipe_attack(attack, method)
        return
    if method.teacher or attack.norm != "Linf":
        raise ConfigError(f"attack.kind: {attack.kind} is a Linf step for adversarial training "
                          f"(not with method {method.name} or attack.norm {attack.norm})")
    _drop_unused(attack, PGD_ONLY, "attack", f"the single-step attack {attack.kind} sets its own "
                 f"step and start (loss.{method.name if method.attack_kind != 'pgd' else 'n_fgsm'}"
                 " values)", explicit, saved)
    own = settings if method.attack_kind != "pgd" else None
    attack.random_start = ("uniform" if attack.kind == "n_fgsm" or getattr(own, "start", "zero")
                           == "uniform" else "none")


RECIPE_STARTS = {"apgd": "none", "ares_pgd": "uniform"}  # the ImageNet recipes' attacks


def _resolve_recipe_attack(attack: Any, method: Any) -> None:
    """Singh et al.'s APGD (from x itself; ce or kl) and ARES' PGD (uniform start; ce): Linf,
    their own start, one restart."""
    start = RECIPE_STARTS[attack.kind]
    if method.teacher or attack.norm != "Linf" or attack.restarts != 1:
        raise ConfigError(f"attack.kind: {attack.kind} is a Linf attack with one restart for "
                          f"adversarial training (not with method {method.name}, attack.norm "
                          f"{attack.norm} or attack.restarts {attack.restarts})")
    if attack.random_start not in ("auto", start):
        raise ConfigError(f"attack.random_start: {attack.kind} starts {start}; set auto")
    attack.random_start = start
    objective = attack.objective if attack.objective != "auto" else method.attack
    allowed = ("ce", "kl") if attack.kind == "apgd" else ("ce",)
    if objective not in allowed:
        raise ConfigError(f"attack.objective: {attack.kind} maximizes {' or '.join(allowed)}, "
                          f"not {objective}")


def check_scale_options(cfg: Any) -> None:
    """Mixup/CutMix, accumulation and their partners: combinations a method cannot take."""
    method, d, t = METHODS[cfg.loss.method], cfg.data, cfg.train
    mixing = d.mixup > 0 or d.cutmix > 0
    if mixing and not method.soft_targets:
        raise ConfigError(f"data.mixup / data.cutmix: method {method.name} needs hard labels "
                          "(it takes no soft targets); set them to 0")
    if d.smoothing and not mixing:
        raise ConfigError("data.smoothing: smooths Mixup/CutMix's targets; without them use "
                          f"loss.{method.name}.label_smoothing")
    if mixing and getattr(cfg.loss.settings, "label_smoothing", 0):
        raise ConfigError(f"loss.{method.name}.label_smoothing: with Mixup/CutMix the targets are "
                          "smoothed by data.smoothing; set it to 0")
    if t.accumulate > 1 and (cfg.awp.gamma > 0 or method.clean_forward == "after"
                             or d.two_view):
        raise ConfigError(f"train.accumulate: {t.accumulate} micro-batches cannot run with AWP, "
                          "two views or a clean forward after the step (pgd_at); set it to 1")


def resolve_method(cfg: Any, explicit: set[str], saved: bool) -> None:
    """The method's own attack for `auto`, its teacher rules; unused values reset."""
    loss, attack, method = cfg.loss, cfg.attack, METHODS[cfg.loss.method]
    name = loss.method
    _resolve_kind(attack, method, loss.settings, explicit, saved)
    if attack.objective == "auto":
        attack.objective = method.attack_objective(cfg.data.dataset)
    if attack.random_start == "auto":
        attack.random_start = method.start
    if attack.objective in ("teacher_kl", "adaad") and not method.teacher:
        raise ConfigError(f"attack.objective: {attack.objective} attacks through a teacher; "
                          f"method {name} has none")
    student_prior = (loss.settings.prior() or {}).get("source") == "student"
    if attack.objective == "gkl" and not student_prior:
        raise ConfigError(f"attack.objective: gkl weighs by the class prior of the trained model, "
                          f"which method {name} does not keep (use it with gkl or ikl)")
    if attack.objective != "gkl":
        _drop_unused(attack, GKL_ATTACK_WEIGHTS, "attack",
                     f"only attack.objective gkl has it (this run attacks with "
                     f"{attack.objective})", explicit, saved)
    _drop_unused(loss.settings, loss.settings.unused(), f"loss.{name}",
                 f"switched off by the other loss.{name} values", explicit, saved)
    for other in METHOD_NAMES:
        if other != name:
            setattr(loss, other, METHODS[other].settings())
    if method.teacher and not cfg.distill.teacher:
        raise ConfigError(f"distill.teacher: method {name} distils a teacher; give an advgkl "
                          "checkpoint or robustbench:<dataset>/<threat>/<name>")
    if not method.teacher:
        if cfg.distill.teacher:
            raise ConfigError(f"distill.teacher: method {name} trains without a teacher; remove "
                              f"it, or choose one of {', '.join(DISTILLATION)}")
        cfg.distill = type(cfg.distill)()
    if attack.restarts > 1 and not method.final_loss_forward:
        raise ConfigError(f"attack.restarts: {attack.restarts} restarts need a per-point loss to "
                          f"pick the strongest, which only pgd_at's attack has (not {name}'s)")
    if method.input_gradient_reg and cfg.train.compile:
        raise ConfigError(f"train.compile: torch.compile's autograd has no double backward, which "
                          f"{name}'s regularizer needs; set train.compile=false")
    if cfg.train.co_guard not in ("auto", "off") and cfg.eval.check != "val":
        raise ConfigError(f"train.co_guard: {cfg.train.co_guard} checks a validation split; set "
                          f"eval.check=val (it is {cfg.eval.check})")
    if cfg.awp.gamma > 0 and not method.awp:
        raise ConfigError(f"awp.gamma: method {name} runs without AWP; set awp.gamma=0")
    if cfg.data.two_view and not method.two_view:
        raise ConfigError(f"data.two_view: method {name} trains on one view; set "
                          "data.two_view=false")
    check_scale_options(cfg)


def attack_description(cfg: Any) -> str:
    """The training attack in words, for train.log and evaluation records."""
    a, method = cfg.attack, METHODS[cfg.loss.method]
    mode = ", model in train mode" if method.attack_train_mode else ""
    if a.kind == "pgd":
        return f"PGD-{a.steps} on {a.objective}, start {a.random_start}{mode}"
    if a.kind == "apgd":
        return (f"APGD-{a.steps} on {a.objective} from x (Singh et al.'s training attack: step "
                f"2 eps, momentum 0.75, the highest-loss point per image)")
    if a.kind == "ares_pgd":
        return (f"PGD-{a.steps} on {a.objective}, start uniform, the best point kept (per image "
                f"with labels, per batch with soft targets; ARES' training attack, step schedule "
                f"{a.schedule})")
    if method.attack_kind == "pgd":
        return (f"N-FGSM's single step on {a.objective} (our extension: {method.name}'s loss, "
                f"N-FGSM's published attack){mode}")
    return f"its own single step ({a.kind}){mode}"

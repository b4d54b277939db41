"""A run's configuration built from defaults < YAML file < `section.key=value` overrides.

Every value is checked against its field's type, choices and range; a bad key or value raises
`ConfigError` naming the dotted key and what is allowed. Each method keeps its own section,
`loss.<method>` (see `advgkl.config.methods`); a flat `loss.<key>` means the key of the method
named in the same place (the file's method for the file, the run's method on the command line),
so a file's values never follow a method switched on the command line: the new method's
published values apply. `advgkl config` prints the values the chosen method uses, and only
those.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import yaml

from advgkl.config.binding import (GKL_ATTACK_WEIGHTS, PGD_ONLY, SINGLE_STEPS, bind, last_method,
                                   method_bound, resolve_method)
from advgkl.config.fields import linf_size_problem, set_field
from advgkl.config.methods import METHOD_NAMES, METHODS, settings_fields
from advgkl.config.sections import LOGGERS, Config, LossConfig, RunConfig, TrainConfig
from advgkl.errors import ConfigError, check_plain_name


def _sections() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config))


def _flatten(tree: Any, source: str) -> Iterable[tuple[str, Any]]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for name, body in tree.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {body!r}")
        for key, value in body.items():
            if name == "loss" and key in METHOD_NAMES and isinstance(value, dict):
                for sub, sub_value in value.items():
                    yield f"loss.{key}.{sub}", sub_value
            else:
                yield f"{name}.{key}", value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, value); the value is read as YAML (`true`, `[1, 2]`, `8/255`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def _target(cfg: Config, key: str) -> tuple[Any, str]:
    """(the object holding `key`, the field name), or a ConfigError naming the valid keys."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in _sections():
        raise ConfigError(f"{key}: unknown key; keys are section.name with section one of "
                          f"{', '.join(_sections())}")
    obj = getattr(cfg, parts[0])
    if parts[0] == "loss" and len(parts) == 3 and parts[1] in METHOD_NAMES:
        obj = getattr(obj, parts[1])
        if parts[2] not in settings_fields(parts[1]):
            raise ConfigError(f"{key}: method {parts[1]} has no {parts[2]!r}; loss.{parts[1]} has "
                              f"{', '.join(settings_fields(parts[1])) or 'no settings'}")
        return obj, parts[2]
    names = [f.name for f in dataclasses.fields(obj)]
    if len(parts) != 2 or parts[1] not in names:
        raise ConfigError(f"{key}: unknown key; {parts[0]} has {', '.join(names)}")
    return obj, parts[1]


def _apply(cfg: Config, key: str, value: Any) -> None:
    obj, name = _target(cfg, key)
    if dataclasses.is_dataclass(getattr(obj, name)):
        raise ConfigError(f"{key}: a section; set its keys ({key}.<key>)")
    set_field(obj, key, name, value)


def _check_section(prefix: str, section: Any) -> None:
    """Cross-field rules: Linf sizes live on [0,1] images; piecewise milestones fit the run."""
    norm = getattr(section, "norm", None)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        problem = linf_size_problem(value) if f.metadata.get("eps") and norm == "Linf" else None
        if problem:
            raise ConfigError(f"{prefix}.{f.name}: {problem}")
    if isinstance(section, RunConfig):
        unknown = [name for name in section.loggers if name not in LOGGERS]
        if unknown or len(set(section.loggers)) != len(section.loggers):
            raise ConfigError(f"run.loggers: {section.loggers} must name distinct loggers among "
                              f"{', '.join(LOGGERS)}")
        if section.name:
            check_plain_name(section.name, "run.name")
    if isinstance(section, TrainConfig):
        if section.cycle_momentum and section.lr_schedule != "cyclic":
            raise ConfigError("train.cycle_momentum: only with train.lr_schedule cyclic")
        if any(lr <= 0 for lr in section.lr_first_epochs):
            raise ConfigError(f"train.lr_first_epochs: {section.lr_first_epochs} must be > 0")
        ms = section.lr_milestones
        if section.lr_schedule in ("piecewise", "piecewise_step") and (
                ms != sorted(ms) or any(not 0 < m <= section.epochs for m in ms)):
            raise ConfigError(f"train.lr_milestones: {ms} must be increasing epochs "
                              f"between 1 and train.epochs ({section.epochs})")


def build_config(tree: dict | None = None, overrides: Iterable[str] = (),
                 source: str = "config", *, saved: bool = False,
                 notes: list[str] | None = None) -> Config:
    """Defaults, then the nested mapping `tree`, then `key=value` overrides; validated.

    The file's method-bound values (its flat `loss.<key>` values, its attack objective, start and
    gkl weights) belong to the file's method: when the overrides choose another method, they are
    left out (a line in `notes` says which) and the new method's published values apply.
    `saved=True` reads a run folder's config.yaml, where an earlier version wrote every key."""
    items = list(_flatten(tree or {}, source))
    over = [parse_override(text) for text in overrides]
    file_method = last_method(items, LossConfig.method)
    method = last_method(over, file_method)
    cfg, explicit, left_out = Config(), set(), []
    if saved and file_method == "mart" and not any(k.startswith("loss.mart.") for k, _ in items):
        cfg.loss.mart.form = "exact"    # what runs before the authors' form trained with
    if saved and method == "pgd_at" and not any(k == "attack.kind" for k, _ in items) \
            and notes is not None:
        notes.append("this pgd_at run was saved before PGD-AT took Rice et al.'s step "
                     "(2026-12-02); it continues with it: the attack in train mode, the clean "
                     "forward after the step")
    cli_kind = next((v for k, v in reversed(over) if k == "attack.kind"), "auto")
    for key, value in items:
        key = bind(key, file_method)
        if (method != file_method and method_bound(key, file_method, method)) or (
                cli_kind in ("fgsm", "n_fgsm") and key in (f"attack.{k}" for k in PGD_ONLY)):
            left_out.append(key)
            continue
        try:
            _apply(cfg, key, value)
        except ConfigError:
            if saved and key.startswith(f"loss.{file_method}."):
                continue                # an earlier version's key the method does not have
            raise
        explicit.add(key)
    for key, value in over:
        key = bind(key, method)
        parts = key.split(".")
        if parts[0] == "loss" and len(parts) == 3 and parts[1] != method:
            raise ConfigError(f"{key}: the run trains loss.method={method}; set loss.method="
                              f"{parts[1]} too, or set loss.{method}.{parts[2]}")
        _apply(cfg, key, value)
        explicit.add(key)
    if left_out and notes is not None:
        notes.append(f"loss.method={method} replaces {source}'s {file_method}: its "
                     f"{', '.join(left_out)} stay with {file_method}; {method}'s own values apply"
                     if method != file_method else
                     f"attack.kind={cli_kind}: {source}'s {', '.join(left_out)} (its PGD "
                     "budget) do not apply to a single step")
    for f in dataclasses.fields(cfg):
        _check_section(f.name, getattr(cfg, f.name))
    resolve_method(cfg, explicit, saved)
    return cfg


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document in `path`; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def load_config(path: str | Path, overrides: Iterable[str] = (), *, saved: bool = False,
                notes: list[str] | None = None) -> Config:
    """Read a YAML config file and apply overrides (an empty file gives the defaults)."""
    return build_config(read_yaml(path), overrides, source=str(path), saved=saved, notes=notes)


def _plain(value: Any, meta: Any) -> Any:
    if meta.get("eps") and value and round(value * 255) / 255 == value:
        return f"{round(value * 255)}/255"
    return value


def _values(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    return {f.name: _plain(getattr(obj, f.name), f.metadata) for f in dataclasses.fields(obj)
            if f.name not in skip}


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested data (eps written as k/255) holding only what the run uses: the chosen
    method's section, the attack's gkl weights with that objective, the teacher with a
    distillation method. `build_config` of it gives `cfg` back."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if section.name == "loss":
            settings = obj.settings
            out["loss"] = {"method": obj.method,
                           obj.method: _values(settings, settings.unused())}
        elif section.name == "attack":
            out["attack"] = _values(obj, (() if obj.objective == "gkl" else GKL_ATTACK_WEIGHTS)
                                    + (PGD_ONLY if obj.kind in SINGLE_STEPS else ()))
        elif section.name != "distill" or METHODS[cfg.loss.method].teacher:
            out[section.name] = _values(obj)
    return out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (e.g. beside a run)."""
    Path(path).write_text(dump_config(cfg))

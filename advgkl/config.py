"""Typed, nested run configuration: defaults < YAML file < `section.key=value` overrides.

Every value is checked against its field's type, choices and range; a bad key or value raises
`ConfigError` naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from advgkl.errors import ConfigError

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_OR_FRACTION = re.compile(rf"\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?")


def opt(default: Any, *, choices: tuple[str, ...] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        eps: bool = False, doc: str = "") -> Any:
    """A config field: default, allowed choices, numeric bounds; `eps=True` marks a perturbation
    size in [0,1]-image units (written as k/255 when it is one, checked against the norm)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "eps": eps, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = opt("cifar10", choices=("cifar10", "cifar100", "digits"))
    root: str = opt("data", doc="folder holding the torchvision data sets")
    download: bool = opt(False, doc="let torchvision download a missing data set")
    augment: str = opt("basic", choices=("none", "basic", "autoaugment", "cutout"))
    two_view: bool = opt(False, doc="train on a basic view and an `augment` view of each image")
    aug_weight: float = opt(1.0, ge=0, doc="weight of the augmented view's robust term")
    num_workers: int = opt(4, ge=0)
    device_augment: bool = opt(False, doc="basic augmentation (crop+flip) on uint8 batches on "
                               "the training device instead of in the loader")
    generated: str = opt("", doc="generated images: .npz (image, label) or an `advgkl data "
                         "convert` folder; empty: none")
    generated_fraction: float = opt(0.0, ge=0, le=1, doc="share of generated images per batch")
    epoch_samples: int = opt(0, ge=0, doc="samples per epoch with generated data; 0: train set size")


@dataclass
class ModelConfig:
    arch: str = opt("wrn-34-10", doc="registered architecture name")


@dataclass
class AttackConfig:
    """The training attack (inner maximization)."""

    norm: str = opt("Linf", choices=("Linf", "L2"))
    eps: float = opt(8 / 255, ge=0, eps=True)
    step_size: float = opt(2 / 255, gt=0, eps=True)
    steps: int = opt(10, ge=0)
    objective: str = opt("kl", choices=("kl", "gkl", "ce"),
                         doc="kl: KL's gradient (soft-label CE); gkl: alpha sCE + beta wMSE with "
                         "the class prior (the paper's CIFAR-100 attack); ce: Madry's")
    alpha: float = opt(1.0, ge=0, doc="objective gkl: weight of the soft-label CE")
    beta: float = opt(1.0, ge=0, doc="objective gkl: weight of the prior-weighted wMSE")
    gamma: float = opt(1.0, ge=0, doc="objective gkl: exponent of the class-prior rows")
    random_start: str = opt("normal", choices=("normal", "uniform", "none"),
                            doc="normal: x + 0.001 N(0,1), first gradient unprojected (TRADES, "
                            "the paper); uniform: in the eps ball, projected")
    schedule: str = opt("constant",
                        choices=("constant", "linear_ramp", "paper_effective", "paper_intended"))


@dataclass
class LossConfig:
    method: str = opt("gkl", choices=("pgd_at", "trades", "ikl", "gkl", "mart", "lbgat"))
    alpha: float = opt(4.0, ge=0, doc="weight of the soft-label cross-entropy")
    beta: float = opt(20.0, ge=0, doc="weight of the wMSE term (TRADES, MART, LBGAT: of the KL "
                      "term)")
    gamma: float = opt(1.0, ge=0, doc="exponent of the class prior weights")
    temperature: float = opt(1.0, gt=0, doc="softmax temperature of the soft-label CE")
    prior_temperature: float = opt(4.0, gt=0, doc="softmax temperature of the class prior")
    prior_momentum: float = opt(1.0, gt=0, le=1, doc="1 replaces the prior each epoch")
    prior_update: str = opt("epoch", choices=("epoch", "ema"))
    label_smoothing: float = opt(0.0, ge=0, lt=1, doc="smoothing of the labels in the "
                                 "cross-entropy each method trains on (DM-AT: 0.1)")
    natural_arch: str = opt("preact-resnet-18", doc="lbgat: the natural model trained alongside "
                            "(the robust model is model.arch)")


@dataclass
class AwpConfig:
    gamma: float = opt(0.005, ge=0, doc="weight perturbation size; 0 disables AWP")
    warmup_epochs: int = opt(10, ge=0)


@dataclass
class TrainConfig:
    epochs: int = opt(200, ge=1)
    batch_size: int = opt(128, ge=1, doc="global batch: split evenly over the processes")
    lr: float = opt(0.2, gt=0)
    lr_schedule: str = opt("cosine",
                           choices=("cosine", "cosine_shifted", "piecewise", "cosinew"))
    lr_warmup_epochs: int = opt(0, ge=0)
    lr_milestones: list[int] = opt([100, 150], doc="epochs where piecewise divides lr by 10")
    momentum: float = opt(0.9, ge=0, lt=1)
    nesterov: bool = opt(False)
    weight_decay: float = opt(5e-4, ge=0)
    no_decay_bn_bias: bool = opt(False, doc="exempt BatchNorm weights and biases from decay")
    ema_tau: float = opt(0.9996, ge=0, lt=1)
    ema_start_epoch: int = opt(150, ge=0, doc="EMA copies the weights in this epoch, then averages; "
                                                      "past train.epochs: no EMA")
    ema_warmup: bool = opt(False, doc="decay min(tau, (1+n)/(10+n)) after n updates (DM-AT)")
    select_with_ema: bool = opt(True, doc="evaluate and pick best.pt with the EMA once it runs "
                                "(with the epoch average instead, once that runs)")
    epoch_avg_tau: float = opt(0.0, ge=0, lt=1, doc="the authors' final step: after each epoch "
                               "avg <- (1 - tau) w + tau avg; 0: off")
    epoch_avg_start: int = opt(1, ge=1, doc="the epoch whose weights start the epoch average")
    save_every: int = opt(0, ge=0, doc="keep epoch-NNN.pt (the model's weights) every N epochs; "
                          "0: none")
    seed: int = opt(0, ge=0)
    device: str = opt("auto", doc="auto, cpu, cuda or cuda:N")
    precision: str = opt("fp32", choices=("fp32", "bf16"),
                         doc="training forward/backward: bf16 autocast on CUDA (evaluation: fp32)")
    attack_precision: str = opt("fp32", choices=("fp32", "bf16"), doc="the training attack's")
    channels_last: bool = opt(False, doc="channels_last memory format (CUDA)")
    compile: bool = opt(False, doc="torch.compile the training forward (CUDA)")
    cudnn_benchmark: bool = opt(True, doc="let cuDNN pick the fastest kernels (CUDA)")
    sync_bn: bool = opt(False, doc="synchronize BatchNorm statistics across GPUs (DDP)")


@dataclass
class EvalConfig:
    norm: str = opt("Linf", choices=("Linf", "L2"))
    eps: float = opt(8 / 255, ge=0, eps=True)
    version: str = opt("standard", choices=("standard", "plus", "rand", "custom"))
    n_examples: int = opt(10000, ge=1)
    batch_size: int = opt(500, ge=1)
    pgd_steps: int = opt(10, ge=1, doc="steps of the per-epoch PGD check")
    check: str = opt("val", choices=("val", "test", "none"),
                     doc="the per-epoch check and best.pt: val, a split of the training set "
                     "(excluded from training); test, the first holdout_size TEST points "
                     "(selection on test data, marked in every record); none: no check, no best.pt")
    val_size: int = opt(1024, ge=1, doc="training images held out for check=val (fixed by "
                        "train.seed)")
    holdout_size: int = opt(1000, ge=1, doc="test points of the per-epoch check with check=test")


LOGGERS = ("tensorboard", "wandb")


@dataclass
class RunConfig:
    name: str = opt("", doc="run folder name; empty: the config file's name")
    out_dir: str = opt("checkpoints")
    loggers: list[str] = opt([], doc="experiment trackers besides metrics.csv: tensorboard "
                             "(RUN/tensorboard/), wandb (honours WANDB_MODE=offline)")
    log_every: int = opt(0, ge=0, doc="also send the training loss to the trackers every N "
                         "steps; 0: per epoch only")
    wandb_project: str = opt("advgkl", doc="the W&B project of run.loggers=[wandb]")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    awp: AwpConfig = field(default_factory=AwpConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def parse_number(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_OR_FRACTION.fullmatch(value)
        if match:
            num, den = match.groups()
            if den is None:
                return float(num)
            if float(den) == 0:
                raise ConfigError(f"{key}: {value!r} divides by zero")
            return float(num) / float(den)
    raise ConfigError(f"{key}: expected a number such as 0.5 or 8/255, got {value!r}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        return parse_number(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _check_field(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))
    for name, sign, ok in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}: {value!r} must be {sign} {bound}")


def linf_size_problem(value: float) -> str | None:
    """What is wrong with a Linf perturbation size on [0,1] images, if anything."""
    if value > 1:
        return (f"{value:g} is larger than 1, but Linf sizes are on [0,1] images; "
                f"did you mean {value:g}/255?")
    return None


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
    if isinstance(section, TrainConfig) and section.lr_schedule == "piecewise":
        ms = section.lr_milestones
        if ms != sorted(ms) or any(not 0 < m < section.epochs for m in ms):
            raise ConfigError(f"train.lr_milestones: {ms} must be increasing epochs "
                              f"between 1 and train.epochs - 1 ({section.epochs - 1})")


def _section_fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def _apply(cfg: Config, key: str, value: Any) -> None:
    """Set the dotted `key` (section.field) of `cfg`, type-checked."""
    sections = _section_fields(Config)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"{key}: unknown key; keys are section.name with section one of "
                          f"{', '.join(sections)}")
    section = getattr(cfg, parts[0])
    fields_ = _section_fields(type(section))
    if parts[1] not in fields_:
        raise ConfigError(f"{key}: unknown key; {parts[0]} has {', '.join(fields_)}")
    hints = typing.get_type_hints(type(section))
    f = fields_[parts[1]]
    coerced = _coerce(key, value, hints[f.name])
    _check_field(key, coerced, f.metadata)
    setattr(section, f.name, coerced)


def _flatten(tree: Any, source: str) -> Iterable[tuple[str, Any]]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for name, body in tree.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {body!r}")
        for key, value in body.items():
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


def _check_combinations(cfg: Config) -> None:
    """Rules across sections."""
    if cfg.loss.method == "lbgat" and (cfg.awp.gamma > 0 or cfg.data.two_view):
        raise ConfigError("loss.method: lbgat runs without AWP and with one view; set awp.gamma=0 "
                          "and data.two_view=false")


def build_config(tree: dict | None = None, overrides: Iterable[str] = (),
                 source: str = "config") -> Config:
    """Defaults, then the nested mapping `tree`, then `key=value` overrides; validated."""
    cfg = Config()
    for key, value in _flatten(tree or {}, source):
        _apply(cfg, key, value)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    for f in dataclasses.fields(cfg):
        _check_section(f.name, getattr(cfg, f.name))
    _check_combinations(cfg)
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


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file and apply overrides (an empty file gives the defaults)."""
    return build_config(read_yaml(path), overrides, source=str(path))


def _plain(value: Any, meta: typing.Mapping[str, Any]) -> Any:
    if meta.get("eps") and value and round(value * 255) / 255 == value:
        return f"{round(value * 255)}/255"
    return value


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested data (eps written as k/255); `build_config` of it gives `cfg` back."""
    return {
        s.name: {f.name: _plain(getattr(getattr(cfg, s.name), f.name), f.metadata)
                 for f in dataclasses.fields(getattr(cfg, s.name))}
        for s in dataclasses.fields(cfg)
    }


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (e.g. beside a run)."""
    Path(path).write_text(dump_config(cfg))

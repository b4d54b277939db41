"""Safe, atomic, self-describing checkpoints, the weights they hold, foreign state dicts cleaned,
and the sha256 that identifies a file.

A checkpoint is a dict saved with `torch.save` and loaded with `weights_only=True` only, so a file
from a stranger can never run code. Keys written by advgkl: format_version, arch, arch_kwargs,
num_classes, model, and (from training) ema, optimizer, scheduler, epoch, step, prior, rng,
config, metrics, ranks (each process's streams under torchrun), position (inside an epoch),
log_line (the epoch's train.log line). Building a model from one: `advgkl.models.loading`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from advgkl.errors import UserError, first_line

FORMAT_VERSION = 1
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.0.", "module.")
_DROPPED_PREFIXES = ("sub_block1.",)


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and names the file."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` atomically: a temporary file in the same folder, fsync, then rename.

    A crash at any moment leaves either the old file or the new one at `path`, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load with `weights_only=True`; any file needing arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling ({unsafe.group(1)}), "
                "which could run code; only tensors and plain containers are allowed") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, or a pickle that only an "
                              "unsafe load could read; refused") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        reason = first_line(exc).split(". ")[0]
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def model_checkpoint(model_state: Mapping[str, Tensor], *, arch: str, num_classes: int,
                     arch_kwargs: Mapping[str, Any] | None = None, **extra: Any) -> dict:
    """The self-describing dict advgkl saves: architecture, classes, weights, plus `extra` fields."""
    return {"format_version": FORMAT_VERSION, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
            "num_classes": num_classes, "model": dict(model_state), **extra}


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str) -> None:
    """`load_state_dict(strict=True)` with one clear error: wrong class count or wrong keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: the weights do not fit this architecture; "
            f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, value in own.items():
        if value.shape != state_dict[key].shape:
            hint = (" (a different number of classes?)"
                    if key.endswith(("fc.weight", "fc.bias", "logits.weight", "logits.bias",
                                     "linear.weight", "linear.bias", "head.weight", "head.bias",
                                     "classifier.weight", "classifier.bias"))
                    else " (a different architecture?)")
            raise CheckpointError(f"{what}: {key} has shape {tuple(state_dict[key].shape)}, the "
                                  f"model expects {tuple(value.shape)}{hint}")
    model.load_state_dict(state_dict, strict=True)


WEIGHTS = ("avg", "ema", "model")
_AVERAGES = {"avg": ("epoch_avg", "epoch average (train.epoch_avg_tau > 0, from "
                     "train.epoch_avg_start)"),
             "ema": ("ema", "EMA weights yet (the EMA starts at train.ema_start_epoch)")}


def _has(ckpt: Mapping[str, Any], weights: str) -> bool:
    part = ckpt.get(_AVERAGES[weights][0]) or {}
    return bool(part.get("epochs") if weights == "avg" else part.get("started"))


def default_weights(ckpt: Mapping[str, Any]) -> str:
    """The weights a run hands to evaluation: the epoch average once it runs (the paper's
    pipeline), else the EMA once it runs, else the model's own."""
    return next((w for w in ("avg", "ema") if _has(ckpt, w)), "model")


def checkpoint_weights(ckpt: Mapping[str, Any], weights: str = "model") -> Mapping[str, Tensor]:
    """The state dict of `weights`: "model", "ema" (the per-step EMA, once started) or "avg"
    (the epoch average, once started)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    if weights == "model":
        return ckpt["model"]
    key, missing = _AVERAGES[weights]
    if not _has(ckpt, weights):
        raise CheckpointError(f"this checkpoint has no {missing}; evaluate --weights model")
    return ckpt[key]["model"]


def clean_foreign_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """A plain state dict from a foreign file: unwrap {"state_dict": ...} and the like, strip
    `module.0.` / `module.` prefixes (DataParallel), drop RobustBench's unused `sub_block1` keys."""
    for key in _WRAPPERS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    cleaned = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if not key.startswith(_DROPPED_PREFIXES):
            cleaned[key] = value
    return cleaned


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (hex): what records and runs identify checkpoints and weights by."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

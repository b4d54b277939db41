"""A model built from a checkpoint: its architecture from the registry, its weights loaded
strictly; and foreign weight files turned into advgkl checkpoints."""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from advgkl.checkpoint import (CheckpointError, checkpoint_weights, clean_foreign_state_dict,
                               load_checkpoint, load_weights, model_checkpoint)
from advgkl.models import create_model


def model_from_checkpoint(ckpt: Mapping[str, Any], *, what: str = "checkpoint",
                          weights: str = "model") -> nn.Module:
    """Build the checkpoint's architecture and load its `weights` ("model", "ema" or "avg")."""
    for key in ("arch", "num_classes", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{what}: not an advgkl checkpoint (no {key!r} entry); "
                                  "import foreign weights with `advgkl import-checkpoint`")
    try:
        model = create_model(ckpt["arch"], ckpt["num_classes"], **ckpt.get("arch_kwargs", {}))
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    load_weights(model, checkpoint_weights(ckpt, weights), what=what)
    return model


def import_checkpoint(src: str | os.PathLike, *, arch: str, num_classes: int,
                      arch_kwargs: Mapping[str, Any] | None = None) -> dict:
    """Turn a foreign weights file into an advgkl checkpoint, verified by loading it."""
    state = clean_foreign_state_dict(load_checkpoint(src))
    ckpt = model_checkpoint(state, arch=arch, num_classes=num_classes, arch_kwargs=arch_kwargs,
                            source=str(src))
    model_from_checkpoint(ckpt, what=str(src))
    return ckpt

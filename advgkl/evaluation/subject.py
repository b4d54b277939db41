"""What an evaluation scores (`Subject`) and what its records say of a checkpoint: how its
weights were selected, the method it was trained with, its teacher, and its CO guard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advgkl.config import build_config
from advgkl.config.binding import attack_description
from advgkl.config.methods import describe
from advgkl.errors import UserError


@dataclass
class Subject:
    """What is evaluated, as the records name it."""

    model: torch.nn.Module
    dataset: str
    arch: str
    checkpoint: str                     # a path, or robustbench:<dataset>/<threat>/<entry>
    sha256: str | None
    weights: str                        # avg, ema, model, or zoo
    config: dict
    selection: dict | None
    name: str                           # the default record name
    training: dict | None = None        # how the checkpoint was trained: method, teacher
    preprocessing: str | None = None    # image folders: the model's evaluation preprocessing
    data_root: str | None = None        # image folders: the tree evaluated (ROOT with ROOT/val)


def selection_of(ckpt: dict, path: str) -> dict | None:
    """How the checkpoint was picked, if it was: `best.pt` records it (`selected_by`); a best.pt
    from before validation splits was picked on the first eval.holdout_size test points."""
    if "selected_by" in ckpt:
        return ckpt["selected_by"]
    checks = (ckpt.get("config") or {}).get("eval") or {}
    if Path(path).name == "best.pt" and "check" not in ckpt and "holdout_size" in checks:
        return {"points": f"TEST-{checks['holdout_size']}", "on_test_points": True,
                "metric": f"PGD-{checks.get('pgd_steps', 10)} robust accuracy"}
    return None


def training_of(ckpt: dict) -> dict | None:
    """The method a checkpoint was trained with (one line) and its teacher's identity, when its
    config says (checkpoints from before methods had sections: their method name only)."""
    config = ckpt.get("config")
    if not config:
        return None
    try:
        cfg = build_config(config, saved=True)
        method = (f"{describe(cfg.loss.method, cfg.loss.settings)}; attack "
                  f"{attack_description(cfg)}")
    except UserError:
        method = str((config.get("loss") or {}).get("method"))
    return {"method": method, "teacher": ckpt.get("teacher"),
            "co_guard": co_guard_summary(ckpt.get("co_guard"))}


def co_guard_summary(state: dict[str, Any] | None) -> str | None:
    """What evaluation records say of a checkpoint's guard (None: no guard ran)."""
    if not state or state.get("mode") in (None, "off"):
        return None
    events = state.get("events") or []
    text = f"CO guard {state['mode']}: {len(events)} event(s)"
    if events:
        text += " at epoch(s) " + ", ".join(str(e["epoch"]) for e in events)
    if state.get("stopped_at"):
        text += f"; training STOPPED at epoch {state['stopped_at']}, these are the weights of "
        text += (f"epoch {state['best_epoch']}, the one the guard rated best (robust "
                 f"{100 * state['best']:.1f}% under CE and margin PGD on its validation points)"
                 if state.get("best_epoch") else f"epoch {state['good_epoch']}")
    if state.get("rollbacks"):
        text += f"; {state['rollbacks']} rollback(s), lr scaled by {state['lr_scale']:g}"
    return text

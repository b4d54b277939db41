"""fra31 AutoAttack's legacy API (the `autoattack` module robustbench imports) over `pyautoattack`.

Only the names robustbench and old scripts use: `AutoAttack(model, norm=, eps=, seed=, verbose=,
attacks_to_run=, version=, device=, log_path=)`, `run_standard_evaluation(x, y, bs=, state_path=,
return_labels=)` and the `state` module with `EvaluationState`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import pyautoattack
import torch
from pyautoattack import state  # noqa: F401  (re-exported as autoattack.state)

__all__ = ["AutoAttack", "state"]

_LOGGER = logging.getLogger("auto-attack")


def _attach_handler(handler: logging.Handler, key: str) -> None:
    """Add `handler` to AutoAttack's logger once per `key` (a stream name or a log file path)."""
    if any(getattr(h, "_advgkl_key", None) == key for h in _LOGGER.handlers):
        handler.close()
        return
    handler._advgkl_key = key  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.DEBUG)


class AutoAttack(pyautoattack.AutoAttack):
    """pyautoattack's AutoAttack with fra31's positional/keyword signature and logging options."""

    def __init__(self, model: torch.nn.Module, norm: str = "Linf", eps: float = 0.3,
                 seed: int | None = None, verbose: bool = True,
                 attacks_to_run: Sequence[str] = (), version: str = "standard",
                 is_tf_model: bool = False, device: str | torch.device = "cuda",
                 log_path: str | None = None) -> None:
        if is_tf_model:
            raise ValueError("TensorFlow models are not supported by pyautoattack")
        super().__init__(model, attacks=list(attacks_to_run) or None, device=device, eps=eps,
                         norm=norm, seed=seed, version=version)
        self.verbose = verbose
        if log_path is not None:
            _attach_handler(logging.FileHandler(log_path), str(Path(log_path).resolve()))
        elif verbose:
            _attach_handler(logging.StreamHandler(sys.stdout), "<stdout>")

    def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: str | Path | None = None,
                                *, batch_size: int | None = None):
        """Legacy: returns the adversarial images (and labels with `return_labels`).

        Called with pyautoattack's own `batch_size=` keyword it returns (x_adv, y_adv) as
        pyautoattack does, so pyautoattack's methods that call it keep working.
        """
        x_adv, y_adv = super().run_standard_evaluation(
            x_orig, y_orig, batch_size=bs if batch_size is None else batch_size,
            state_path=None if state_path is None else Path(state_path))
        return (x_adv, y_adv) if return_labels or batch_size is not None else x_adv

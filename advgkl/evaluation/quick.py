"""The quick, NON-STANDARD robustness checks: PGD-k (CE) or CW-k (margin) from a uniform start,
for model selection and screening, and the per-point "still correct under this attack" loop the
per-epoch check, the CO guard and the sanity battery share. Never a substitute for AutoAttack:
their records say so."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from tqdm import tqdm

from advgkl.attacks import PGDAttack
from advgkl.data.tensors import as_float
from advgkl.evaluation.autoattack import EvalResult, check_eps, correct_clean


def correct_under(model: nn.Module, x: Tensor, y: Tensor, attack, *, batch_size: int,
                  device: torch.device | str, desc: str | None = None) -> Tensor:
    """Per point (bool, CPU): still classified correctly after `attack(model, x, y)`, batch by
    batch (a progress bar named `desc`, if given)."""
    flags = []
    for i in tqdm(range(0, len(y), batch_size), desc=desc, disable=desc is None):
        xb, yb = as_float(x[i:i + batch_size]).to(device), y[i:i + batch_size].to(device)
        with torch.no_grad():
            flags.append((model(attack(model, xb, yb)).argmax(1) == yb).cpu())
    return torch.cat(flags)


def pgd(eps: float, steps: int, *, norm: str = "Linf", loss: str = "ce",
        start: str = "uniform") -> PGDAttack:
    """The quick checks' PGD: `steps` steps of 2.5 eps / steps on `loss` ("ce" or the CW
    margin "cw") from `start`."""
    return PGDAttack(eps=eps, step_size=2.5 * eps / steps, steps=steps, norm=norm,
                     objective=loss, random_start=start)


def reference_flags(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str,
                    steps: int, batch_size: int, device: torch.device | str
                    ) -> tuple[Tensor, Tensor]:
    """The reference attack of the sanity battery and the CO guard, per point: (still correct
    under CE PGD-k, ... under both CE and CW-margin PGD-k). A margin loss is not blinded by a
    saturated softmax, which masks CE's gradients (a collapsed or logit-scaled model)."""
    ce = correct_under(model, x, y, pgd(eps, steps, norm=norm), batch_size=batch_size,
                       device=device)
    margin = correct_under(model, x, y, pgd(eps, steps, norm=norm, loss="cw"),
                           batch_size=batch_size, device=device)
    return ce, ce & margin


def evaluate_pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "Linf",
                 steps: int = 20, loss: str = "ce", batch_size: int = 500,
                 device: torch.device | str | None = None, progress: bool = True,
                 first_index: int = 0) -> EvalResult:
    """A quick PGD-k (loss "ce") or CW-k (loss "cw") evaluation for model selection: k steps of
    2.5 eps / k from a uniform random start. Not AutoAttack, and labelled as non-standard."""
    check_eps(eps, norm)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    attack = pgd(eps, steps, norm=norm, loss=loss)
    name = f"{'pgd' if loss == 'ce' else 'cw'}-{steps}"
    start = time.perf_counter()
    clean = correct_clean(model, x, y, batch_size, device)
    robust = clean & correct_under(model, x, y, attack, batch_size=batch_size, device=device,
                                   desc=name if progress else None)
    label = f"{name.upper()} ({'CE' if loss == 'ce' else 'CW margin'}), NON-STANDARD quick check"
    return EvalResult(
        n_examples=len(y), clean_flags=clean.tolist(), robust_flags=robust.tolist(),
        per_attack=[{"attack": name, "robust": int(robust.sum()),
                     "seconds": time.perf_counter() - start}],
        eps=eps, norm=norm, version="quick", attacks=[name], seed=-1,
        first_index=first_index, label=label, labels=y.tolist())

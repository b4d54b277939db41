"""Whether an evaluation can be trusted: AutoAttack's own checks listed one by one, and a short
battery of the automatable checks of Carlini et al. (2019, "On Evaluating Adversarial
Robustness"), run before AutoAttack, with the PGD-to-AutoAttack gap after it.

Each check is a row: the value it measured, its threshold, and "pass" or "FLAG". A FLAG is a
sign of gradient masking (or an attack too weak for the model); passing every row is not proof
of robustness (Popovic et al. 2022). Thresholds are in accuracy (0.02 = 2 points).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.data.tensors import as_float
from advgkl.evaluation.quick import correct_under, pgd, reference_flags
from advgkl.rng import own_stream

STEPS = 20                       # the reference PGD: 20 steps of 2.5 eps / 20, uniform start
SWEEP = (0.5, 1.0, 2.0, 4.0)     # eps multiples before the unbounded attack
NOISE_DRAWS = 5
SEED = 0
TOLERANCE = {"monotone": 0.02, "fgsm": 0.02, "more": 0.05, "noise": 0.02, "autoattack": 0.10}

# AutoAttack's checks (pyautoattack's checks.py): name, what it looks at, its messages' starts.
AA_CHECKS = (
    ("randomness", "5 forwards of the first batch agree (logits within 1e-4)",
     ("it seems to be a randomized defense",)),
    ("softmax_output", "the outputs are logits, not probabilities",
     ("it seems that the output is a probability distribution",)),
    ("dynamic_defense", "the forward pass calls no backward or grad",
     ("it seems to be a dynamic defense", "the check for dynamic defenses")),
    ("class_count", "enough classes for the DLR losses and the target classes",
     ("with only", "it seems that more target classes")),
    ("zero_gradients", "no point has a zero input gradient (APGD with a DLR loss)",
     ("there are",)),
    ("square_success", "Square (black-box) does not beat the white-box attacks",
     ("Square Attack has decreased",)),
)


def autoattack_checks(messages: list[str], attacks: list[str], version: str) -> list[dict]:
    """AutoAttack's checks one by one: ran, fired, their messages (AutoAttack only warns)."""
    ran = {"randomness": version != "rand", "softmax_output": True, "dynamic_defense": True,
           "class_count": True,
           "zero_gradients": any(a in ("apgd-t", "apgd-dlr") for a in attacks),
           "square_success": "square" in attacks and len(attacks) > 1}
    rows = []
    for name, what, starts in AA_CHECKS:
        fired = [m for m in messages if m.startswith(starts)]
        rows.append({"check": name, "what": what, "ran": ran[name], "fired": bool(fired),
                     "messages": fired})
    return rows


# What a flagged row means, in words with its numbers (value and threshold in points).
FINDINGS = {
    "accuracy falls as eps grows": "accuracy rises by {v} points as eps grows (threshold {t})",
    "an unbounded attack reaches chance": "an unbounded attack leaves {v} % accuracy, above "
                                          "chance ({t} %)",
    "single-step does not beat PGD": "FGSM beats PGD by {v} points (threshold {t})",
    "more steps and restarts add little": "more PGD steps and restarts take {v} points more "
                                          "(threshold {t})",
    "white-box beats random noise": "random noise beats PGD by {v} points (threshold {t})",
    "PGD is close to AutoAttack": "PGD overestimates AutoAttack by {v} points (threshold {t})",
}


def finding(row: dict[str, Any]) -> str:
    """What went wrong in a flagged row, with its numbers, e.g. "PGD overestimates AutoAttack by
    12.5 points (threshold 10)"; rows of older records are read the same way."""
    return FINDINGS[row["check"]].format(v=f"{100 * row['value']:.1f}",
                                         t=f"{100 * row['threshold']:g}")


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """The flagged rows' findings, in order."""
    return [finding(r) for r in rows if r["verdict"] == "FLAG"]


def _noise(eps: float, norm: str):
    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return PGDAttack(eps=eps, step_size=0.0, steps=0, norm=norm, objective="ce",
                         random_start="uniform")(model, x, y)
    return attack


def _row(check: str, value: float, threshold: float, detail: str) -> dict[str, Any]:
    """A check passes when its value is at most its threshold."""
    return {"check": check, "value": value, "threshold": threshold,
            "verdict": "pass" if value <= threshold + 1e-9 else "FLAG", "detail": detail}


def battery(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, num_classes: int,
            batch_size: int, device: torch.device) -> dict[str, Any]:
    """The checks before AutoAttack on the points (x, y), model in eval mode, its own random
    stream. Returns {"points", "seconds", "rows", "pgd_flags"} (per point, robust to both PGD-20
    with CE and with the CW margin: what the gap to AutoAttack compares)."""
    model.eval()
    began = time.perf_counter()
    unbounded = 1.0 if norm == "Linf" else math.sqrt(x[0].numel())

    def acc(attack) -> Tensor:
        return correct_under(model, x, y, attack, batch_size=batch_size, device=device)

    with own_stream(SEED, device):
        reference, with_cw = reference_flags(model, x, y, eps=eps, norm=norm, steps=STEPS,
                                             batch_size=batch_size, device=device)
        sweep = {m: (reference if m == 1.0 else acc(pgd(m * eps, STEPS, norm=norm))
                     ).float().mean().item() for m in SWEEP}
        sweep_unbounded = acc(pgd(unbounded, STEPS, norm=norm, start="none")).float().mean().item()
        fgsm = acc(PGDAttack(eps=eps, step_size=eps, steps=1, norm=norm, objective="ce",
                             random_start="none")).float().mean().item()
        more = reference.clone()
        for _ in range(2):  # twice the steps, two restarts: the per-point worst case
            more &= acc(pgd(eps, 2 * STEPS, norm=norm))
        noise = reference.new_ones(len(y))
        for _ in range(NOISE_DRAWS):
            noise &= acc(_noise(eps, norm))
    p = sweep[1.0]
    accs = [sweep[m] for m in SWEEP] + [sweep_unbounded]
    rises = max(b - a for a, b in zip(accs, accs[1:]))
    listing = ", ".join(f"{m:g} eps {100 * sweep[m]:.1f}%" for m in SWEEP)
    rows = [
        _row("accuracy falls as eps grows", rises, TOLERANCE["monotone"],
             f"largest rise between neighbours; PGD-{STEPS} at {listing}, unbounded "
             f"{100 * sweep_unbounded:.1f}%"),
        _row("an unbounded attack reaches chance", sweep_unbounded, 1 / num_classes,
             f"PGD-{STEPS} from x with eps {unbounded:g} (the whole image range) vs chance "
             f"1/{num_classes}"),
        _row("single-step does not beat PGD", p - fgsm, TOLERANCE["fgsm"],
             f"PGD-{STEPS} {100 * p:.1f}% minus FGSM {100 * fgsm:.1f}%"),
        _row("more steps and restarts add little", p - more.float().mean().item(),
             TOLERANCE["more"], f"PGD-{STEPS} {100 * p:.1f}% minus the worst of it and two "
             f"PGD-{2 * STEPS} restarts {100 * more.float().mean().item():.1f}%"),
        _row("white-box beats random noise", p - noise.float().mean().item(),
             TOLERANCE["noise"], f"PGD-{STEPS} {100 * p:.1f}% minus the worst of {NOISE_DRAWS} "
             f"uniform noise draws {100 * noise.float().mean().item():.1f}%"),
    ]
    return {"points": len(y), "seconds": time.perf_counter() - began, "rows": rows,
            "pgd_flags": with_cw.tolist()}


def gap_row(pgd_flags: list[bool], robust_flags: list[bool]) -> dict[str, Any]:
    """After AutoAttack: its accuracy on the battery's points against the reference PGD's."""
    n = len(pgd_flags)
    p, aa = sum(pgd_flags) / n, sum(robust_flags[:n]) / n
    return _row("PGD is close to AutoAttack", p - aa, TOLERANCE["autoattack"],
                f"PGD-{STEPS} (CE and CW margin, per point) {100 * p:.1f}% minus AutoAttack "
                f"{100 * aa:.1f}% on the same {n} points")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows for a terminal."""
    width = max(len(r["check"]) for r in rows)
    lines = [f"{'sanity check':<{width}}  {'value':>7}  {'limit':>7}  verdict"]
    for r in rows:
        lines.append(f"{r['check']:<{width}}  {100 * r['value']:>6.1f}%  "
                     f"{100 * r['threshold']:>6.1f}%  {r['verdict']}")
    return "\n".join(lines)


def before_attack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str,
                  batch_size: int, device: torch.device, attack: str) -> dict[str, Any]:
    """`advgkl eval --sanity`: the battery on (x, y) before `attack` runs."""
    print(f"sanity battery on the first {len(y)} points (before {attack}) ...", flush=True)
    with torch.no_grad():
        classes = model(as_float(x[:1]).to(device)).shape[1]
    return battery(model, x, y, eps=eps, norm=norm, num_classes=classes,
                   batch_size=batch_size, device=device)


def after_attack(checks: dict[str, Any], robust_flags: list[bool] | None,
                 attack_seconds: float) -> dict[str, Any]:
    """The record's `sanity` entry: the battery's rows, the gap to AutoAttack added (when it
    ran: `robust_flags`), printed as a table with the battery's cost."""
    rows = list(checks["rows"])
    if robust_flags is not None:
        rows.append(gap_row(checks["pgd_flags"], robust_flags))
    flags = sum(r["verdict"] == "FLAG" for r in rows)
    print(table(rows))
    for line in findings(rows):
        print(f"sanity FLAG: {line}")
    print(f"sanity: {flags} of {len(rows)} checks flagged; {checks['seconds']:.0f} s "
          f"({checks['seconds'] / max(attack_seconds, 1e-9):.0%} of the attack's "
          f"{attack_seconds:.0f} s)")
    return {"points": checks["points"], "seconds": checks["seconds"], "flags": flags,
            "rows": rows, "thresholds": dict(TOLERANCE),
            "note": "FLAG: a sign of gradient masking or a weak attack; passing every row is "
                    "not proof of robustness"}

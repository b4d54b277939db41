"""AutoAttack evaluation through pyautoattack (never re-implemented), resumable and shardable.

`evaluate_autoattack` runs pyautoattack attack by attack and, within an attack, on the same
batches of still-robust points a direct `run_standard_evaluation` call forms, with the same seed:
the numbers are identical to a direct call. Working batch by batch gives a progress bar, exact
per-attack accuracies and times, and a state file that lets a killed evaluation continue where it
stopped (pyautoattack 0.2.0's own state restore is broken: its `y_adv` is undefined then).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from advgkl.config import linf_size_problem
from advgkl.data.tensors import as_float
from advgkl.errors import UserError

# pyautoattack is imported where it is used, so training (which reuses the quick PGD evaluation)
# runs where pyautoattack is not installed.

VERSIONS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
            "rand": ["apgd-ce", "apgd-dlr"]}
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
APGD_ONLY = ["apgd-ce", "apgd-t"]
STATE_VERSION = 2  # 2: the model's weights are part of the settings


@dataclass
class EvalResult:
    """An evaluation's outcome. Flags are per point, in order, so shards merge exactly; `label`
    says what ran ("AutoAttack", or a non-standard quick evaluation, named as such)."""

    n_examples: int
    clean_flags: list[bool]
    robust_flags: list[bool]
    per_attack: list[dict]          # [{"attack", "robust", "seconds"}] in the order run
    eps: float
    norm: str
    version: str
    attacks: list[str]
    seed: int
    check_flags: list[str] = field(default_factory=list)
    first_index: int = 0            # the points are [first_index, first_index + n_examples)
    label: str = "AutoAttack"       # non-standard evaluations say so here
    labels: list[int] = field(default_factory=list)   # the true class of each point
    precision: str = "fp32"         # "bf16": autocast screening, never standard

    def per_class(self) -> list[dict]:
        """Clean and robust accuracy of each class present, in class order."""
        counts: dict[int, list[int]] = {}
        for c, clean, robust in zip(self.labels, self.clean_flags, self.robust_flags):
            n, n_clean, n_robust = counts.get(c, (0, 0, 0))
            counts[c] = [n + 1, n_clean + clean, n_robust + robust]
        return [{"class": c, "n": n, "clean_acc": k / n, "robust_acc": r / n}
                for c, (n, k, r) in sorted(counts.items())]

    def worst_class(self) -> dict | None:
        """The class with the lowest robust accuracy (the lowest class index on ties)."""
        return min(self.per_class(), key=lambda row: row["robust_acc"], default=None)

    @property
    def clean_acc(self) -> float:
        return sum(self.clean_flags) / self.n_examples

    @property
    def robust_acc(self) -> float:
        return sum(self.robust_flags) / self.n_examples

    @property
    def standard(self) -> bool:
        return (self.version == "standard" and self.attacks == VERSIONS["standard"]
                and self.precision == "fp32")

    def to_dict(self) -> dict:
        return {**asdict(self), "clean_acc": self.clean_acc, "robust_acc": self.robust_acc}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


AutoAttackResult = EvalResult  # the name evaluate_autoattack's API promises


def resolve_attacks(version: str, attacks: Sequence[str] | None) -> list[str]:
    """The attacks a version runs; "custom" takes `attacks`. Unknown names are errors."""
    for name in attacks or ():
        if name not in ATTACKS:
            raise UserError(f"unknown attack {name!r}; AutoAttack has {', '.join(ATTACKS)}")
    if version == "custom":
        if not attacks:
            raise UserError("version custom needs a list of attacks")
        return list(attacks)
    if version not in VERSIONS:
        raise UserError(f"version: {version!r} is not one of {', '.join(VERSIONS)}, custom")
    if attacks and list(attacks) != VERSIONS[version]:
        raise UserError(f"attacks are fixed by version {version!r}; use version custom")
    return list(VERSIONS[version])


def check_eps(eps: float, norm: str) -> None:
    problem = linf_size_problem(eps) if norm == "Linf" else None
    if problem:
        raise UserError(f"eps {problem}")
    if eps <= 0:
        raise UserError(f"eps must be > 0, got {eps:g}")


class _Capture(logging.Handler):
    """Collects the warnings AutoAttack's checks log (randomness, softmax outputs, classes...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _aa_logging(log_path: Path | None) -> Iterator[_Capture]:
    logger = logging.getLogger("auto-attack")
    capture, handlers = _Capture(), []
    handlers.append(capture)
    if log_path is not None:
        file_handler = logging.FileHandler(log_path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handlers.append(file_handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG if log_path is not None else logging.WARNING)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield capture
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


@contextlib.contextmanager
def _checks_already_run(n_classes: int) -> Iterator[None]:
    """pyautoattack runs its model checks (7 extra forward passes) at every call; a direct call
    runs them once. We run them once, then call it batch by batch with the checks switched off."""
    import pyautoattack.autoattack as aa_module

    off = SimpleNamespace(check_randomized=lambda *a, **k: None,
                          check_range_output=lambda *a, **k: n_classes,
                          check_dynamic=lambda *a, **k: None,
                          check_n_classes=lambda *a, **k: None,
                          check_square_sr=lambda *a, **k: None)
    saved, aa_module.checks = aa_module.checks, off
    try:
        yield
    finally:
        aa_module.checks = saved


def plain_model(model: nn.Module) -> nn.Module:
    """The network behind the speed wrappers (torch.compile's module, the bf16 screening)."""
    while isinstance(model, Bf16Model) or hasattr(model, "_orig_mod"):
        model = model.model if isinstance(model, Bf16Model) else model._orig_mod
    return model


def _check_dynamic(model: nn.Module, x: Tensor, logger) -> None:
    """AutoAttack's dynamic-defense check, on the plain network with its counter reset first.
    pyautoattack counts the calls named grad / backward / _make_grads a forward makes in a
    module-level dict that it never resets (checks.funcs), so without the reset every later
    evaluation in a process inherits an earlier one's count; and a compiled model's first call
    traces its backward graph, which the count would take for a dynamic defense."""
    from pyautoattack import checks

    checks.funcs.update(dict.fromkeys(checks.funcs, 0))
    checks.check_dynamic(plain_model(model), x, False, logger=logger)


def _run_checks(adversary, x: Tensor, y: Tensor, batch_size: int) -> int:
    """The checks of `run_standard_evaluation`, on its first batch, as it runs them (the dynamic
    one on the plain network: `_check_dynamic`)."""
    from pyautoattack import checks

    xb, yb = as_float(x[:batch_size]).to(adversary.device), y[:batch_size].to(adversary.device)
    if adversary.version != "rand":
        checks.check_randomized(adversary.get_logits, xb, yb, bs=batch_size,
                                logger=adversary.logger)
    n_classes = checks.check_range_output(adversary.get_logits, xb, logger=adversary.logger)
    _check_dynamic(adversary.model, xb, adversary.logger)
    checks.check_n_classes(n_classes, adversary.attacks_to_run,
                           adversary.apgd_targeted.n_target_classes,
                           adversary.fab.n_target_classes, logger=adversary.logger)
    return n_classes


def fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over each name and the raw bytes of its tensor, in order."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in named:
        digest.update(name.encode())
        raw = value.detach().cpu().contiguous().view(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def load_state(path: Path | None, settings: dict, fresh: dict, what: str) -> dict:
    """A resumable evaluation's state file, or `fresh` (with `settings`) when there is none; a
    file made with other settings (`what` names them) is refused."""
    if path is None or not path.exists():
        return {"settings": settings, **fresh}
    state = json.loads(path.read_text())
    if state.get("settings") != settings:
        raise UserError(f"{path}: this state file belongs to an evaluation with other settings "
                        f"({what}); use another --state")
    return state


class Bf16Model(nn.Module):
    """The network under bf16 autocast, its logits handed back in fp32: AutoAttack's own
    arithmetic (losses, step sizes, Square's buffers) stays as written."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


@torch.no_grad()
def correct_clean(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device) -> Tensor:
    """Per point (bool, CPU): classified correctly, batch by batch."""
    flags = torch.zeros(len(y), dtype=torch.bool)
    for i in range(0, len(y), batch_size):
        pred = model(as_float(x[i:i + batch_size]).to(device)).argmax(1).cpu()
        flags[i:i + batch_size] = pred == y[i:i + batch_size].cpu()
    return flags


def evaluate_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "Linf",
                        version: str = "standard", attacks: Sequence[str] | None = None,
                        batch_size: int = 500, seed: int = 0, state_path: str | Path | None = None,
                        device: torch.device | str | None = None, log_path: str | Path | None = None,
                        progress: bool = True, first_index: int = 0,
                        label: str | None = None, precision: str = "fp32") -> EvalResult:
    """AutoAttack (pyautoattack) on (x, y): clean and robust accuracy, accuracy after each attack
    in order, seconds per attack, robust flags per point, and the flags AutoAttack's checks raise.
    `x` holds floats in [0, 1] or uint8 images (converted batch by batch, as ToTensor would).
    The model runs in eval mode, fp32, without autocast; `precision="bf16"` runs the network
    under bf16 autocast instead (AutoAttack's own arithmetic stays fp32), a NON-STANDARD
    screening labelled so. With `state_path`, progress is saved
    after every batch and a restarted call continues from it."""
    import pyautoattack
    from pyautoattack import checks

    check_eps(eps, norm)
    attacks = resolve_attacks(version, attacks)
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision: {precision!r} is not fp32 or bf16")
    if label is None:
        label = ("AutoAttack" if version == "standard"
                 else f"AutoAttack {version} ({', '.join(attacks)}), NON-STANDARD")
        if precision == "bf16":
            label += " in bf16 autocast, NON-STANDARD screening"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    state_path = Path(state_path) if state_path is not None else None
    settings = {"v": STATE_VERSION, "n": len(y), "eps": eps, "norm": norm, "version": version,
                "attacks": attacks, "seed": seed, "batch_size": batch_size,
                "data": fingerprint([("", x), ("", y)]),
                # the weights too: a state file never continues another model
                "model": fingerprint(model.state_dict().items()),
                "precision": precision}
    state = load_state(state_path, settings, {
        "clean_flags": None, "robust_flags": None, "done": [], "current": None,
        "check_flags": []}, "model weights, points, eps, norm, attacks, seed or batch size")
    if precision == "bf16":
        model = Bf16Model(model, device.type)

    def save() -> None:
        if state_path is not None:
            write_json(state_path, state)

    adversary = pyautoattack.AutoAttack(model, attacks=attacks if version == "custom" else None,
                                        device=device, eps=eps, norm=norm, seed=seed,
                                        version=version)
    with torch.autocast(device.type, enabled=False), \
            _aa_logging(Path(log_path) if log_path else None) as capture:
        n_classes = _run_checks(adversary, x, y, batch_size)
        if state["clean_flags"] is None:
            state["clean_flags"] = correct_clean(model, x, y, batch_size, device).tolist()
            adversary.logger.info(f"advgkl: clean accuracy {sum(state['clean_flags']) / len(y):.2%}"
                                  f" of {len(y)} points")
            state["robust_flags"] = list(state["clean_flags"])
            save()
        robust = torch.tensor(state["robust_flags"], dtype=torch.bool)
        done = {a["attack"] for a in state["done"]}
        with _checks_already_run(n_classes):
            for attack in attacks:
                if attack in done:
                    continue
                current = state["current"]
                if current is None or current["attack"] != attack:
                    current = state["current"] = {"attack": attack, "start": robust.tolist(),
                                                  "batches_done": 0, "seconds": 0.0}
                todo = torch.tensor(current["start"]).nonzero().flatten()
                batches = list(todo.split(batch_size)) if len(todo) else []
                bar = tqdm(total=len(todo), desc=attack, unit="pt", disable=not progress,
                           initial=min(len(todo), current["batches_done"] * batch_size))
                adversary.attacks_to_run = [attack]
                for k, idx in enumerate(batches):
                    if k < current["batches_done"]:
                        continue
                    start = time.perf_counter()
                    _, y_adv = adversary.run_standard_evaluation(as_float(x[idx]), y[idx],
                                                                 batch_size=batch_size)
                    robust[idx[y_adv.cpu() != y[idx].cpu()]] = False
                    current["seconds"] += time.perf_counter() - start
                    current["batches_done"] = k + 1
                    state["robust_flags"] = robust.tolist()
                    save()
                    bar.update(len(idx))
                    bar.set_postfix(robust=f"{robust.float().mean().item():.2%}")
                bar.close()
                state["done"].append({"attack": attack, "robust": int(robust.sum()),
                                      "seconds": current["seconds"]})
                adversary.logger.info(  # pyautoattack's own lines above count one batch each
                    f"advgkl: robust accuracy after {attack}: {robust.float().mean():.2%} of "
                    f"{len(y)} points ({current['seconds']:.1f} s)")
                state["current"] = None
                save()
        accs = {"clean": sum(state["clean_flags"]) / len(y),
                **{a["attack"]: a["robust"] / len(y) for a in state["done"]}}
        checks.check_square_sr(accs, logger=adversary.logger)
        state["check_flags"] = sorted(set(state["check_flags"]) | set(capture.messages))
        save()
    return EvalResult(
        n_examples=len(y), clean_flags=state["clean_flags"], robust_flags=state["robust_flags"],
        per_attack=state["done"], eps=eps, norm=norm, version=version, attacks=attacks, seed=seed,
        check_flags=state["check_flags"], first_index=first_index, label=label,
        labels=y.tolist(), precision=precision)


def in_point_order(results: Sequence[Any], settings: Callable[[Any], tuple]) -> list[Any]:
    """Shard results (each with `first_index` and `n_examples`) in point order; refused unless
    they share `settings(result)` and their point ranges join up."""
    if not results:
        raise UserError("nothing to merge")
    results = sorted(results, key=lambda r: r.first_index)
    if len({settings(r) for r in results}) > 1:
        raise UserError("shards were evaluated with different settings; they cannot merge")
    for a, b in zip(results, results[1:]):
        if a.first_index + a.n_examples != b.first_index:
            raise UserError(f"shards are not contiguous: points {a.first_index}.."
                            f"{a.first_index + a.n_examples - 1} then {b.first_index}..")
    return results


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """The union of shard results over contiguous point ranges: counts are added, flags joined."""
    results = in_point_order(results, lambda r: (r.eps, r.norm, r.version, tuple(r.attacks),
                                                 r.seed, r.label))
    first = results[0]
    per_attack = [{"attack": name,
                   "robust": sum(next(p["robust"] for p in r.per_attack if p["attack"] == name)
                                 for r in results),
                   "seconds": sum(next(p["seconds"] for p in r.per_attack if p["attack"] == name)
                                  for r in results)}
                  for name in (p["attack"] for p in first.per_attack)]
    return EvalResult(
        n_examples=sum(r.n_examples for r in results),
        clean_flags=[f for r in results for f in r.clean_flags],
        robust_flags=[f for r in results for f in r.robust_flags], per_attack=per_attack,
        eps=first.eps, norm=first.norm, version=first.version, attacks=first.attacks,
        seed=first.seed, check_flags=sorted({m for r in results for m in r.check_flags}),
        first_index=first.first_index, label=first.label,
        labels=[c for r in results for c in r.labels], precision=first.precision)

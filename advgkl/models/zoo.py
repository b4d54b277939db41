"""Models from RobustBench's model zoo, loaded by RobustBench's own `load_model` (through
`advgkl.compat`), for the same evaluation as our checkpoints. Weights live where RobustBench
keeps them, MODEL_DIR/<dataset>/<threat>/<name>.pt; RobustBench downloads a missing file where
the machine is online. ImageNet entries carry their evaluation preprocessing (e.g.
BicubicRes256Crop224), which the records keep."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from advgkl.checkpoint import sha256_file
from advgkl.compat import import_robustbench
from advgkl.errors import UserError, first_line

ZOO_DATASETS = ("cifar10", "cifar100", "imagenet")
THREATS = ("Linf", "L2", "corruptions")
ZOO_PREFIX = "robustbench:"


def parse_zoo(spec: str, key: str = "distill.teacher") -> tuple[str, str, str] | None:
    """robustbench:<dataset>/<threat>/<name> -> (dataset, threat, name); None for a file path."""
    if not spec.startswith(ZOO_PREFIX):
        return None
    parts = spec[len(ZOO_PREFIX):].split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"{key}: {spec!r}: expected robustbench:<dataset>/<threat>/"
                        "<name>, e.g. robustbench:cifar10/Linf/Zhang2019Theoretically")
    return parts[0], parts[1], parts[2]


def leaderboard_numbers(name: str, dataset: str, threat: str) -> dict[str, Any] | None:
    """The entry's RobustBench model_info record (clean and AutoAttack accuracy), when the
    installed robustbench has its model_info folder (a source checkout; the PyPI package has
    none)."""
    import robustbench

    root = Path(robustbench.__file__).resolve().parent
    for base in (root / "model_info", root.parent / "model_info"):
        path = base / dataset / threat / f"{name}.json"
        if path.is_file():
            info = json.loads(path.read_text())
            return {"clean_acc": info.get("clean_acc"),
                    "autoattack_acc": info.get("autoattack_acc"), "source": str(path)}
    return None


def load_zoo_model(name: str, *, dataset: str, threat: str, model_dir: str | Path
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """(the zoo entry's model in eval mode, what the records say about it)."""
    if dataset not in ZOO_DATASETS or threat not in THREATS:
        raise UserError(f"--robustbench: dataset {dataset!r} / threat {threat!r}: evaluated here "
                        f"are {', '.join(ZOO_DATASETS)} with {', '.join(THREATS)}")
    import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import all_models, load_model

    entries = all_models[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in entries:
        close = sorted(e for e in entries if e.lower().startswith(name.lower()[:4]))[:5]
        hint = f"; e.g. {', '.join(close)}" if close else ""
        raise UserError(f"--robustbench {name}: no such entry in RobustBench's {dataset} {threat} "
                        f"zoo ({len(entries)} entries{hint})")
    path = Path(model_dir) / dataset / threat / f"{name}.pt"
    had_file = path.is_file()
    new_dirs = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat)
    except Exception as exc:  # RobustBench's loader raises anything: downloads, files, keys
        for folder in new_dirs:   # the folders its loader made for the download, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not had_file and not path.is_file():
            raise UserError(f"--robustbench {name}: no weights at {path} and RobustBench could not "
                            f"download them ({first_line(exc)}); put the file there") from None
        raise UserError(f"--robustbench {name}: RobustBench could not load {path} "
                        f"({first_line(exc)})") from None
    return model.eval(), {"entry": name, "dataset": dataset, "threat": threat,
                          "weights_file": str(path),
                          "weights_sha256": sha256_file(path) if path.is_file() else None,
                          "preprocessing": entries[name].get("preprocessing"),
                          "leaderboard": leaderboard_numbers(name, dataset, threat)}

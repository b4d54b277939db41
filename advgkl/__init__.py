"""advgkl: adversarial training with the GKL/IKL loss and RobustBench-grade evaluation.

The library is laid out in wings, one package per concern, imports running one way (top to
bottom): cli, training, studies, evaluation, data, methods, models, attacks, losses, config, then
the shared plumbing at this level (checkpoint, runlog, rng, distributed, errors, machine, compat,
legacy_autoattack, reference). docs/architecture.md walks through them.

The flat modules of advgkl 0.1 (`advgkl.objectives`, `advgkl.train`, ...) moved into the wings in
0.2; importing one by its old name fails with an ImportError that names its new place.
"""

from __future__ import annotations

import importlib.abc
import sys

__version__ = "0.2.0"

MOVED = {
    "objectives": "methods.objectives", "distill": "methods.distill", "priors": "methods.priors",
    "awp": "methods.awp", "teacher": "methods.teacher", "single_step": "attacks.single_step",
    "recipe_attacks": "attacks.recipes", "config_methods": "config.binding",
    "fields": "config.fields", "folders": "data.folders", "generated": "data.generated",
    "shards": "data.shards", "train_data": "data.train_data", "zoo": "models.zoo",
    "evaluate": "evaluation.autoattack", "eval_job": "evaluation.job",
    "eval_speed": "evaluation.speed", "sanity": "evaluation.sanity",
    "leaderboard": "evaluation.leaderboard", "train": "training.loop", "step": "training.step",
    "train_state": "training.state", "co_guard": "training.co_guard", "ema": "training.ema",
    "schedules": "training.schedules", "init_weights": "training.init_weights",
    "average": "training.average", "study": "studies.study", "study_report": "studies.report",
    "cli_parsers": "cli.parsers",
}
"""advgkl 0.1's flat module -> its module in 0.2 (both relative to `advgkl`)."""


class _MovedModules(importlib.abc.MetaPathFinder):
    """Refuses `import advgkl.<old name>` with the new path, instead of a bare
    ModuleNotFoundError."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            raise ImportError(f"{fullname} moved to advgkl.{MOVED[name]} in advgkl 0.2 (see "
                              "docs/library.md for the new import paths)", name=fullname)
        return None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())

"""`advgkl study STUDY.yaml`: rows (methods, settings) x seeds, each an ordinary run folder trained
at the same budget and scored by the same evaluation; parallel, resumable, or printed for a
scheduler. The table and plots come from `advgkl.studies.report`.

A study file (YAML):

    name: digits_methods              # the study folder: studies/<name> unless --out
    base: configs/demo/digits_gkl.yaml   # relative to the study file's folder, or to the cwd
    overrides: [train.epochs=30]      # for every row
    seeds: [0, 1, 2]
    checkpoint: best.pt               # what is evaluated: best.pt, last.pt or avg.pt
    eval: {n_examples: 360, eps: 32/255, batch_size: 360}   # standard AutoAttack; or quick: pgd-20
    # eval may add corruptions: DIR, a corrupted copy of the test set (`advgkl data corrupt`) or
    # a released set, on which each run is scored too (advgkl eval --threat corruptions)
    rows:
      - {name: trades, overrides: [loss.method=trades, loss.beta=6]}
    teacher:                          # optional: a run the rows distil, trained first
      name: teacher                   # its row in the table (one run, seed `seed`, default 0)
      overrides: [model.arch=wrn-10-1]   # on the base, after the study's overrides
    # rows name its checkpoint (STUDY_DIR/runs/<teacher>-s<seed>/<checkpoint>) as {teacher}:
    #   - {name: rslad, overrides: [loss.method=rslad, "distill.teacher={teacher}"]}

Run (row, seed) trains into STUDY_DIR/runs/<row>-s<seed>/ and writes its records into
STUDY_DIR/results/; its commands' output goes to STUDY_DIR/logs/<row>-s<seed>.log.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from advgkl.config import ConfigError, load_config, parse_number, read_yaml
from advgkl.data.corrupted import read_index
from advgkl.errors import UserError
from advgkl.evaluation.autoattack import check_eps
from advgkl.evaluation.corruption_job import output_paths, record_kind
from advgkl.evaluation.corruptions import CORRUPTIONS
from advgkl.runlog import read_metrics

_KEYS = {"name", "base", "overrides", "seeds", "rows", "eval", "checkpoint", "teacher"}
_TEACHER_KEYS = {"name", "overrides", "seed"}
_EVAL_KEYS = {"n_examples", "eps", "norm", "batch_size", "quick", "sanity", "corruptions"}
_CHECKPOINTS = ("best.pt", "last.pt", "avg.pt")
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def _plain(name: str) -> bool:
    """A study or row name: it names folders and files, so it stays a plain name."""
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


@dataclass(frozen=True)
class Run:
    """One (row, seed) of a study."""

    row: str
    seed: int
    train_args: list[str]      # `advgkl train ...` for a fresh start
    epochs: int
    dataset: str

    @property
    def name(self) -> str:
        return f"{self.row}-s{self.seed}"


@dataclass
class Study:
    path: Path
    name: str
    dir: Path
    rows: list[str]
    seeds: list[int]
    checkpoint: str
    eval: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    teacher: Run | None = None          # trained before the runs that distil it

    @property
    def kind(self) -> str:
        """"standard" (AutoAttack) or the quick check's name (non-standard)."""
        return self.eval.get("quick") or "standard"

    def run_dir(self, run: Run) -> Path:
        return self.dir / "runs" / run.name

    def record(self, run: Run) -> Path:
        """The detailed evaluation record of `run`."""
        suffix = "detailed" if self.kind == "standard" else self.kind
        return (self.dir / "results" / run.dataset / self.eval["norm"]
                / f"{run.name}.{suffix}.json")

    def eval_args(self, run: Run) -> list[str]:
        ev = self.eval
        args = ["eval", str(self.run_dir(run) / self.checkpoint), "--n-examples",
                str(ev["n_examples"]), "--eps", str(ev["eps"]), "--norm", ev["norm"],
                "--batch-size", str(ev["batch_size"]), "--out", str(self.dir / "results"),
                "--model-name", run.name, "--state", str(self.run_dir(run) / "eval_state.json")]
        return (args + (["--quick", ev["quick"]] if ev.get("quick") else [])
                + (["--sanity", str(ev["sanity"])] if ev.get("sanity") else []))

    def corruption_record(self, run: Run) -> Path | None:
        """The detailed record of `run` on the study's corrupted set (None: none asked)."""
        folder = self.eval.get("corruptions")
        if not folder:
            return None
        index = read_index(folder)
        kind = record_kind(index is None, index is not None and
                           len(index["settings"]["corruptions"]) < len(CORRUPTIONS), "fp32")
        return output_paths(self.dir / "results" / run.dataset / "corruptions", run.name, kind,
                            None)["detailed"]

    def corruption_args(self, run: Run) -> list[str]:
        return ["eval", str(self.run_dir(run) / self.checkpoint), "--threat", "corruptions",
                "--corruptions-dir", str(self.eval["corruptions"]), "--batch-size",
                str(self.eval["batch_size"]), "--out", str(self.dir / "results"), "--model-name",
                run.name, "--state", str(self.run_dir(run) / "corruptions_state.json")]


def _list(value: Any, what: str, kind: type) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise UserError(f"{what}: expected a list of {kind.__name__}s, got {value!r}")
    return value


def _eval_spec(tree: Any, where: str) -> dict[str, Any]:
    if not isinstance(tree, dict) or set(tree) - _EVAL_KEYS:
        raise UserError(f"{where}: eval must be a mapping with keys among "
                        f"{', '.join(sorted(_EVAL_KEYS))}")
    spec = {"n_examples": 10_000, "eps": "8/255", "norm": "Linf", "batch_size": 500, **tree}
    if spec["norm"] not in ("Linf", "L2"):
        raise UserError(f"{where}: eval.norm: {spec['norm']!r} is not Linf or L2")
    try:
        check_eps(parse_number(f"{where}: eval.eps", str(spec["eps"])), spec["norm"])
    except UserError as exc:
        raise UserError(f"{where}: eval.{exc}") from None
    for key in ("n_examples", "batch_size"):
        if not isinstance(spec[key], int) or spec[key] < 1:
            raise UserError(f"{where}: eval.{key} must be a positive integer")
    if not isinstance(spec.get("sanity", 0), int) or spec.get("sanity", 0) < 0:
        raise UserError(f"{where}: eval.sanity must be a number of points (0: no battery)")
    if "corruptions" in spec:   # relative to the study file's folder, or to the current one
        found = [p for p in (Path(where).parent / str(spec["corruptions"]),
                             Path(str(spec["corruptions"]))) if p.is_dir()]
        spec["corruptions"] = str(found[0].resolve() if found else Path(spec["corruptions"]))
    return spec


def _base_path(base: Any, study_path: Path) -> Path:
    if not isinstance(base, str):
        raise UserError(f"{study_path}: base must name a config file")
    for candidate in (study_path.parent / base, Path(base)):
        if candidate.is_file():
            return candidate
    raise UserError(f"{study_path}: base config {base} not found (relative to the study file's "
                    "folder or the current one)")


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read and check a study file: every row's config is resolved and validated here."""
    path = Path(path)
    tree = read_yaml(path, "study")
    if not isinstance(tree, dict) or not {"name", "base", "rows", "seeds"} <= set(tree):
        raise UserError(f"{path}: a study needs name, base, rows and seeds")
    if set(tree) - _KEYS:
        raise UserError(f"{path}: unknown keys {sorted(set(tree) - _KEYS)}; a study has "
                        f"{', '.join(sorted(_KEYS))}")
    name = str(tree["name"])
    if not _plain(name):
        raise UserError(f"{path}: name {name!r} may hold letters, digits and _ . + - only, and "
                        "is not . or ..")
    base = _base_path(tree["base"], path)
    common = [str(o) for o in _list(tree.get("overrides", []), "overrides", object)]
    seeds = _list(tree["seeds"], "seeds", int)
    checkpoint = tree.get("checkpoint", "best.pt")
    if checkpoint not in _CHECKPOINTS or not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: checkpoint must be one of {', '.join(_CHECKPOINTS)} and seeds "
                        "a non-empty list of distinct integers")
    study = Study(path, name, Path(out) if out else Path("studies") / name, [], seeds,
                  checkpoint, _eval_spec(tree.get("eval", {}), str(path)))
    rows = _list(tree["rows"], "rows", dict)
    if "teacher" in tree:
        spec = tree["teacher"]
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - _TEACHER_KEYS:
            raise UserError(f"{path}: teacher must be a mapping with a name, and optionally "
                            "overrides and seed")
        rows = [{"name": spec["name"], "overrides": spec.get("overrides", []),
                 "seeds": [spec.get("seed", 0)]}, *rows]
    for row in rows:
        row_name, overrides = row.get("name"), [str(o) for o in row.get("overrides", [])]
        if not isinstance(row_name, str) or not _plain(row_name) or \
                row_name in study.rows or set(row) - {"name", "overrides", "seeds"}:
            raise UserError(f"{path}: each row needs a unique plain name (letters, digits, "
                            f"_ . + -; not . or ..) and a list of overrides; got {row!r}")
        study.rows.append(row_name)
        if "{teacher}" in " ".join(overrides):
            if study.teacher is None:
                raise UserError(f"{path}: row {row_name} names {{teacher}}, but the study has no "
                                "teacher")
            teacher = (study.run_dir(study.teacher) / checkpoint).resolve()
            overrides = [o.replace("{teacher}", str(teacher)) for o in overrides]
        for seed in row.get("seeds", seeds):
            args = [*common, *overrides, f"train.seed={seed}",
                    f"run.out_dir={study.dir / 'runs'}", f"run.name={row_name}-s{seed}"]
            try:
                cfg = load_config(base, args)
            except ConfigError as exc:
                raise UserError(f"{path}: row {row_name}: {exc}") from None
            if checkpoint == "best.pt" and cfg.eval.check == "none":
                raise UserError(f"{path}: row {row_name}: eval.check none writes no best.pt; "
                                "evaluate last.pt or avg.pt")
            study.runs.append(Run(row_name, seed, ["train", str(base), *args],
                                  cfg.train.epochs, cfg.data.dataset))
        if "seeds" in row:
            study.teacher = study.runs[-1]
    return study


def _trained(study: Study, run: Run) -> bool:
    """Training finished: the epochs' rows are in metrics.csv and the checkpoint exists."""
    run_dir = study.run_dir(run)
    rows = read_metrics(run_dir)
    return (run_dir / study.checkpoint).is_file() and bool(rows) and \
        int(rows[-1]["epoch"]) == run.epochs


def run_state(study: Study, run: Run) -> str:
    """done (evaluated, on the corruptions too when asked), trained, started (a run folder) or
    new."""
    corrupted = study.corruption_record(run)
    if study.record(run).is_file() and (corrupted is None or corrupted.is_file()):
        return "done"
    if _trained(study, run):
        return "trained"
    return "started" if study.run_dir(run).exists() else "new"


def _die_with_parent() -> None:
    """In the child: SIGKILL when the study process dies, so no orphan keeps training."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _advgkl(args: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "a") as f:
        f.write(f"$ advgkl {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "advgkl", *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None
                              ).returncode


def execute(study: Study, run: Run, env: dict[str, str] | None = None,
            train_only: bool = False) -> str:
    """Bring `run` to done: train (or resume) it, then evaluate it (continuing a stopped
    evaluation from its state file); `train_only` stops after training. Returns "done" or why
    it failed."""
    env = env or dict(os.environ)
    log = study.dir / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    state = run_state(study, run)
    if state in ("new", "started"):
        args = run.train_args if state == "new" else ["train", "--resume",
                                                       str(study.run_dir(run))]
        if _advgkl(args, log, env):
            return f"training failed (see {log})"
    if train_only:
        return "done"
    if not study.record(run).is_file() and _advgkl(study.eval_args(run), log, env):
        return f"evaluation failed (see {log})"
    corrupted = study.corruption_record(run)
    if corrupted is not None and not corrupted.is_file() and \
            _advgkl(study.corruption_args(run), log, env):
        return f"the corruption evaluation failed (see {log})"
    return "done"


def _failure_file(study: Study, run: Run) -> Path:
    """One file per failed run (`--run` tasks on a cluster write their own, never each other's)."""
    return study.dir / "failures" / f"{run.name}.txt"


def _record_outcome(study: Study, run: Run, outcome: str) -> None:
    path = _failure_file(study, run)
    if outcome == "done":
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(outcome + "\n")
    os.replace(tmp, path)


def failures(study: Study) -> dict[str, str]:
    """Runs whose last attempt failed, with the reason."""
    folder = study.dir / "failures"
    if not folder.is_dir():
        return {}
    return {p.stem: p.read_text().strip() for p in sorted(folder.glob("*.txt"))}


def run_study(study: Study, jobs: int = 1, only: list[Run] | None = None) -> dict[str, str]:
    """Bring every run (or `only` these) to done, `jobs` at a time, each pinned to its share of
    the CPU threads or to one GPU; returns the outcome of each run attempted."""
    import torch

    corrupted = study.eval.get("corruptions")
    if corrupted and not Path(corrupted).is_dir():
        raise UserError(f"{study.path}: eval.corruptions: {corrupted} is not a folder of "
                        "corrupted images; make one first, e.g. advgkl data corrupt --dataset "
                        f"digits --out {corrupted}")
    todo = [r for r in (only or study.runs) if run_state(study, r) != "done"]
    study.dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, str] = {}
    teacher = study.teacher
    if teacher is not None and todo and run_state(study, teacher) in ("new", "started"):
        pupils = [r for r in todo if r is not teacher]
        if teacher in todo:  # its training first, with every core; its evaluation joins the rest
            why = execute(study, teacher, train_only=True)
            if why != "done":
                outcomes[teacher.name] = why
                _record_outcome(study, teacher, why)
                for run in pupils:
                    outcomes[run.name] = f"its teacher {teacher.name} failed"
                    _record_outcome(study, run, outcomes[run.name])
                return outcomes
        elif pupils:
            raise UserError(f"{pupils[0].name} distils {teacher.name}, which is not trained yet; "
                            f"run it first (--run {teacher.name})")
    gpus = torch.cuda.device_count()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def one(run: Run) -> tuple[Run, str]:
        slot = slots.get()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            return run, execute(study, run, env)
        finally:
            slots.put(slot)

    bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="run")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(one, run) for run in todo]):
            run, outcome = future.result()
            outcomes[run.name] = outcome
            _record_outcome(study, run, outcome)
            if outcome != "done":
                bar.write(f"{run.name}: {outcome}")
            bar.update(1)
    bar.close()
    return outcomes


def find_run(study: Study, key: str) -> Run:
    """A run by name (row-sSEED) or by its index in the study's order (Slurm array ids)."""
    if key.isdigit() and int(key) < len(study.runs):
        return study.runs[int(key)]
    for run in study.runs:
        if run.name == key:
            return run
    raise UserError(f"--run {key}: no such run; runs are 0..{len(study.runs) - 1} or "
                    f"{', '.join(r.name for r in study.runs[:4])}, ...")


def scheduler_commands(study: Study, study_arg: str) -> tuple[list[str], str]:
    """One command per run, and a Slurm array script that runs them (each resumable)."""
    out = f" --out {study.dir}" if study.dir != Path("studies") / study.name else ""
    commands = [f"advgkl study {study_arg}{out} --run {run.name}" for run in study.runs]
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=advgkl-{study.name}",
        f"#SBATCH --array=0-{len(study.runs) - 1}",
        "#SBATCH --gres=gpu:1",
        f"#SBATCH --output={study.dir}/logs/slurm-%a.out",
        "# Each task trains (or resumes) and evaluates one run; afterwards:",
        *([f"# Task 0 trains the teacher the others distil: submit it first (--array=0), then "
           f"the rest (--array=1-{len(study.runs) - 1})."] if study.teacher else []),
        f"#   advgkl study {study_arg}{out} --aggregate",
        f"advgkl study {study_arg}{out} --run $SLURM_ARRAY_TASK_ID", ""])
    return commands, script

"""A run folder's logs: train.log (appended), metrics.csv (one row per epoch, appended),
curves.png (redrawn from metrics.csv), and optional trackers (TensorBoard, W&B) fed the same
numbers."""

from __future__ import annotations

import csv
import importlib.util
import io
import time
import uuid
from pathlib import Path
from typing import Any

from advgkl.errors import UserError

_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Every selected tracker is installed (checked before a run folder is made)."""
    for name in names:
        if importlib.util.find_spec(_TRACKER_MODULES[name]) is None:
            raise UserError(f"run.loggers: {name} is selected but not installed "
                            f"(pip install {_TRACKER_MODULES[name]}), or drop it from run.loggers")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, project: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per run folder (its id kept in RUN/wandb_id, so a resumed run continues it);
    W&B's own settings, e.g. WANDB_MODE=offline, are left to the environment."""

    def __init__(self, run_dir: Path, config: dict, project: str) -> None:
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16])
        self.run = wandb.init(project=project, name=run_dir.name, id=id_file.read_text(),
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB}

METRIC_FIELDS = ("epoch", "lr", "loss", "ce", "robust", "train_acc", "clean_acc", "robust_acc",
                 "eval_weights", "check_points", "eps", "attack_steps", "images_per_s", "seconds",
                 "co_pgd_acc", "co_fgsm_acc", "co_distortion", "co_seconds", "co_event")


def _read(path: Path) -> tuple[bytes, bytes]:
    """(the file's bytes, its whole lines): a line that a kill cut short (or a write under way)
    is not among the whole lines; no file reads as empty."""
    text = path.read_bytes() if path.exists() else b""
    return text, text[:text.rfind(b"\n") + 1]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The complete rows of RUN/metrics.csv (none when it does not exist yet)."""
    _, whole = _read(run_dir / "metrics.csv")
    return list(csv.DictReader(io.StringIO(whole.decode(), newline="")))


class RunLog:
    PLOT_EVERY = 10.0  # seconds: curves.png is redrawn after an epoch at most this often

    def __init__(self, run_dir: Path, *, echo: bool = True, write: bool = True,
                 trackers: list[str] = (), config: dict | None = None,
                 project: str = "advgkl") -> None:
        self.run_dir, self.echo, self.write = run_dir, echo, write  # write: False off rank 0
        self.plotted: float | None = None   # when curves.png was last drawn (monotonic)
        self.metrics_path = run_dir / "metrics.csv"
        self.trackers = ([_TRACKERS[name](run_dir, config or {}, project) for name in trackers]
                         if write else [])

    def track(self, values: dict[str, Any], step: int) -> None:
        """Send the numeric `values` to the trackers at global training step `step`."""
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self.echo:
            print(line, flush=True)
        if self.write:
            with open(self.run_dir / "train.log", "a") as f:
                f.write(line + "\n")

    def has_line(self, message: str) -> bool:
        """train.log holds a line with this message."""
        path = self.run_dir / "train.log"
        return path.exists() and any(line.split(" ", 2)[-1] == message
                                     for line in path.read_text().splitlines())

    def logged_epochs(self) -> list[int]:
        return [int(row["epoch"]) for row in read_metrics(self.run_dir)]

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append `row` in one write. A file that a kill left without its header (created, not
        yet written) starts again; a last line cut short is dropped first."""
        if not self.write:
            return
        text, complete = _read(self.metrics_path)
        if complete != text:
            self.metrics_path.write_bytes(complete)
        # a run from an older version keeps its own columns
        fields = tuple(next(csv.reader(io.StringIO(complete.decode())), METRIC_FIELDS))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        if not complete:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})
        with open(self.metrics_path, "a", newline="") as f:
            f.write(text.getvalue())

    def plot(self, *, final: bool = False) -> None:
        """Accuracies and losses per epoch, from metrics.csv, into curves.png: always for the
        run's `final` epoch, else when PLOT_EVERY seconds have passed since the last drawing (a
        drawing costs about half a second: most of a small model's epoch)."""
        now = time.monotonic()
        if not final and self.plotted is not None and now - self.plotted < self.PLOT_EVERY:
            return
        self.plotted = now
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = read_metrics(self.run_dir)
        epochs = [int(r["epoch"]) for r in rows]
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
        check = rows[-1].get("check_points") or "held-out points"
        for key, label in (("train_acc", "train (clean, train mode)"),
                           ("clean_acc", f"clean ({check})"), ("robust_acc", f"PGD ({check})")):
            points = [(e, 100 * float(r[key])) for e, r in zip(epochs, rows) if r.get(key)]
            if points:  # no check (eval.check=none): no clean / PGD curve
                acc.plot(*zip(*points), marker=".", label=label)
        for key, label in (("co_pgd_acc", "CO guard PGD (CE and margin)"),
                           ("co_fgsm_acc", "CO guard FGSM"),
                           ("co_distortion", "CO guard boundary distortion")):
            points = [(e, 100 * float(r[key])) for e, r in zip(epochs, rows) if r.get(key)]
            if points:
                acc.plot(*zip(*points), marker="x", linestyle=":", label=label)
        for e, r in zip(epochs, rows):
            if r.get("co_event"):
                acc.axvline(e, color="red", alpha=0.3)
        acc.set(xlabel="epoch (red: catastrophic overfitting)" if any(
            r.get("co_event") for r in rows) else "epoch", ylabel="accuracy (%)",
            title="accuracy")
        acc.legend()
        for key in ("loss", "ce", "robust"):
            loss.plot(epochs, [float(r[key]) for r in rows], marker=".", label=key)
        loss.set(xlabel="epoch", title="training loss")
        loss.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=100)
        plt.close(fig)

"""A run folder's logs: train.log (appended), metrics.csv (one row per epoch, appended), and
curves.png (redrawn from metrics.csv)."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

METRIC_FIELDS = ("epoch", "lr", "loss", "ce", "robust", "train_acc", "clean_acc", "robust_acc",
                 "eval_weights", "eps", "attack_steps", "images_per_s", "seconds")


class RunLog:
    def __init__(self, run_dir: Path, *, echo: bool = True, write: bool = True) -> None:
        self.run_dir, self.echo, self.write = run_dir, echo, write  # write: False off rank 0
        self.metrics_path = run_dir / "metrics.csv"

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self.echo:
            print(line, flush=True)
        if self.write:
            with open(self.run_dir / "train.log", "a") as f:
                f.write(line + "\n")

    def logged_epochs(self) -> list[int]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, newline="") as f:
            return [int(row["epoch"]) for row in csv.DictReader(f)]

    def append_metrics(self, row: dict[str, Any]) -> None:
        if not self.write:
            return
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})

    def plot(self) -> None:
        """Accuracies and losses per epoch, from metrics.csv, into curves.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.metrics_path, newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("train_acc", "train (clean, train mode)"), ("clean_acc", "clean"),
                           ("robust_acc", "robust (PGD)")):
            acc.plot(epochs, [100 * float(r[key]) for r in rows], marker=".", label=label)
        acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        acc.legend()
        for key in ("loss", "ce", "robust"):
            loss.plot(epochs, [float(r[key]) for r in rows], marker=".", label=key)
        loss.set(xlabel="epoch", title="training loss")
        loss.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=100)
        plt.close(fig)

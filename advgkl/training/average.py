"""`advgkl average`: the epoch average (the paper's final step) computed afterwards from a run's
per-epoch checkpoints (`train.save_every=1` keeps them as epoch-NNN.pt)."""

from __future__ import annotations

import re
from pathlib import Path

from advgkl.checkpoint import load_checkpoint, model_checkpoint
from advgkl.errors import UserError
from advgkl.models.loading import model_from_checkpoint
from advgkl.training.ema import EpochAverage

_EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt")


def epoch_files(run_dir: str | Path) -> dict[int, Path]:
    """The run's per-epoch checkpoints by epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    return {int(m.group(1)): p for p in run_dir.iterdir() if (m := _EPOCH_FILE.fullmatch(p.name))}


def average_run(run_dir: str | Path, *, tau: float, start: int = 1,
                end: int | None = None) -> dict:
    """A checkpoint holding avg <- w_start, then avg <- (1 - tau) w_e + tau avg for each epoch e
    up to `end` (default: the last saved), from epoch-NNN.pt files; the same weights as
    `train.epoch_avg_tau` / `train.epoch_avg_start` keep online."""
    if not 0 < tau < 1:
        raise UserError(f"--tau: {tau} must be between 0 and 1")
    files = epoch_files(run_dir)
    if not files:
        raise UserError(f"{run_dir}: no epoch-NNN.pt files (train with train.save_every=1 to keep "
                        "them)")
    end = max(files) if end is None else end
    if not 1 <= start <= end:
        raise UserError(f"--start {start} / --end {end}: need 1 <= start <= end")
    missing = [e for e in range(start, end + 1) if e not in files]
    if missing:
        raise UserError(f"{run_dir}: no checkpoint for epoch(s) {', '.join(map(str, missing[:8]))}"
                        f"{' ...' if len(missing) > 8 else ''}; the average needs every epoch "
                        f"from {start} to {end} (train.save_every=1)")
    first = load_checkpoint(files[start])
    average = EpochAverage(model_from_checkpoint(first, what=str(files[start])), tau=tau,
                           start=start)
    for epoch in range(start, end + 1):
        ckpt = first if epoch == start else load_checkpoint(files[epoch])
        if ckpt.get("epoch") != epoch or ckpt.get("arch") != first["arch"]:
            raise UserError(f"{files[epoch]}: holds epoch {ckpt.get('epoch')} of "
                            f"{ckpt.get('arch')}, not epoch {epoch} of {first['arch']}")
        average.update(ckpt["model"], epoch)
    return model_checkpoint(average.module.state_dict(), arch=first["arch"],
                            num_classes=first["num_classes"], arch_kwargs=first.get("arch_kwargs"),
                            epoch=end, config=first.get("config"),
                            averaged={"tau": tau, "start": start, "end": end})

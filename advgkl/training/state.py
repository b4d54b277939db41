"""What a training checkpoint holds and how a run picks up from it: `last.pt` after each epoch,
and `partial.pt` inside an epoch every train.checkpoint_steps steps (removed once the epoch
ends), which records where the epoch stands (its next batch, the running sums), so a resume
continues with the very next batch, bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advgkl import distributed
from advgkl.checkpoint import load_checkpoint, model_checkpoint
from advgkl.config import Config, config_to_dict
from advgkl.methods.teacher import Teacher
from advgkl.rng import rng_state, set_rng_state
from advgkl.runlog import RunLog
from advgkl.training.co_guard import COGuard
from advgkl.training.step import TrainStep

PARTIAL = "partial.pt"


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """The architecture's keyword arguments the config sets (saved in checkpoints)."""
    return {} if cfg.model.normalize or not cfg.model.arch.startswith("timm:") else {
        "normalize": False}


def rank_states(ranks: distributed.DistInfo, sums: dict | None = None) -> list[dict] | None:
    """What differs between processes, gathered from every rank (None for one process): each
    one's random streams and, inside an epoch, its running sums. Every rank calls it."""
    if ranks.world == 1:
        return None
    return distributed.all_gather({"rng": rng_state(), "sums": sums}, ranks)


def run_state(cfg: Config, parts: TrainStep, *, teacher: Teacher | None, guard: COGuard | None,
              epoch: int, step: int, best: float, metrics: dict[str, Any],
              selection: dict | None, position: dict | None = None,
              per_rank: list[dict] | None = None, log_line: str | None = None) -> dict:
    """Everything a resume needs after `epoch` finished epochs and `step` optimizer steps (and,
    inside the next epoch, its `position`); `per_rank` from rank_states (rank 0's streams are
    taken again now: its epoch-end checks draw from them); `log_line`, the epoch's train.log
    line."""
    rng = rng_state()
    if per_rank is not None:
        per_rank = [{**per_rank[0], "rng": rng}, *per_rank[1:]]
    return model_checkpoint(
        parts.model.state_dict(), arch=cfg.model.arch, num_classes=parts.prior.num_classes,
        arch_kwargs=model_kwargs(cfg), ema=parts.ema.state_dict(),
        optimizer=parts.optimizer.state_dict(), prior=parts.prior.state_dict(),
        epoch_avg=parts.epoch_avg.state_dict() if parts.epoch_avg is not None else None,
        natural=({"arch": cfg.loss.lbgat.natural_arch, "model": parts.natural.state_dict()}
                 if parts.natural is not None else None),
        teacher=teacher.identity if teacher is not None else None,
        epoch=epoch, step=step, best_robust_acc=best, rng=rng, config=config_to_dict(cfg),
        metrics=metrics, check=selection,
        co_guard=guard.state_dict() if guard is not None else None, position=position,
        ranks=per_rank, log_line=log_line)


def latest_state(run_dir: Path) -> dict | None:
    """The newest state of a run: `partial.pt` when it lies inside the epoch after last.pt's
    (a kill inside an epoch), else `last.pt`; None before the first checkpoint."""
    last, partial = run_dir / "last.pt", run_dir / PARTIAL
    ckpt = load_checkpoint(last, map_location="cpu") if last.is_file() else None
    if partial.is_file():
        inside = load_checkpoint(partial, map_location="cpu")
        if ckpt is None or inside["epoch"] >= ckpt["epoch"]:
            return inside
    return ckpt


def restore(parts: TrainStep, ckpt: dict, log: RunLog,
            ranks: distributed.DistInfo) -> tuple[int, int, float, dict | None]:
    """Load a saved state into `parts` (this rank's streams and sums when the checkpoint has as
    many processes as this run); returns (the epoch to run, step, best, the position inside
    that epoch or None)."""
    parts.model.load_state_dict(ckpt["model"])
    parts.ema.load_state_dict(ckpt["ema"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.prior.load_state_dict(ckpt["prior"])
    if parts.epoch_avg is not None:
        parts.epoch_avg.load_state_dict(ckpt["epoch_avg"])
    if parts.natural is not None:
        parts.natural.load_state_dict(ckpt["natural"]["model"])
    if ckpt["metrics"] and ckpt["epoch"] not in log.logged_epochs():  # killed before its row
        if ckpt.get("log_line") and not log.has_line(ckpt["log_line"]):
            log.log(ckpt["log_line"])
        log.append_metrics(ckpt["metrics"])
    saved = ckpt.get("ranks") or [{"rng": ckpt["rng"]}]
    mine = saved[ranks.rank] if len(saved) == ranks.world else saved[0]
    if len(saved) != ranks.world:
        log.log(f"note: the checkpoint was written by {len(saved)} process(es), this run has "
                f"{ranks.world}: every rank continues rank 0's random streams (and, inside an "
                "epoch, its running sums), so the run is no longer bit-identical to one that "
                "was never stopped")
    set_rng_state(mine["rng"])
    position = ckpt.get("position")
    if position is not None and mine.get("sums") is not None:
        position = {**position, "sums": mine["sums"]}
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["best_robust_acc"], position

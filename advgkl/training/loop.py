"""Adversarial training: one plain loop (`train`), read top to bottom.

Per step (`advgkl.training.step.TrainStep`): attack (the method's own; clean logits cached) ->
clean and adversarial forward (train mode) -> objective dict -> backward -> optimizer step
(inside an AWP perturbation when active) -> class-prior update -> weight-EMA update; a
distillation method's frozen teacher (`advgkl.methods.teacher`) is loaded and checked before the
run folder exists. On CUDA the forward passes can run in bf16 autocast, channels_last and
compiled; evaluation always runs in fp32.
Per epoch: the class prior's new rows, the epoch average (the authors' final step), clean and
PGD accuracy on the check points (a validation split of the training set by default) and
`best.pt` by it, the catastrophic-overfitting guard (`advgkl.training.co_guard`: warn, stop
with the weights it rated best, or roll back to them and go on at half the lr), `avg.pt`,
`epoch-NNN.pt` when asked, `last.pt` (atomic, written last), a metrics row, the curves.
`resume=True` continues bit-exactly from `last.pt`. A run that fails before its first checkpoint
removes the folder it created.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from advgkl import distributed
from advgkl.attacks.pgd import PGDAttack
from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from advgkl.config import Config, config_to_dict, save_config
from advgkl.config.binding import SINGLE_STEPS, attack_description
from advgkl.config.methods import METHODS, describe
from advgkl.data.tensors import Split, to_unit_float
from advgkl.data.train_data import TrainData, epoch_loader, training_data
from advgkl.errors import UserError
from advgkl.evaluation.quick import evaluate_pgd
from advgkl.machine import describe_machine
from advgkl.methods.teacher import Teacher, load_teacher
from advgkl.rng import seed_everything
from advgkl.runlog import RunLog, check_trackers
from advgkl.training.build import build_attack, build_model, check_batch_split, resolve_device
from advgkl.training.co_guard import BEST as CO_BEST
from advgkl.training.co_guard import COGuard, guard_mode
from advgkl.training.init_weights import load_init
from advgkl.training.schedules import cyclic_momentum, learning_rate, peak_lr
from advgkl.training.state import (PARTIAL, latest_state, model_kwargs, rank_states, restore,
                                   run_state)
from advgkl.training.step import TrainStep


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint stays valid."""


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False,
          device: torch.device | None = None, echo: bool = True,
          notes: Iterable[str] = ()) -> dict[str, float]:
    """Train `cfg` into `run_dir` (created; refused if it exists) or resume it (from `last.pt`,
    or from epoch 1 when the run stopped before its first checkpoint); returns the last epoch's
    metrics. Everything is checked before the folder is created, and a run that fails before
    its first checkpoint removes the folder it created. `notes` (what building the config had to
    say) go into train.log."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    ranks, device_name = distributed.setup(cfg.train.device)
    check_batch_split(cfg, ranks.world)
    if resume and not run_dir.is_dir():
        raise UserError(f"{run_dir}: nothing to resume (no such run folder)")
    if not resume and run_dir.exists():
        hint = ("" if last.is_file() else " (it has no checkpoint yet: --resume starts it at epoch "
                "1 with its saved config)")
        raise UserError(f"{run_dir} already exists{hint}; resume it with --resume {run_dir} or "
                        "choose another run.name (nothing was overwritten)")
    ckpt = latest_state(run_dir) if resume else None
    legacy = ckpt is not None and "check" not in ckpt and cfg.eval.check != "test"
    if legacy:  # a run from before validation splits trained on all images: keep what it did
        cfg.eval.check = "test"
    data = training_data(cfg)  # data errors come before the run folder
    num_classes = data.num_classes
    # Before seeding: the student's initialization and data order do not depend on the teacher.
    teacher = (load_teacher(cfg.distill, dataset=cfg.data.dataset, num_classes=num_classes)
               if METHODS[cfg.loss.method].teacher else None)
    if teacher is not None:  # recorded in config.yaml: a resume needs this very file again
        cfg.distill.teacher, cfg.distill.teacher_sha256 = (teacher.identity["source"],
                                                           teacher.identity["sha256"] or "")
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model.arch, num_classes, **model_kwargs(cfg))
    init = (load_init(model, cfg.model.init, arch=cfg.model.arch, model_dir=cfg.model.model_dir)
            if cfg.model.init and ckpt is None else None)
    natural = (build_model(cfg.loss.lbgat.natural_arch, num_classes, "loss.lbgat.natural_arch")
               if METHODS[cfg.loss.method].natural_model else None)
    if ranks.rank > 0:  # every rank its own random starts, crops and Mixup draws (ARES, timm)
        seed_everything(cfg.train.seed + ranks.rank)
    device = device or resolve_device(device_name)
    check_trackers(cfg.run.loggers)
    distributed.barrier(ranks)  # every rank has checked before rank 0 creates the folder
    created = not resume and ranks.main
    if created:
        run_dir.mkdir(parents=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier(ranks)
    log = None
    try:
        log = RunLog(run_dir, echo=echo and ranks.main, write=ranks.main,
                     trackers=cfg.run.loggers, config=config_to_dict(cfg),
                     project=cfg.run.wandb_project)
        for line in notes:
            log.log(f"note: {line}")
        if init is not None:
            log.log(f"initial weights: {init['source']} (sha256 {init['sha256']})")
        parts = TrainStep(cfg, model, num_classes, device, world=ranks.world, note=log.log,
                          natural=natural, teacher=teacher and teacher.module)
        if resume and ckpt is None:
            log.log(f"no {last.name} yet (the run stopped before its first checkpoint): "
                    "starting at epoch 1 with its saved config")
        if legacy:
            log.log(f"{last.name} predates validation splits: its per-epoch check stays on the "
                    "first eval.holdout_size test points, as before")
        return _run(cfg, run_dir, parts, data, ckpt, ranks, log, echo, teacher)
    except BaseException:
        if created and not last.exists():  # nothing worth keeping: let the same command rerun
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if log is not None:
            log.close()
        distributed.teardown(ranks)


def _run(cfg: Config, run_dir: Path, parts: TrainStep, data: TrainData, ckpt: dict | None,
         ranks: distributed.DistInfo, log: RunLog, echo: bool,
         teacher: Teacher | None) -> dict[str, Any]:
    device = parts.device
    dataset, n_real, check, check_label = data.dataset, data.n_real, data.check, data.check_label
    start_epoch, step, best, position = 1, 0, -1.0, None
    if ckpt is not None:
        start_epoch, step, best, position = restore(parts, ckpt, log, ranks)
        where = (f"inside epoch {start_epoch} (before its batch {position['batch'] + 1})"
                 if position else f"after epoch {ckpt['epoch']}")
        log.log(f"resumed from {run_dir / (PARTIAL if position else 'last.pt')} {where} on "
                f"{describe_machine(device)}")
    else:
        log.log(f"training {cfg.model.arch} on {cfg.data.dataset} with {cfg.loss.method} "
                f"on {device} into {run_dir}")
        log.log(f"machine: {describe_machine(device)}")
        log.log(f"method: {describe(cfg.loss.method, cfg.loss.settings)}; attack "
                f"{attack_description(cfg)}")
        if teacher is not None:
            log.log(f"teacher: {teacher.identity['source']} ({teacher.identity['arch']}, sha256 "
                    f"{teacher.identity['sha256']}), frozen, eval mode")
        if data.source:
            log.log(data.source)
        if cfg.data.generated:
            log.log(f"{n_real} real + {len(dataset) - n_real} generated images from "
                    f"{cfg.data.generated}, {cfg.data.generated_fraction:.0%} generated per batch")
    if check_label.startswith("TEST"):
        log.log(f"eval.check=test: the per-epoch check and best.pt use the first {len(check.labels)}"
                " TEST points; a test evaluation of best.pt is biased by this selection")
    if check is not None:
        check = Split(to_unit_float(check.images).to(device), check.labels.to(device))

    guard = _guard(cfg, check, log)
    if guard is not None and ckpt is not None and ckpt.get("co_guard"):
        guard.load_state_dict(ckpt["co_guard"])
    if guard is not None and guard.state.stopped_at:
        log.log(f"the CO guard stopped this run at epoch {guard.state.stopped_at}; nothing to "
                f"resume (the final model is epoch "
                f"{guard.state.best_epoch or guard.state.good_epoch}'s)")
        return {}
    metrics: dict[str, Any] = dict(ckpt["metrics"]) if ckpt is not None else {}
    epoch = start_epoch
    while epoch <= cfg.train.epochs:
        attack = build_attack(cfg, epoch)
        first = position["batch"] if position else 0
        loader = epoch_loader(cfg, dataset, n_real, ranks, epoch, device.type == "cuda",
                              skip=first)
        lr_scale = guard.state.lr_scale if guard is not None else 1.0

        def save_inside(batch: int, at_step: int, sums: dict, seconds: float) -> None:
            per_rank = rank_states(ranks, dict(sums))
            if ranks.main:
                save_checkpoint(run_dir / PARTIAL, run_state(
                    cfg, parts, teacher=teacher, guard=guard, epoch=epoch - 1, step=at_step,
                    best=best, metrics=metrics, selection=None,
                    position={"batch": batch, "sums": dict(sums), "seconds": seconds},
                    per_rank=per_rank))

        sums, lr, seconds, step = _train_epoch(
            cfg, parts, loader, attack, epoch, step, lr_scale, run_dir, log, echo and ranks.main,
            first=first, resumed=position, save=save_inside)
        position = None
        parts.prior.end_epoch()
        if parts.epoch_avg is not None:
            parts.epoch_avg.update(parts.model.state_dict(), epoch)
        totals = distributed.all_reduce_sum(
            [sums[k] for k in ("loss", "ce", "robust", "correct", "seen")], ranks, device)
        distributed.assert_ranks_agree(
            torch.stack([p.detach().double().sum() for p in parts.model.parameters()]
                        + [parts.prior.prior.double().sum()]), ranks, "weights or class prior")
        action, per_rank = "", rank_states(ranks)
        if ranks.main:  # rank 0 evaluates, logs and saves
            loss_sum, ce_sum, robust_sum, correct, seen = totals
            metrics = {"epoch": epoch, "lr": lr, "loss": loss_sum / seen, "ce": ce_sum / seen,
                       "robust": robust_sum / seen, "train_acc": correct / seen,
                       "check_points": check_label, "eps": attack.eps,
                       "attack_steps": attack.steps, "images_per_s": seen / seconds,
                       "seconds": seconds}
            best, action = _end_epoch(cfg, run_dir, parts, check, check_label, epoch, step, best,
                                      metrics, log, teacher, guard, per_rank)
            (run_dir / PARTIAL).unlink(missing_ok=True)  # last.pt now holds the newer state
        action = _ACTIONS[int(distributed.all_reduce_sum([_ACTIONS.index(action)], ranks,
                                                         device)[0])]
        if action == "stop":
            break
        if action == "rollback":  # every rank restores the state rank 0 rewrote into last.pt
            distributed.barrier(ranks)
            restored = load_checkpoint(run_dir / "last.pt", map_location="cpu")
            epoch, step, best, _ = restore(parts, restored, log, ranks)
            guard.load_state_dict(restored["co_guard"])
            continue
        epoch += 1
    distributed.barrier(ranks)
    return metrics


_ACTIONS = ("", "warn", "stop", "rollback")


def _guard(cfg: Config, check: Split | None, log: RunLog) -> COGuard | None:
    """The run's catastrophic-overfitting guard (None: off), on the first co_guard_points of
    the validation split."""
    t = cfg.train
    mode, note = guard_mode(t.co_guard, single_step=cfg.attack.kind in SINGLE_STEPS,
                            check=cfg.eval.check)
    if note:
        log.log(f"note: {note}")
    if mode == "off":
        return None
    n = min(t.co_guard_points, len(check.labels))
    guard = COGuard(mode, check.images[:n], check.labels[:n], eps=cfg.attack.eps,
                   steps=t.co_guard_steps, drop=t.co_guard_drop, fraction=t.co_guard_fraction,
                   min_drop=t.co_guard_min_drop, rollbacks=t.co_guard_rollbacks,
                   batch_size=cfg.eval.batch_size)
    log.log(f"CO guard: {mode}; after each epoch the worst of CE and margin PGD-"
            f"{t.co_guard_steps} (the sanity battery's reference attack) and FGSM at eps "
            f"{cfg.attack.eps:.4g} on {n} validation points, with the boundary distortion along "
            f"FGSM; cost {guard.cost()} (its seconds per epoch: co_seconds in metrics.csv)")
    return guard


def _train_epoch(cfg: Config, parts: TrainStep, loader: Iterable, attack: PGDAttack, epoch: int,
                 step: int, lr_scale: float, run_dir: Path, log: RunLog, echo: bool, *,
                 first: int = 0, resumed: dict | None = None,
                 save: Callable[[int, int, dict, float], None] | None = None
                 ) -> tuple[dict[str, float], float, float, int]:
    """One epoch of steps from batch `first` (a resume inside the epoch, with the sums and
    seconds so far in `resumed`), `save` called every train.checkpoint_steps steps; (sums of the
    loss terms, correct and seen; the last lr; seconds; the global step after it)."""
    t = cfg.train
    parts.model.train()
    sums = (dict(resumed["sums"]) if resumed else
            {"loss": 0.0, "ce": 0.0, "robust": 0.0, "correct": 0, "seen": 0})
    start = time.perf_counter() - (resumed["seconds"] if resumed else 0.0)
    bar = tqdm(loader, desc=f"epoch {epoch}/{t.epochs}", leave=False, initial=first,
               total=first + len(loader),
               disable=None if echo else True)  # None: off if no terminal
    lr, batches, peak = 0.0, first + len(loader), peak_lr(t.lr, t.batch_size, t.lr_base_batch)
    for i, (x, y) in enumerate(bar, start=first):
        lr = lr_scale * learning_rate(t.lr_schedule, epoch, t.epochs, i, batches, lr=peak,
                                      warmup=t.lr_warmup_epochs, milestones=t.lr_milestones,
                                      first=t.lr_first_epochs, warmup_start=t.lr_warmup_start,
                                      lr_min=t.lr_min)
        momentum = cyclic_momentum(epoch, t.epochs, i, batches) if t.cycle_momentum else None
        stats = parts(x, y, attack=attack, epoch=epoch, lr=lr, momentum=momentum)
        if not math.isfinite(stats["loss"]):
            kept = (f"{run_dir / 'last.pt'} holds the last good state" if epoch > 1
                    else "no checkpoint was written")
            raise TrainingError(f"non-finite loss ({stats['loss']}) at epoch {epoch}, step "
                                f"{i + 1}; {kept}")
        step += 1
        if cfg.run.log_every and step % cfg.run.log_every == 0:
            log.track({"step/lr": lr, **{f"step/{k}": stats[k]
                                         for k in ("loss", "ce", "robust")}}, step)
        for key in ("loss", "ce", "robust"):
            sums[key] += stats[key] * stats["n"]
        sums["correct"] += int(stats["correct"])
        sums["seen"] += stats["n"]
        bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                        img_s=f"{sums['seen'] / (time.perf_counter() - start):.0f}")
        if save and t.checkpoint_steps and step % t.checkpoint_steps == 0 and i + 1 < batches:
            save(i + 1, step, sums, time.perf_counter() - start)
    return sums, lr, time.perf_counter() - start, step


def _check_weights(cfg: Config, parts: TrainStep) -> tuple[torch.nn.Module, str]:
    """What the per-epoch check scores: the weights `advgkl eval` scores by default (the epoch
    average, else the EMA, once running), or the model's own with select_with_ema off."""
    if cfg.train.select_with_ema:
        if parts.epoch_avg is not None and parts.epoch_avg.started:
            return parts.epoch_avg.module, "avg"
        if parts.ema.started:
            return parts.ema.module, "ema"
    return parts.model, "model"


def _end_epoch(cfg: Config, run_dir: Path, parts: TrainStep, check: Split | None,
               check_label: str, epoch: int, step: int, best: float, metrics: dict[str, Any],
               log: RunLog, teacher: Teacher | None, guard: COGuard | None,
               per_rank: list[dict] | None) -> tuple[float, str]:
    """The checks, the files and the logs of a finished epoch (rank 0); returns the best robust
    accuracy so far and the CO guard's action. Side files first, last.pt last: a kill in between
    redoes the epoch. An epoch the guard stops or rolls back writes no weights: last.pt becomes
    the state of the epoch the guard rated best, with the guard's new state."""
    is_best, selection, note, action = False, None, "", ""
    if check is not None:
        module, weights = _check_weights(cfg, parts)
        result = evaluate_pgd(module, check.images, check.labels, eps=cfg.eval.eps,
                              norm=cfg.eval.norm, steps=cfg.eval.pgd_steps,
                              batch_size=cfg.eval.batch_size, progress=False)
        metrics.update(clean_acc=result.clean_acc, robust_acc=result.robust_acc,
                       eval_weights=weights)
        if guard is not None:
            guard_metrics, action = guard.check(parts.model, epoch)
            metrics.update(guard_metrics)
        if action not in ("stop", "rollback"):
            is_best, best = result.robust_acc > best, max(best, result.robust_acc)
        selection = {"points": check_label, "metric": f"PGD-{cfg.eval.pgd_steps} robust accuracy",
                     "weights": weights, "on_test_points": check_label.startswith("TEST")}
        note = (f", clean {100 * result.clean_acc:.2f}%, PGD-{cfg.eval.pgd_steps} "
                f"{100 * result.robust_acc:.2f}% on {check_label} ({weights})"
                f"{', best' if is_best else ''}")
    arch, num_classes, config = cfg.model.arch, parts.prior.num_classes, config_to_dict(cfg)
    kwargs = model_kwargs(cfg)
    line = _epoch_line(metrics, note)
    ckpt = run_state(cfg, parts, teacher=teacher, guard=guard, epoch=epoch, step=step, best=best,
                     metrics=metrics, selection=selection, per_rank=per_rank, log_line=line)
    if action in ("stop", "rollback"):  # the guard's state first: a kill after it resumes it
        _keep_guard_best(run_dir, guard, action)
        _log_epoch(log, metrics, step, line, final=action == "stop")
        log.log(guard.message(epoch))
        return best, action
    if guard is not None and guard.state.best_epoch == epoch:   # before last.pt, as side files
        save_checkpoint(run_dir / CO_BEST, ckpt)
    if cfg.train.save_every and epoch % cfg.train.save_every == 0:
        save_checkpoint(run_dir / f"epoch-{epoch:03d}.pt", model_checkpoint(
            parts.model.state_dict(), arch=arch, num_classes=num_classes, arch_kwargs=kwargs,
            epoch=epoch,
            config=config))
    if parts.epoch_avg is not None and parts.epoch_avg.started:
        save_checkpoint(run_dir / "avg.pt", model_checkpoint(
            parts.epoch_avg.module.state_dict(), arch=arch, num_classes=num_classes,
            arch_kwargs=kwargs, epoch=epoch,
            config=config, averaged={"tau": parts.epoch_avg.tau, "start": parts.epoch_avg.start,
                                     "end": epoch}))
    if is_best:
        save_checkpoint(run_dir / "best.pt", {**ckpt, "selected_by": selection})
    save_checkpoint(run_dir / "last.pt", ckpt)
    _log_epoch(log, metrics, step, line, final=epoch == cfg.train.epochs)
    if action == "warn":
        log.log(guard.message(epoch))
    return best, action


def _keep_guard_best(run_dir: Path, guard: COGuard, action: str) -> None:
    """last.pt becomes the state of the epoch the guard rated best (co_best.pt; a run from
    before it keeps its last good epoch's) with the guard's new state; a stop writes the guard's
    new state into best.pt and avg.pt too (their weights stay)."""
    state = guard.state_dict()
    source = run_dir / CO_BEST if (run_dir / CO_BEST).exists() else run_dir / "last.pt"
    kept = load_checkpoint(source, map_location="cpu")
    save_checkpoint(run_dir / "last.pt", {**kept, "co_guard": state})
    for name in ("best.pt", "avg.pt") if action == "stop" else ():
        if (run_dir / name).exists():
            kept = load_checkpoint(run_dir / name, map_location="cpu")
            save_checkpoint(run_dir / name, {**kept, "co_guard": state})


def _epoch_line(metrics: dict[str, Any], note: str) -> str:
    """The train.log line of a finished epoch (kept in last.pt, so a resume can write it)."""
    distortion = metrics.get("co_distortion")
    guard = (f", CO guard PGD (CE and margin) {100 * metrics['co_pgd_acc']:.1f}% FGSM "
             f"{100 * metrics['co_fgsm_acc']:.1f}%" + (
                 "" if distortion is None else f" distortion {100 * distortion:.1f}%")
             if "co_pgd_acc" in metrics else "")
    return (f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}, train "
            f"{100 * metrics['train_acc']:.2f}%{note}{guard}, {metrics['images_per_s']:.0f} img/s")


def _log_epoch(log: RunLog, metrics: dict[str, Any], step: int, line: str, final: bool) -> None:
    """train.log's line first, then the metrics row: a resume finding no row for the epoch of
    last.pt writes both, the line only when train.log lacks it (training.state.restore); then
    the trackers and curves.png (redrawn at the run's `final` epoch, else now and then)."""
    log.log(line)
    log.append_metrics(metrics)
    log.track({f"epoch/{k}": v for k, v in metrics.items()}, step)
    log.plot(final=final)

"""DDP training with 2 gloo processes on the CPU (torchrun), against a single process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_tree, torchrun

from advgkl.checkpoint import load_checkpoint

DEMO = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
# A deterministic attack (CE, no random start), AWP and the class prior on, a global batch of 64.
COMMON = ["train.epochs=2", "train.batch_size=64", "awp.gamma=0.005", "awp.warmup_epochs=1",
          "eval.val_size=64", "attack.objective=ce", "attack.random_start=none"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(out, name, *extra, procs=2):
    args = ["train", str(DEMO), *COMMON, f"run.out_dir={out}", f"run.name={name}", *extra]
    return torchrun(*args) if procs == 2 else [sys.executable, "-m", "advgkl", *args]


def relative_differences(a, b):
    return {k: ((a[k] - b[k]).norm() / a[k].norm()).item() for k in a
            if a[k].is_floating_point() and a[k].norm() > 0}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    # eval.check=none: rank 0 draws nothing at an epoch's end, so the ranks' saved random
    # streams differ only where their seeds do
    for name, procs, extra in (("ddp", 2, []), ("single", 1, []),
                               ("other-seed", 1, ["train.seed=1"])):
        done = subprocess.run(train_cmd(tmp_path, name, "eval.check=none", *extra, procs=procs),
                              capture_output=True, text=True, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
    # Only rank 0 writes: one start line, one row per epoch.
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert log.count(" training ") == 1 and log.count(" epoch ") == 2
    assert len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 3
    # Each epoch the ranks compared their weights and class prior and found them identical
    # (training raises otherwise). Against one process with the same global batch: the ranks'
    # batches together are the single-process batch, but BatchNorm normalizes each rank's 32
    # images on their own instead of 64 together, which changes every step's gradients by a few
    # percent. After 2 epochs (46 steps) we measured 0.3-5.5 % relative differences in the weights
    # (BN running statistics up to 9 %), so the bound is 15 %; a run that differs only in its seed
    # differs by 40 % or more.
    ddp, single, other = (load_checkpoint(tmp_path / n / "last.pt")
                          for n in ("ddp", "single", "other-seed"))
    near = relative_differences(single["model"], ddp["model"])
    far = relative_differences(single["model"], other["model"])
    weights = [k for k in near if k.endswith("weight")]
    assert max(near[k] for k in weights) < 0.15
    assert min(far[k] for k in weights if "features.1" not in k and "features.5" not in k) > 0.4
    assert abs(ddp["metrics"]["loss"] - single["metrics"]["loss"]) < 0.02 * single["metrics"]["loss"]
    assert abs(ddp["metrics"]["train_acc"] - single["metrics"]["train_acc"]) < 0.02
    torch.testing.assert_close(ddp["prior"]["prior"], single["prior"]["prior"], atol=0.01, rtol=0)
    # Each rank has its own random streams (seed + rank): here nothing is drawn while training,
    # so alike seeds would have left both ranks' streams equal
    streams = [r["rng"] for r in ddp["ranks"]]
    assert not torch.equal(streams[0]["torch"], streams[1]["torch"])
    assert not torch.equal(streams[0]["numpy"][1], streams[1]["numpy"][1])


def test_each_rank_s_loader_workers_are_seeded_apart_rank_0_as_one_process():
    from advgkl.config import load_config
    from advgkl.data.train_data import epoch_loader
    from advgkl.distributed import DistInfo

    cfg = load_config(DEMO, ["data.num_workers=2"])
    data = torch.utils.data.TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    seeds = [epoch_loader(cfg, data, 8, DistInfo(rank, world), 3, False).generator.initial_seed()
             for rank, world in ((0, 1), (0, 2), (1, 2))]
    assert seeds[0] == seeds[1] != seeds[2]


@pytest.mark.slow
def test_resume_under_ddp_with_generated_data_augmented_on_the_device(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "g.npz", image=rng.integers(0, 256, (500, 16, 16, 3), dtype=np.uint8),
             label=rng.integers(0, 10, 500))
    generated = [f"data.generated={tmp_path / 'g.npz'}", "data.generated_fraction=0.5",
                 "data.epoch_samples=640", "data.augment=basic", "data.device_augment=true",
                 "attack.random_start=uniform"]  # each rank's crops and starts: its own draws
    whole = subprocess.run(train_cmd(tmp_path, "whole", *generated), capture_output=True,
                           text=True, env=ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(train_cmd(tmp_path, "run", *generated), stdout=subprocess.PIPE,
                            text=True, env=ENV)
    for line in proc.stdout:
        if " epoch 1: " in line:
            kill_tree(proc.pid)  # the launcher and both workers (in sessions of their own)
            break
    proc.wait()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    resumed = subprocess.run(torchrun("train", "--resume", str(tmp_path / "run")),
                             capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 20      # 2 epochs of 640 samples, batch 64
    epochs = [r.split(",")[0] for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    assert epochs[1:] == ["1", "2"]
    uninterrupted = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert all(torch.equal(v, uninterrupted["model"][k]) for k, v in last["model"].items())
    assert last["metrics"]["loss"] == uninterrupted["metrics"]["loss"]


def test_global_batch_must_split_evenly(tmp_path):
    done = subprocess.run(train_cmd(tmp_path, "odd", "train.batch_size=63"), capture_output=True,
                          text=True, env=ENV)
    assert done.returncode != 0
    assert "must divide evenly over 2 processes" in done.stderr


@pytest.mark.slow
def test_distillation_under_ddp_matches_one_process(tmp_path):
    """GKL-KD (teacher attack, teacher class prior all-reduced over the ranks) with a frozen
    teacher that every rank holds unwrapped: 2 gloo processes against one with the same batch."""
    from advgkl.checkpoint import model_checkpoint, save_checkpoint
    from advgkl.models import create_model

    torch.manual_seed(5)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, model_checkpoint(create_model("small-cnn", 10).state_dict(),
                                              arch="small-cnn", num_classes=10))
    extra = ["loss.method=gkl_kd", f"distill.teacher={teacher}", "awp.gamma=0",
             "attack.objective=teacher_kl", "loss.gkl_kd.warmup=1"]
    for name, procs in (("ddp", 2), ("single", 1)):
        done = subprocess.run(train_cmd(tmp_path, name, *extra, procs=procs), capture_output=True,
                              text=True, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, single = (load_checkpoint(tmp_path / n / "last.pt") for n in ("ddp", "single"))
    assert ddp["teacher"] == single["teacher"]
    near = relative_differences(single["model"], ddp["model"])
    assert max(near[k] for k in near if k.endswith("weight")) < 0.15
    loss = single["metrics"]["loss"]
    assert abs(ddp["metrics"]["loss"] - loss) < 0.02 * loss
    # The teacher's class prior depends on the data only: all-reduced, it equals one process's
    # (up to float32 rounding of the teacher's forward on batches of another size).
    torch.testing.assert_close(ddp["prior"]["prior"], single["prior"]["prior"], rtol=1e-4,
                               atol=1e-6)


def test_a_checkpoint_from_another_process_count_resumes_with_a_note(tmp_path):
    """Rank 1 of 2 resuming a one-process run takes rank 0's streams, and train.log says that
    the run is no longer bit-identical."""
    from advgkl.config import load_config
    from advgkl.distributed import DistInfo
    from advgkl.runlog import RunLog
    from advgkl.training.build import build_model
    from advgkl.training.loop import train
    from advgkl.training.state import restore
    from advgkl.training.step import TrainStep

    cfg = load_config(DEMO, ["train.epochs=1", "eval.val_size=64", "train.device=cpu"])
    train(cfg, tmp_path / "run", echo=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["ranks"] is None   # one process: its streams are ckpt["rng"]
    parts = TrainStep(cfg, build_model(cfg.model.arch, 10), 10, torch.device("cpu"))
    torch.manual_seed(123)
    restore(parts, ckpt, RunLog(tmp_path / "run", echo=False), DistInfo(rank=1, world=2))
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])
    assert ("note: the checkpoint was written by 1 process(es), this run has 2: every rank "
            "continues rank 0's random streams") in (tmp_path / "run" / "train.log").read_text()

"""The ImageNet recipes through the commands a user types: every configs/imagenet/*.yaml trains an
epoch on a generated ImageFolder tree with a tiny timm model, from the folder and from its
shards; a SIGKILL inside an epoch and `advgkl train --resume` give the weights of an
uninterrupted run, in one process and with two torchrun agents acting as two nodes (c10d
rendezvous, gloo); bad input stops in one line, exit 2, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, kill_when
from trees import one_line_error

from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "imagenet").glob("*.yaml"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(tree, out, *extra):
    """A recipe's overrides for a tiny run: a tiny timm model at 32 px, batch 8, one epoch."""
    return [f"data.root={tree}", "data.image_size=32", "data.preprocessing=Res36Crop32",
            "data.num_workers=0", "model.arch=timm:test_efficientnet", "model.init=",
            "train.batch_size=8", "train.epochs=1", "train.device=cpu", "eval.val_size=8",
            "eval.batch_size=8", "eval.pgd_steps=1", f"run.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe-shards") / "shards"
    assert main(["data", "shards", str(tree), "--out", str(out), "--shard-size", "16"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_each_recipe_trains_an_epoch_from_the_folder_and_from_shards(config, tree, shards,
                                                                      tmp_path):
    for source in ("folder", "shards"):
        extra = [f"data.shards={shards}"] if source == "shards" else []
        assert main(["train", str(config), *tiny(tree, tmp_path, *extra),
                     f"run.name={source}"]) == 0
        last = load_checkpoint(tmp_path / source / "last.pt")
        assert last["epoch"] == 1 and last["step"] == 5 and last["position"] is None  # 40 images
        assert not (tmp_path / source / "partial.pt").exists()
    folder, from_shards = (load_checkpoint(tmp_path / n / "last.pt") for n in ("folder", "shards"))
    assert all(torch.equal(v, from_shards["model"][k]) for k, v in folder["model"].items())


def _assert_same_state(a, b):
    for part in ("model",):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    assert all(torch.equal(v, b["ema"]["model"][k]) for k, v in a["ema"]["model"].items())
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


# Singh et al.'s recipe with everything that draws random numbers: RandAugment, RandomErasing,
# Mixup/CutMix, loader workers; checkpoints after every step. The kill lands anywhere in epoch 2
# (5 steps each): a third epoch leaves the killer time to act on a loaded machine.
KILLED = ["train.epochs=3", "train.checkpoint_steps=1", "data.num_workers=2"]


def _inside_second_epoch(run: Path) -> bool:
    partial = run / "partial.pt"
    return partial.exists() and load_checkpoint(partial)["epoch"] == 1


def _assert_resumed_inside_epoch_2(run: Path, position: dict) -> None:
    assert (f"resumed from {run / 'partial.pt'} inside epoch 2 (before its batch "
            f"{position['batch'] + 1})") in (run / "train.log").read_text()


@pytest.mark.slow
def test_a_kill_inside_an_epoch_resumes_bit_identically(tree, tmp_path):
    config = str(CONFIGS[[c.stem for c in CONFIGS].index("singh_at_convnext_t_convstem")])
    args = ["train", config, *tiny(tree, tmp_path, *KILLED)]
    assert main([*args, "run.name=whole"]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", *args, "run.name=killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: _inside_second_epoch(run), timeout=300)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1   # the kill landed inside epoch 2
    position = load_checkpoint(run / "partial.pt")["position"]
    assert main(["train", "--resume", str(run)]) == 0
    _assert_resumed_inside_epoch_2(run, position)
    _assert_same_state(load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "whole" /
                                                                         "last.pt"))
    assert not (run / "partial.pt").exists()


def _two_nodes(args: list[str], job: str) -> list[subprocess.Popen]:
    """Two torchrun agents on localhost, one process each, meeting through c10d."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id={job}",
         "-m", "advgkl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        for _ in range(2)]


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_two_local_nodes_train_and_resume_inside_an_epoch_bit_identically(tree, tmp_path):
    config = str(CONFIGS[[c.stem for c in CONFIGS].index("ares_at_convnext_b")])
    args = ["train", config, *tiny(tree, tmp_path, *KILLED)]
    _wait(_two_nodes([*args, "run.name=whole"], "whole"))
    run = tmp_path / "killed"
    agents = _two_nodes([*args, "run.name=killed"], "killed")
    # Both "nodes" at once: each agent, its worker and the worker's loaders.
    kill_when(agents, lambda: _inside_second_epoch(run), timeout=300)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1   # the kill landed inside epoch 2
    position = load_checkpoint(run / "partial.pt")["position"]
    _wait(_two_nodes(["train", "--resume", str(run)], "resume"))
    _assert_resumed_inside_epoch_2(run, position)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    _assert_same_state(load_checkpoint(run / "last.pt"), whole)
    assert whole["step"] == 15   # 40 images: 5 global batches of 8 (4 per node) per epoch


@pytest.mark.parametrize("override,message", [
    (["train.accumulate=3"], "train.accumulate: 3 micro-batches do not divide"),
    (["model.init=models/missing_clean.pt"], "missing_clean.pt"),
    (["loss.method=mart", "awp.gamma=0"], "method mart needs hard labels"),
    (["data.mixup=0", "data.cutmix=0"], "data.smoothing: smooths Mixup/CutMix"),
])
def test_bad_recipe_input_stops_in_one_line_and_writes_nothing(override, message, tree, tmp_path,
                                                               capsys):
    config = str(CONFIGS[[c.stem for c in CONFIGS].index("singh_at_convnext_t_convstem")])
    args = tiny(tree, tmp_path)
    if override[0].startswith("model.init"):
        args = [a for a in args if not a.startswith("model.init")]
    capsys.readouterr()
    assert main(["train", config, *args, *override, "run.name=bad"]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "bad").exists()

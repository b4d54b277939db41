"""The training loop: schedules, EMA, every shipped config, exact resume, refusals, NaN stop."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trees import imagenet_tree

import advgkl.data.train_data as train_data
import advgkl.training.loop as train_mod
from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint, sha256_file
from advgkl.config import load_config
from advgkl.config.methods import METHODS
from advgkl.data.folders import FOLDER_DATASETS
from advgkl.data.tensors import NUM_CLASSES, Split, carve_validation
from advgkl.errors import UserError
from advgkl.methods.objectives import Objective
from advgkl.models import create_model
from advgkl.runlog import read_metrics
from advgkl.training.build import build_attack
from advgkl.training.ema import WeightEMA
from advgkl.training.loop import TrainingError, train
from advgkl.training.schedules import learning_rate

ROOT = Path(__file__).parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"


def test_paper_cosine_schedule():
    lr = [learning_rate("cosine", e, 200, 0, 1, lr=0.2, warmup=0, milestones=[])
          for e in (1, 100, 200)]
    assert lr == [0.2 * 0.5 * (1 + math.cos(math.pi * e / 201)) for e in (1, 100, 200)]
    assert learning_rate("cosine", 2, 200, 1, 2, lr=0.2, warmup=5, milestones=[]) == 0.2 * 2 / 5


def test_piecewise_and_cosinew_schedules():
    piece = [learning_rate("piecewise", e, 200, 0, 1, lr=0.1, warmup=0, milestones=[100, 150])
             for e in (99, 100, 149, 150)]
    assert piece == pytest.approx([0.1, 0.01, 0.01, 0.001])
    mart = [learning_rate("piecewise", e, 90, 0, 1, lr=0.1, warmup=0, milestones=[75, 90])
            for e in (74, 75, 89, 90)]           # a milestone at the last epoch: MART's script
    assert mart == pytest.approx([0.1, 0.01, 0.01, 0.001])
    lbgat = [learning_rate("piecewise", e, 100, 0, 1, lr=0.1, warmup=0, milestones=[76, 91],
                           first=[0.02]) for e in (1, 2, 76, 91)]   # LBGAT's epoch-1 lr
    assert lbgat == pytest.approx([0.02, 0.1, 0.01, 0.001])
    assert learning_rate("cosinew", 1, 10, 1, 2, lr=0.2, warmup=1, milestones=[]) == 0.1
    assert learning_rate("cosinew", 10, 10, 1, 1, lr=0.2, warmup=1,
                         milestones=[]) == pytest.approx(0)


def test_ema_follows_the_papers_semantics():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = WeightEMA(model, tau=0.5, start_epoch=2)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model, epoch=1)               # before the start: untouched copy of the initial model
    assert not ema.started
    ema.update(model, epoch=2)               # start epoch: follows the weights
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model, epoch=3)               # afterwards: 0.5 * 4 + 0.5 * 0
    assert torch.equal(ema.module.weight, torch.full((1, 2), 2.0))


def test_ema_warmup_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = WeightEMA(model, tau=0.995, start_epoch=0, warmup=True)
    ema.update(model, 1)                     # first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model, 1)                     # decay min(0.995, 1/10) = 0.1
    assert ema.module.weight.item() == pytest.approx(0.9)


def fake_load_split(dataset, *, train, root="data", download=False):
    n, classes = 16, NUM_CLASSES[dataset]
    g = torch.Generator().manual_seed(int(train))
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(n) % classes)


def tiny_overrides(cfg):
    tiny = "wrn-10-1-swish" if cfg.model.arch.endswith("swish") else "wrn-10-1"
    natural = ["loss.natural_arch=wrn-10-1"] if cfg.loss.method == "lbgat" else []
    return [f"model.arch={tiny}", *natural, "train.epochs=1", "train.batch_size=8",
            "train.lr_milestones=[]", "train.ema_start_epoch=1", "awp.warmup_epochs=1",
            "eval.val_size=4", "data.num_workers=0", "train.device=cpu"]


def tiny_teacher(path, classes):
    """An advgkl checkpoint standing in for a config's RobustBench teacher (no download here)."""
    save_checkpoint(path, model_checkpoint(create_model("wrn-10-1", classes).state_dict(),
                                           arch="wrn-10-1", num_classes=classes))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_trains_on_a_tiny_model(path, tmp_path, monkeypatch):
    assert path.read_text().startswith("#") and "advgkl train" in path.read_text().split("\n")[1]
    monkeypatch.setattr(train_data, "load_split", fake_load_split)
    cfg = load_config(path)
    overrides = tiny_overrides(cfg)
    if cfg.data.dataset in FOLDER_DATASETS:   # a generated ImageNet tree, a tiny timm model
        imagenet_tree(tmp_path / "tree", n_val=8, per_class=3)  # 8 classes: 24 images
        init = tmp_path / "init.pt"
        save_checkpoint(init, model_checkpoint(
            create_model("timm:test_efficientnet", 1000).state_dict(),
            arch="timm:test_efficientnet", num_classes=1000))
        overrides += [f"data.root={tmp_path / 'tree'}", "data.image_size=32",
                      "data.preprocessing=Res36Crop32", "model.arch=timm:test_efficientnet",
                      f"model.init={init}", "eval.val_size=8"]  # 16 left to train on
    if cfg.distill.teacher:
        teacher = tiny_teacher(tmp_path / "teacher.pt", NUM_CLASSES[cfg.data.dataset])
        overrides.append(f"distill.teacher={teacher}")
    if cfg.data.generated:  # a small generated file in the configured format, 32 samples/epoch
        np.savez(tmp_path / "generated.npz",
                 image=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
                 label=np.arange(40) % NUM_CLASSES[cfg.data.dataset])
        overrides += [f"data.generated={tmp_path / 'generated.npz'}", "data.epoch_samples=16"]
    cfg = load_config(path, overrides)
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert math.isfinite(metrics["loss"]) and metrics["epoch"] == 1
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 2  # 16 images in batches of 8
    assert ckpt["ema"]["started"]
    for name in ("config.yaml", "metrics.csv", "curves.png", "train.log"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "best.pt").is_file() == (cfg.eval.check != "none")
    assert (tmp_path / "run" / "avg.pt").is_file() == (cfg.train.epoch_avg_tau > 0)
    assert cfg.eval.check != "test"  # no shipped config selects on test points
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert ckpt["teacher"] == (None if not cfg.distill.teacher else
                               {"source": str(teacher.resolve()), "sha256": sha256_file(teacher),
                                "weights": "model", "arch": "wrn-10-1"})


def test_second_train_into_a_run_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train_data, "load_split", fake_load_split)
    cfg = load_config(DEMO, ["train.epochs=1", "eval.val_size=4"])
    train(cfg, tmp_path / "run", echo=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already exists; resume it with --resume"):
        train(cfg, tmp_path / "run", echo=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_data, "load_split", fake_load_split)
    cfg = load_config(DEMO, ["train.epochs=3", "train.batch_size=8", "eval.val_size=4"])
    real_call, calls = Objective.__call__, []

    def poisoned(self, *args):
        out = real_call(self, *args)
        calls.append(1)
        if len(calls) == 3:  # epoch 2 (two steps per epoch), step 1
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(Objective, "__call__", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss \\(nan\\) at epoch 2, step 1; .*last.pt "
                                            "holds the last good state"):
        train(cfg, tmp_path / "run", echo=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "advgkl", *args], capture_output=True, text=True,
                          **kw)


def test_resume_arguments_are_checked(tmp_path):
    out = run_cli("train", "--resume", str(tmp_path))
    assert out.returncode == 2 and "no config.yaml); nothing to resume" in out.stderr
    out = run_cli("train", str(DEMO), "--resume", str(tmp_path))
    assert out.returncode == 2 and "pass no CONFIG or overrides" in out.stderr
    out = run_cli("train")
    assert out.returncode == 2 and "give a CONFIG file, or --resume RUN_DIR" in out.stderr


RESUME_OVERRIDES = ["train.epochs=3", "train.ema_start_epoch=2", "attack.steps=2",
                    "eval.val_size=64", "eval.pgd_steps=2", "run.out_dir={out}",
                    "train.epoch_avg_tau=0.9", "train.epoch_avg_start=2"]


@pytest.mark.slow
def test_sigkill_at_an_epoch_boundary_then_resume_is_bit_identical(tmp_path):
    overrides = [o.format(out=tmp_path) for o in RESUME_OVERRIDES]
    full = run_cli("train", str(DEMO), *overrides, "run.name=full")
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "train", str(DEMO), *overrides,
                             "run.name=killed"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if " epoch 1: " in line:  # epoch 1 is saved and logged: kill at the boundary
            proc.kill()
            break
    proc.wait()
    killed = tmp_path / "killed"
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1
    log_before = (killed / "train.log").read_text()
    resumed = run_cli("train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(killed / "last.pt")
    for part in ("model",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert torch.equal(a["prior"]["prior"], b["prior"]["prior"])
    assert b["epoch_avg"]["epochs"] == [2, 3]
    averages = a["epoch_avg"]["model"].items()
    assert all(torch.equal(v, b["epoch_avg"]["model"][k]) for k, v in averages)
    assert all(torch.equal(v, b["epoch_avg"]["model"][k])
               for k, v in load_checkpoint(killed / "avg.pt")["model"].items())
    assert (killed / "train.log").read_text().startswith(log_before)  # nothing lost
    epochs = [line.split(",")[0] for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]


@pytest.mark.slow
def test_demo_learns_robustness_that_plain_training_lacks(tmp_path, demo_run):
    """Same budget on the embedded digits: GKL vs plain CE training (no attack)."""
    gkl = {k: float(v) for k, v in read_metrics(demo_run)[-1].items()
           if k in ("clean_acc", "robust_acc")}
    plain_cfg = load_config(DEMO, ["loss.method=pgd_at", "attack.steps=0",
                                   "attack.random_start=none"])
    plain = train(plain_cfg, tmp_path / "plain", echo=False)
    print(f"GKL clean {gkl['clean_acc']:.4f} PGD {gkl['robust_acc']:.4f}; "
          f"plain clean {plain['clean_acc']:.4f} PGD {plain['robust_acc']:.4f}")
    assert gkl["clean_acc"] > 0.85
    assert gkl["robust_acc"] > plain["robust_acc"] + 0.30


@pytest.mark.parametrize("exempt", [False, True])
def test_optimizer_weight_decay_groups(exempt):
    from advgkl.training.step import build_optimizer

    model = create_model("small-cnn", 10)
    cfg = load_config(DEMO, [f"train.no_decay_bn_bias={str(exempt).lower()}",
                             "train.weight_decay=0.01", "train.nesterov=true"])
    groups = build_optimizer(model, cfg).param_groups
    decayed = [p for g in groups if g["weight_decay"] == 0.01 for p in g["params"]]
    exempted = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert len(decayed) + len(exempted) == len(list(model.parameters()))
    assert all(g["nesterov"] for g in groups)
    if exempt:
        assert exempted and all(p.dim() <= 1 for p in exempted)
        assert all(p.dim() > 1 for p in decayed)
    else:
        assert not exempted


def test_cuda_options_are_ignored_with_a_message_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(train_data, "load_split", fake_load_split)
    cfg = load_config(DEMO, ["train.epochs=1", "eval.val_size=4", "train.precision=bf16",
                             "train.attack_precision=bf16", "train.channels_last=true",
                             "train.compile=true"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert math.isfinite(metrics["loss"])
    log = (tmp_path / "run" / "train.log").read_text()
    for name in ("precision", "attack_precision", "channels_last", "compile"):
        assert f"train.{name} is a CUDA option; ignored on cpu" in log


@pytest.mark.parametrize("overrides, message", [
    (["data.device_augment=true", "data.augment=autoaugment"], "data.device_augment"),
    (["data.device_augment=true", "data.two_view=true"], "data.device_augment"),
    (["data.generated_fraction=0.7"], "need data.generated"),
    (["data.generated=missing.npz", "data.generated_fraction=0.7"], "missing.npz"),
])
def test_data_options_that_cannot_work_are_refused(tmp_path, overrides, message):
    cfg = load_config(DEMO, ["data.num_workers=0", *overrides])
    with pytest.raises(UserError, match=message):
        train(cfg, tmp_path / "run", echo=False)
    assert not (tmp_path / "run").exists()


def crash_after_epoch_1(cfg, run_dir, monkeypatch):
    """Train `cfg` into `run_dir` and crash it right after epoch 1's last.pt and metrics row."""
    def crash(self, **kwargs):  # RunLog.plot(self, *, final=False)
        raise RuntimeError("crash")

    monkeypatch.setattr(train_mod.RunLog, "plot", crash)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, run_dir, echo=False)
    monkeypatch.undo()


def crash_after_epoch_1_and_resume(cfg, tmp_path, monkeypatch):
    """Train `cfg` into tmp_path/cut, crash it right after epoch 1's last.pt and metrics row,
    resume it; returns the last.pt of tmp_path/full (trained before) and of the resumed run."""
    crash_after_epoch_1(cfg, tmp_path / "cut", monkeypatch)
    train(cfg, tmp_path / "cut", resume=True, echo=False)
    return tuple(load_checkpoint(tmp_path / r / "last.pt") for r in ("full", "cut"))


def test_generated_images_and_device_augmentation_train_and_resume_exactly(tmp_path, monkeypatch):
    """Digits plus a generated file (70 % per batch), augmented on the device: the run trains,
    and resuming after a crash at the end of epoch 1 reproduces the uninterrupted run exactly."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "g.npz", image=rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8),
             label=rng.integers(0, 10, 300))
    overrides = ["data.num_workers=0", "model.arch=small-cnn", "eval.val_size=32",
                 "train.epochs=2", "train.batch_size=50", f"data.generated={tmp_path / 'g.npz'}",
                 "data.generated_fraction=0.7", "data.epoch_samples=100",
                 "data.augment=basic", "data.device_augment=true"]
    cfg = load_config(DEMO, overrides)
    train(cfg, tmp_path / "full", echo=False)
    log = (tmp_path / "full" / "train.log").read_text()
    assert "1405 real + 300 generated images" in log and "70% generated per batch" in log
    assert load_checkpoint(tmp_path / "full" / "last.pt")["step"] == 4   # 2 epochs x 2 batches

    full, cut = crash_after_epoch_1_and_resume(cfg, tmp_path, monkeypatch)
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_build_attack_gives_the_authors_attack_per_dataset(path):
    """CIFAR-100 GKL/IKL configs attack with sCE + prior-weighted wMSE (1, 1, 1), the CIFAR-10
    ones with KL; every other config with its method's own attack; the ramped budget of the
    paper's schedule."""
    cfg = load_config(path)
    attack = build_attack(cfg, 1)
    if cfg.data.dataset == "cifar100" and cfg.loss.method in ("gkl", "ikl"):
        assert (attack.objective, attack.alpha, attack.beta, attack.gamma) == ("gkl", 1, 1, 1)
    else:
        assert attack.objective == METHODS[cfg.loss.method].attack
    assert attack.random_start == cfg.attack.random_start
    if cfg.attack.schedule == "paper_effective":
        last = build_attack(cfg, cfg.train.epochs)
        assert (last.eps, last.step_size, last.steps) == (8 / 255, 4 / 255, 5)
        assert attack.eps == pytest.approx(8 / 255 / cfg.train.epochs)


def test_validation_split_is_carved_from_training_data_and_fixed_by_the_seed():
    split = Split(torch.arange(100).view(100, 1, 1, 1).to(torch.uint8), torch.arange(100) % 10)
    rest, val = carve_validation(split, 20, seed=3)
    ids_rest, ids_val = set(rest.images.flatten().tolist()), set(val.images.flatten().tolist())
    assert len(ids_val) == 20 and ids_rest.isdisjoint(ids_val)
    assert ids_rest | ids_val == set(range(100))
    assert torch.equal(carve_validation(split, 20, seed=3)[1].images, val.images)
    assert not torch.equal(carve_validation(split, 20, seed=4)[1].images, val.images)
    assert torch.equal(val.labels, val.images.flatten().long() % 10)  # labels travel with images


def test_the_per_epoch_check_never_touches_the_test_set(tmp_path, monkeypatch):
    real_load = train_data.load_split

    def no_test(dataset, *, train, **kw):
        assert train, "the trainer loaded the test split"
        return real_load(dataset, train=train, **kw)

    monkeypatch.setattr(train_data, "load_split", no_test)
    cfg = load_config(DEMO, ["train.epochs=1", "attack.steps=1", "eval.pgd_steps=1",
                             "eval.val_size=100"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert metrics["check_points"] == "val-100"
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["selected_by"]["points"] == "val-100"
    assert not best["selected_by"]["on_test_points"]
    assert "val-100" in (tmp_path / "run" / "metrics.csv").read_text()


@pytest.mark.parametrize("method", ["mart", "lbgat"])
def test_mart_and_lbgat_train_on_the_digits_and_resume_exactly(method, tmp_path, monkeypatch):
    """Both methods train the demo data end to end (with label smoothing); LBGAT's natural model
    is checkpointed and resumed with the robust one, bit-exactly."""
    overrides = ["train.epochs=2", "attack.steps=2", "eval.pgd_steps=1", "eval.val_size=64",
                 f"loss.method={method}", "loss.label_smoothing=0.1",
                 *(["loss.natural_arch=small-cnn"] if method == "lbgat" else [])]
    cfg = load_config(DEMO, overrides)
    metrics = train(cfg, tmp_path / "full", echo=False)
    assert math.isfinite(metrics["loss"]) and metrics["clean_acc"] > 0.2

    full, cut = crash_after_epoch_1_and_resume(cfg, tmp_path, monkeypatch)
    parts = ["model"] + (["natural"] if method == "lbgat" else [])
    for part in parts:
        state = full[part] if part == "model" else full[part]["model"]
        other = cut[part] if part == "model" else cut[part]["model"]
        assert all(torch.equal(v, other[k]) for k, v in state.items()), part
    assert (full["natural"] is None) == (method != "lbgat")


LEGACY_LOSS = {"method": "mart", "alpha": 4.0, "beta": 6.0, "gamma": 1.0, "temperature": 1.0,
               "prior_temperature": 4.0, "prior_momentum": 1.0, "prior_update": "epoch",
               "label_smoothing": 0.0, "natural_arch": "preact-resnet-18"}


def test_a_run_folder_from_before_method_sections_resumes_and_evaluates(tmp_path, monkeypatch):
    """A MART run whose config.yaml and last.pt hold the previous version's flat loss keys (every
    key, for every method): `advgkl train --resume` continues it with the loss form it trained
    with, and `advgkl eval` scores it."""
    import json

    import yaml

    from advgkl.cli import main

    cfg = load_config(DEMO, ["train.epochs=2", "attack.steps=1", "eval.pgd_steps=1",
                             "eval.val_size=64", "loss.method=mart", "loss.mart.form=exact"])
    run = tmp_path / "old"
    crash_after_epoch_1(cfg, run, monkeypatch)
    legacy = yaml.safe_load((run / "config.yaml").read_text())
    legacy["loss"] = dict(LEGACY_LOSS)
    legacy["attack"].update(alpha=1.0, beta=1.0, gamma=1.0)
    (run / "config.yaml").write_text(yaml.safe_dump(legacy))
    ckpt = load_checkpoint(run / "last.pt")
    save_checkpoint(run / "last.pt", {**ckpt, "config": legacy})

    assert main(["train", "--resume", str(run)]) == 0
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2
    assert resumed["config"]["loss"] == {"method": "mart", "mart": {
        "beta": 6.0, "form": "exact", "label_smoothing": 0.0}}
    assert main(["eval", str(run / "last.pt"), "--quick", "pgd-1", "--n-examples", "10",
                 "--out", str(tmp_path / "res")]) == 0
    record = json.loads((tmp_path / "res" / "digits" / "Linf" / "old.pgd-1.json").read_text())
    assert "NOT the authors' form" in record["training"]["method"]

"""Distillation through the command a user types: a run from an advgkl teacher and from a
RobustBench zoo entry (registered offline as RobustBench registers its zoo) trains, evaluates and
exports the student only; a SIGKILL then --resume ends bit-identical; a changed teacher file stops
the resume; bad input is one line, exit 2, and no run folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import advgkl.data.train_data as train_data
from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint, sha256_file
from advgkl.cli import main
from advgkl.compat import import_robustbench
from advgkl.config import load_config
from advgkl.data.tensors import Split
from advgkl.models import create_model
from advgkl.training.loop import train

robustbench = import_robustbench()
from robustbench.model_zoo.architectures.wide_resnet import WideResNet  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402
from robustbench.utils import all_models  # noqa: E402

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"
SHORT = ["train.epochs=2", "attack.steps=2", "eval.pgd_steps=1", "eval.val_size=64"]
ENTRY = "Advgkl2026TinyTeacher"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "advgkl", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A WRN-10-1 trained on the digits for 2 epochs: an advgkl checkpoint."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(DEMO, [*SHORT, "model.arch=wrn-10-1"]), run, echo=False)
    return run / "last.pt"


def distill_args(out, name, teacher, method="rslad", *extra):
    return ["train", DEMO, *SHORT, f"loss.method={method}", f"distill.teacher={teacher}",
            "model.arch=wrn-10-1", f"run.out_dir={out}", f"run.name={name}", *extra]


@pytest.mark.slow
def test_student_from_an_advgkl_teacher_trains_evaluates_and_exports_alone(teacher, tmp_path):
    out = cli(*distill_args(tmp_path, "student", teacher))
    assert out.returncode == 0, out.stderr
    run = tmp_path / "student"
    ckpt = load_checkpoint(run / "last.pt")
    student_keys = set(create_model("wrn-10-1", 10).state_dict())
    assert set(ckpt["model"]) == student_keys and set(ckpt["ema"]["model"]) == student_keys
    assert ckpt["teacher"]["sha256"] == sha256_file(teacher)
    assert ckpt["teacher"]["source"] == str(teacher.resolve())
    saved = load_config(run / "config.yaml")
    assert saved.distill.teacher_sha256 == sha256_file(teacher)
    assert f"teacher: {teacher.resolve()}" in (run / "train.log").read_text()
    n_student = sum(p.numel() for p in create_model("wrn-10-1", 10).parameters())
    assert sum(v["momentum_buffer"].numel() for v in ckpt["optimizer"]["state"].values()) == \
        n_student                                    # the optimizer holds the student only

    res = tmp_path / "res"
    out = cli("eval", run / "last.pt", "--n-examples", "20", "--batch-size", "20", "--eps",
              "32/255", "--out", res)
    assert out.returncode == 0, out.stderr
    record = json.loads((res / "digits" / "Linf" / "student.detailed.json").read_text())
    assert record["architecture"] == "wrn-10-1"
    assert record["training"]["teacher"]["sha256"] == sha256_file(teacher)
    assert record["training"]["method"].startswith("RSLAD (Zi et al. 2021)")
    out = cli("export", run / "last.pt", "--eval", res / "digits" / "Linf" / "student.json",
              "--out", tmp_path / "bundle", "--allow-partial")
    assert out.returncode == 0, out.stderr
    exported = torch.load(tmp_path / "bundle" / "student.pt", weights_only=True)
    assert set(exported) == student_keys            # the student's weights, nothing else


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_and_a_changed_teacher_stops_it(teacher, tmp_path):
    copy = tmp_path / "teacher-copy.pt"   # the same teacher, in a file this test may change
    copy.write_bytes(teacher.read_bytes())
    args = distill_args(tmp_path, "full", copy, "adaad", "train.epochs=3")
    assert cli(*args).returncode == 0
    killed = distill_args(tmp_path, "killed", copy, "adaad", "train.epochs=3")
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", *map(str, killed)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if " epoch 1: " in line:
            proc.kill()
            break
    proc.wait()
    run = tmp_path / "killed"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    out = cli("train", "--resume", run)
    assert out.returncode == 0, out.stderr
    full, resumed = (load_checkpoint(tmp_path / n / "last.pt") for n in ("full", "killed"))
    assert all(torch.equal(v, resumed["model"][k]) for k, v in full["model"].items())
    assert all(torch.equal(v, resumed["ema"]["model"][k]) for k, v in full["ema"]["model"].items())

    # The teacher file changes: a resume of a run that distilled it is refused, nothing written.
    ckpt = load_checkpoint(copy)
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    save_checkpoint(copy, ckpt)
    pinned = tmp_path / "full"
    log_before = (pinned / "train.log").read_text()
    out = cli("train", "--resume", pinned)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "has changed since the run started" in out.stderr
    assert (pinned / "train.log").read_text() == log_before


def foreign_checkpoint(path, classes=10, dataset="digits"):
    model = create_model("small-cnn", classes)
    save_checkpoint(path, model_checkpoint(model.state_dict(), arch="small-cnn",
                                           num_classes=classes,
                                           config={"data": {"dataset": dataset}}))
    return path


@pytest.mark.parametrize("make, extra, fragment", [
    (None, ["distill.teacher="], "distill.teacher: method rslad distils a teacher"),
    ("plain", ["loss.method=gkl"], "distill.teacher: method gkl trains without a teacher"),
    ("missing", [], "missing.pt: checkpoint not found"),
    ("garbage", [], "corrupt or truncated checkpoint"),
    ("classes", [], "has 100 classes; digits has 10"),
    ("dataset", [], "was trained on cifar10; this run trains on digits"),
    ("zoo-digits", [], "is a cifar10 model; this run trains on digits"),
    ("zoo-bad", [], "expected robustbench:<dataset>/<threat>/<name>"),
])
def test_bad_teachers_are_one_line_exit_2_and_no_folder(make, extra, fragment, tmp_path,
                                                        capsys):
    teachers = {"plain": foreign_checkpoint(tmp_path / "t.pt"), None: "x",
                "missing": tmp_path / "missing.pt",
                "classes": foreign_checkpoint(tmp_path / "c.pt", classes=100),
                "dataset": foreign_checkpoint(tmp_path / "d.pt", dataset="cifar10"),
                "zoo-digits": "robustbench:cifar10/Linf/Zhang2019Theoretically",
                "zoo-bad": "robustbench:Zhang2019Theoretically"}
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    teachers["garbage"] = garbage
    code = main([str(a) for a in distill_args(tmp_path / "runs", "r", teachers[make], "rslad",
                                              *extra)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "runs").exists()


# ---- a RobustBench zoo entry as the teacher (CIFAR-10, offline) -------------------------------

def fake_cifar10(dataset, *, train, root="data", download=False):
    g = torch.Generator().manual_seed(int(train))
    n = 96 if train else 40
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(n) % 10)


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """ENTRY registered as RobustBench registers its zoo (its own WideResNet class), its weights
    placed in MODEL_DIR beforehand; CIFAR-10 replaced by random images (no download here)."""
    entries = all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(entries, ENTRY, {"model": lambda: WideResNet(depth=10, widen_factor=1),
                                         "gdrive_id": "placed-beforehand"})
    weights = tmp_path / "models" / "cifar10" / "Linf" / f"{ENTRY}.pt"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(WideResNet(depth=10, widen_factor=1).state_dict(), weights)
    monkeypatch.setattr(train_data, "load_split", fake_cifar10)
    return weights


def zoo_args(tmp_path, entry=ENTRY, *extra):
    return ["train", ROOT / "configs" / "cifar10" / "trades_wrn34_10.yaml", "loss.method=ard",
            f"distill.teacher=robustbench:cifar10/Linf/{entry}",
            f"distill.model_dir={tmp_path / 'models'}", "model.arch=wrn-10-1", "train.epochs=1",
            "train.batch_size=32", "attack.steps=1", "eval.val_size=32", "eval.pgd_steps=1",
            "data.num_workers=0", "train.device=cpu", "train.lr_milestones=[]",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.name=zoo", *extra]


def test_student_from_a_zoo_entry(zoo, tmp_path):
    assert main([str(a) for a in zoo_args(tmp_path)]) == 0
    ckpt = load_checkpoint(tmp_path / "runs" / "zoo" / "last.pt")
    assert ckpt["teacher"]["source"] == f"robustbench:cifar10/Linf/{ENTRY}"
    assert ckpt["teacher"]["sha256"] == sha256_file(zoo)
    assert ckpt["arch"] == "wrn-10-1" and ckpt["config"]["loss"]["method"] == "ard"


@pytest.mark.parametrize("entry, remove, fragment", [
    ("NoSuchEntry2026", False, "no such entry in RobustBench's cifar10 Linf zoo"),
    (ENTRY, True, "no weights at"),
])
def test_unknown_or_absent_zoo_teachers_are_refused(zoo, tmp_path, capsys, monkeypatch, entry,
                                                    remove, fragment):
    if remove:
        zoo.unlink()
        import robustbench.utils

        def offline(*args, **kwargs):
            raise OSError("no network")
        monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline, raising=False)
        monkeypatch.setattr(robustbench.utils, "download_gdrive", offline, raising=False)
    code = main([str(a) for a in zoo_args(tmp_path, entry)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "runs").exists()

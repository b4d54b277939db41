"""Nothing half-made on failure: bad input is refused before any file is written, a command that
fails leaves nothing that blocks its corrected rerun, and the two promised resumes work after a
real SIGKILL (training before its first checkpoint; AutoAttack with --state)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_when

from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main
from advgkl.config import load_config
from advgkl.training.loop import train

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"
SHORT = ["train.epochs=2", "attack.steps=2", "eval.pgd_steps=2", "eval.val_size=64"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "advgkl", *map(str, args)], capture_output=True,
                          text=True)


def assert_one_line_error(code, err, fragment):
    assert code == 2, err
    assert err.startswith("advgkl: error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits model trained for 2 epochs, with an epoch average and per-epoch files."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_config(DEMO, [*SHORT, "train.epoch_avg_tau=0.9", "train.save_every=1"]), run,
          echo=False)
    return run


# One test per class of mistake, through the CLI entry point (in-process: fast); each must leave
# no file behind in the working folder.
MISTAKES = [
    (["train", DEMO, "model.arch=resnet50"], "model.arch: unknown model 'resnet50'"),
    (["train", DEMO, "model.arch=wrn-9-1"], "model.arch: depth: 9"),
    (["train", DEMO, "eval.val_size=5000"], "eval.val_size: 5000 leaves no training images"),
    (["train", DEMO, "eval.check=holdout"], "eval.check: 'holdout' is not one of"),
    (["train", DEMO, "attack.objective=trades"], "attack.objective: 'trades' is not one of"),
    (["train", DEMO, "train.epoch_avg_tau=1.5"], "train.epoch_avg_tau: 1.5 must be < 1"),
    (["train", DEMO, "data.dataset=cifar10"], "cifar10: no data set in"),
    (["train", "--resume", "missing-run"], "not a run folder"),
    (["train", DEMO, "run.name=../../escaped"], "run.name: '../../escaped' must be a plain name"),
    (["eval", "{ckpt}", "--model-name", "../../escaped", "--n-examples", "10"],
     "--model-name: '../../escaped' must be a plain name"),
    (["eval-merge", "missing.json", "--model-name", ".."], "--model-name: '..' must be a plain"),
    (["export", "{ckpt}", "--eval", "...json", "--out", "sub"], "'..' must be a plain name"),
    (["train", DEMO, "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "missing.pt"], "missing.pt: checkpoint not found"),
    (["eval", "{ckpt}", "--n-examples", "0"], "--n-examples and --batch-size must be at least 1"),
    (["eval", "{ckpt}", "--quick", "pgd"], "--quick 'pgd': expected pgd-K"),
    (["eval", "{ckpt}", "--version", "custom"], "version custom needs a list of attacks"),
    (["eval", "{ckpt}", "--eps", "8"], "did you mean 8/255?"),
    (["eval", "{ckpt}", "--n-examples", "5000"], "more than the 360 test images"),
    (["eval", "{epoch1}", "--weights", "avg", "--n-examples", "10"], "has no epoch average"),
    (["eval", "{ckpt}", "--device", "gpu7", "--n-examples", "10"], "--device 'gpu7'"),
    (["eval", "{ckpt}", "--shard", "2/2"], "--shard '2/2': I must be in 0..N-1"),
    (["eval", "{ckpt}", "--weights", "best"], "argument --weights: invalid choice"),
    (["eval", "{ckpt}", "--compare-with", "missing.json", "--n-examples", "10"],
     "missing.json: no such file"),
    (["eval", "{ckpt}", "--precision", "bf16", "--quick", "pgd-2"], "not with --quick"),
    (["eval-merge", "missing.json"], "missing.json: no such file"),
    (["eval-merge", DEMO], "not a JSON record of advgkl eval"),
    (["export", "{ckpt}", "--eval", "missing.json", "--out", "sub"], "missing.json: needs"),
    (["data", "convert", "missing.npz", "out"], "missing.npz: not a readable .npz file"),
    (["import-checkpoint", "{ckpt}", "--arch", "nope", "--num-classes", "10", "--out", "x.pt"],
     "unknown model 'nope'"),
    (["import-checkpoint", "{ckpt}", "--arch", "small-cnn", "--num-classes", "100", "--out",
      "x.pt"], "a different number of classes"),
    (["average", "{run}", "--tau", "1.5", "--out", "a.pt"], "--tau: 1.5 must be between 0 and 1"),
    (["average", "{run}", "--start", "3", "--out", "a.pt"], "need 1 <= start <= end"),
    (["average", "missing-run", "--out", "a.pt"], "missing-run: no such run folder"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args, fragment", MISTAKES, ids=lambda v: " ".join(map(str, v))[:60]
                         if isinstance(v, list) else None)
def test_each_mistake_is_one_line_exit_2_and_writes_nothing(args, fragment, checkpoint, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = {"ckpt": checkpoint / "last.pt", "epoch1": checkpoint / "epoch-001.pt",
             "run": checkpoint}
    args = [str(a).format(**names) for a in args]
    if args[0] == "train" and "--resume" not in args:
        args += ["run.out_dir=checkpoints"]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_that_fails_before_its_first_checkpoint_removes_its_folder(tmp_path):
    """A non-finite loss in epoch 1 (lr 1e30): one line, exit 2, no run folder; the corrected
    command then runs under the same name."""
    args = ["train", DEMO, *SHORT, f"run.out_dir={tmp_path}", "run.name=r"]
    out = cli(*args, "train.lr=1e30")
    assert_one_line_error(out.returncode, out.stderr, "non-finite loss")
    assert "no checkpoint was written" in out.stderr
    assert not (tmp_path / "r").exists()
    out = cli(*args, "train.epochs=1")
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_training_killed_before_its_first_checkpoint_resumes_from_epoch_1(tmp_path):
    args = [*SHORT, f"run.out_dir={tmp_path}", "train.epoch_avg_tau=0.9"]
    assert cli("train", DEMO, *args, "run.name=full").returncode == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "train", str(DEMO), *args,
                             "run.name=killed"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: (run / "train.log").exists())
    assert not (run / "last.pt").exists()            # killed before the first checkpoint

    out = cli("train", DEMO, *args, "run.name=killed")  # a fresh start is refused, with the way out
    assert_one_line_error(out.returncode, out.stderr, "has no checkpoint yet: --resume starts it")
    out = cli("train", "--resume", run)
    assert out.returncode == 0, out.stderr
    assert "starting at epoch 1 with its saved config" in (run / "train.log").read_text()
    full, resumed = (load_checkpoint(tmp_path / r / "last.pt") for r in ("full", "killed"))
    assert resumed["epoch"] == 2
    for part in ("model",):
        assert all(torch.equal(v, resumed[part][k]) for k, v in full[part].items())
    assert all(torch.equal(v, resumed["epoch_avg"]["model"][k])
               for k, v in full["epoch_avg"]["model"].items())


@pytest.mark.slow
def test_a_resume_writes_the_epoch_line_and_row_that_a_kill_left_unwritten(tmp_path):
    """After an epoch, last.pt comes first, then train.log's line, then the metrics row. A run is
    SIGKILLed after epoch 1; from its folder two states are made by hand, the moments a kill
    can hit that no test can time: right after last.pt (neither line nor row written) and
    between the line and the row. `advgkl train --resume` then writes what is missing, once."""
    args = [*SHORT, f"run.out_dir={tmp_path}", "run.name=killed"]
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "train", str(DEMO), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    kill_when(proc, lambda: (killed / "metrics.csv").exists())
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1
    line = load_checkpoint(killed / "last.pt")["log_line"]
    for lost in ("line and row", "row"):
        run = tmp_path / lost.replace(" ", "_")
        shutil.copytree(killed, run)
        header = (run / "metrics.csv").read_text().splitlines()[0]
        (run / "metrics.csv").write_text(header + "\n")
        if lost == "line and row":
            log = (run / "train.log").read_text().splitlines()
            (run / "train.log").write_text("".join(f"{x}\n" for x in log if line not in x))
        out = cli("train", "--resume", run)
        assert out.returncode == 0, out.stderr
        log = (run / "train.log").read_text()
        assert log.count(f" {line}\n") == 1 and log.count(" epoch 2: ") == 1, lost
        assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] \
            == ["1", "2"]


@pytest.mark.slow
def test_autoattack_killed_mid_way_continues_from_its_state_file(checkpoint, tmp_path):
    """`advgkl eval ... --state FILE`, SIGKILLed inside an attack, then the same command: it
    continues (the killed run's log does not block it) and gives the uninterrupted run's flags."""
    ckpt = checkpoint / "last.pt"
    common = [ckpt, "--n-examples", "40", "--batch-size", "5", "--eps", "32/255",
              "--out", tmp_path / "res"]
    assert cli("eval", *common, "--model-name", "full").returncode == 0
    state = tmp_path / "state.json"
    args = [sys.executable, "-m", "advgkl", "eval", *map(str, common), "--state", str(state),
            "--model-name", "cut"]

    def inside_an_attack() -> bool:
        try:
            current = json.loads(state.read_text())["current"]
        except (OSError, ValueError):
            return False
        return bool(current) and current["batches_done"] >= 1

    kill_when(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
              inside_an_attack)
    records = tmp_path / "res" / "digits" / "Linf"
    assert sorted(p.name for p in records.glob("cut*")) == ["cut.log.partial"]
    out = cli(*args[3:])
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in records.glob("cut*")) == ["cut.detailed.json", "cut.json",
                                                           "cut.log"]
    full, cut = (json.loads((records / f"{n}.detailed.json").read_text())["result"]
                 for n in ("full", "cut"))
    assert cut["robust_flags"] == full["robust_flags"]
    assert cut["clean_flags"] == full["clean_flags"]
    assert "advgkl: clean accuracy" in (records / "cut.log").read_text()  # the killed run's part


def test_a_study_row_named_to_escape_its_folder_is_refused(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nbase: {DEMO}\nseeds: [0]\ncheckpoint: last.pt\n"
                     "rows:\n  - {name: '..', overrides: []}\n")
    out = subprocess.run([sys.executable, "-m", "advgkl", "study", str(study)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert_one_line_error(out.returncode, out.stderr, "each row needs a unique plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]

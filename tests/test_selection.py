"""Which weights a run hands to evaluation, and how its records say what was selected on what."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advgkl.checkpoint import default_weights, load_checkpoint, save_checkpoint
from advgkl.cli import main
from advgkl.config import load_config
from advgkl.evaluation.job import selection_of
from advgkl.training.loop import train

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"
SHORT = ["train.epochs=2", "attack.steps=1", "eval.pgd_steps=1"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "advgkl", *map(str, args)], capture_output=True,
                          text=True)


def test_default_weights_prefer_the_epoch_average_then_the_ema():
    assert default_weights({"model": {}}) == "model"                        # old or plain files
    assert default_weights({"ema": {"started": True}}) == "ema"
    assert default_weights({"ema": {"started": True}, "epoch_avg": None}) == "ema"
    assert default_weights({"ema": {"started": False}, "epoch_avg": {"epochs": []}}) == "model"
    assert default_weights({"ema": {"started": True}, "epoch_avg": {"epochs": [1]}}) == "avg"


def test_best_pt_from_before_validation_splits_is_flagged_as_selected_on_test_points():
    old = {"model": {}, "config": {"eval": {"holdout_size": 1000, "pgd_steps": 10}}}
    assert selection_of(old, "checkpoints/run/best.pt") == {
        "points": "TEST-1000", "on_test_points": True, "metric": "PGD-10 robust accuracy"}
    assert selection_of(old, "checkpoints/run/last.pt") is None               # not selected
    new = {**old, "check": None}
    assert selection_of(new, "checkpoints/run/best.pt") is None


@pytest.mark.slow
def test_selection_on_test_points_is_said_in_every_record(tmp_path):
    """eval.check=test, asked for explicitly: train.log, metrics.csv, best.pt, the detailed
    record and the model_info footnote all say that best.pt was picked on test points."""
    run = tmp_path / "run"
    train(load_config(DEMO, [*SHORT, "eval.check=test", "eval.holdout_size=32"]), run, echo=False)
    assert "use the first 32 TEST points" in (run / "train.log").read_text()
    with open(run / "metrics.csv", newline="") as f:
        assert {row["check_points"] for row in csv.DictReader(f)} == {"TEST-32"}
    assert load_checkpoint(run / "best.pt")["selected_by"]["on_test_points"]
    out = cli("eval", run / "best.pt", "--n-examples", "20", "--eps", "32/255", "--out",
              tmp_path / "res", "--footnote", "Trained by us.")
    assert out.returncode == 0, out.stderr
    assert "worst class: " in out.stdout
    records = tmp_path / "res" / "digits" / "Linf"
    detailed = json.loads((records / "run.detailed.json").read_text())
    assert detailed["selection"]["on_test_points"] and detailed["selection"]["points"] == "TEST-32"
    footnote = json.loads((records / "run.json").read_text())["footnote"]
    assert footnote.startswith("Trained by us. Checkpoint selected by PGD-1 robust accuracy on "
                               "the first 32 test points")


@pytest.mark.slow
def test_epoch_average_is_what_eval_scores_and_average_recomputes_it(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(DEMO, [*SHORT, "train.epochs=3", "train.epoch_avg_tau=0.9",
                             "train.save_every=1", "eval.check=none"]), run, echo=False)
    assert sorted(p.name for p in run.glob("*.pt")) == [
        "avg.pt", "epoch-001.pt", "epoch-002.pt", "epoch-003.pt", "last.pt"]   # no best.pt
    last = load_checkpoint(run / "last.pt")
    assert default_weights(last) == "avg"

    assert main(["average", str(run), "--tau", "0.9", "--out", str(tmp_path / "a.pt")]) == 0
    posthoc = load_checkpoint(tmp_path / "a.pt")
    assert posthoc["averaged"] == {"tau": 0.9, "start": 1, "end": 3}
    assert all(torch.equal(v, last["epoch_avg"]["model"][k]) for k, v in posthoc["model"].items())
    before = (tmp_path / "a.pt").read_bytes()
    assert main(["average", str(run), "--out", str(tmp_path / "a.pt")]) == 2  # never overwrites
    assert (tmp_path / "a.pt").read_bytes() == before
    (run / "epoch-002.pt").unlink()
    assert main(["average", str(run), "--out", str(tmp_path / "b.pt")]) == 2
    assert "no checkpoint for epoch(s) 2" in capsys.readouterr().err

    # `advgkl eval` scores the average by default, the same as avg.pt's own weights.
    flags = {}
    for name, path, extra in (("last", run / "last.pt", []), ("avg", run / "avg.pt", []),
                              ("raw", run / "last.pt", ["--weights", "model"])):
        assert main(["eval", str(path), "--quick", "pgd-2", "--n-examples", "60", "--eps",
                     "32/255", "--out", str(tmp_path / "res"), "--model-name", name, *extra]) == 0
        record = json.loads((tmp_path / "res" / "digits" / "Linf" / f"{name}.pgd-2.json")
                            .read_text())
        flags[name] = (record["weights"], record["result"]["clean_flags"])
    assert flags["last"][0] == "avg" and flags["last"][1] == flags["avg"][1]


def test_old_checkpoints_still_load_and_evaluate(tmp_path, capsys):
    """A checkpoint written before this version (no epoch_avg, check or selected_by keys)."""
    from advgkl.checkpoint import model_checkpoint
    from advgkl.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", 10)
    ckpt = model_checkpoint(model.state_dict(), arch="small-cnn", num_classes=10,
                            ema={"model": model.state_dict(), "started": True, "updates": 3},
                            config={"data": {"dataset": "digits"},
                                    "eval": {"holdout_size": 360, "pgd_steps": 10}})
    save_checkpoint(tmp_path / "old" / "best.pt", ckpt)
    assert main(["eval", str(tmp_path / "old" / "best.pt"), "--quick", "pgd-1", "--n-examples",
                 "20", "--eps", "32/255", "--out", str(tmp_path / "res")]) == 0
    record = json.loads((tmp_path / "res" / "digits" / "Linf" / "old.pgd-1.json").read_text())
    assert record["weights"] == "ema" and record["selection"]["on_test_points"]

"""Experiment trackers: TensorBoard's real event files carry the run's numbers; W&B gets the same
(the service is the machine's edge: a stand-in module records the calls); a tracker that is
selected but missing stops the run before its folder exists."""

import csv
import sys
import types
from pathlib import Path

import pytest

import advgkl.runlog as runlog
from advgkl.config import load_config
from advgkl.errors import ConfigError, UserError
from advgkl.training.loop import train

DEMO = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
SHORT = ["train.epochs=2", "attack.steps=1", "eval.pgd_steps=1", "eval.val_size=64"]


def test_tensorboard_event_files_hold_the_epoch_and_step_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(DEMO, [*SHORT, "run.loggers=[tensorboard]", "run.log_every=5"])
    train(cfg, tmp_path / "run", echo=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    robust = [e.value for e in events.Scalars("epoch/robust_acc")]
    assert robust == pytest.approx([float(r["robust_acc"]) for r in rows])
    steps_per_epoch = -(-(1437 - 64) // 64)
    assert [e.step for e in events.Scalars("epoch/loss")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [e.step for e in events.Scalars("step/loss")] == list(range(5, 2 * steps_per_epoch + 1, 5))


def test_wandb_gets_the_same_numbers_and_keeps_one_run_across_a_resume(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(runlog, "check_trackers", lambda names: None)
    monkeypatch.setattr("advgkl.training.loop.check_trackers", lambda names: None)
    cfg = load_config(DEMO, [*SHORT, "run.loggers=[wandb]", "run.wandb_project=p"])
    train(cfg, tmp_path / "run", echo=False)
    train(cfg, tmp_path / "run", resume=True, echo=False)   # finished: nothing more to log
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "p" and "mode" not in inits[0]   # WANDB_MODE stays the user's
    assert inits[0]["config"]["train"]["epochs"] == 2
    epochs = [c[2]["epoch/epoch"] for c in calls if c[0] == "log"]
    assert epochs == [1.0, 2.0] and calls[-1] == ("finish",)


def test_a_selected_tracker_that_is_not_installed_stops_before_the_run_folder(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setitem(runlog._TRACKER_MODULES, "wandb", "advgkl_no_such_module")
    cfg = load_config(DEMO, [*SHORT, "run.loggers=[wandb]"])
    with pytest.raises(UserError, match="run.loggers: wandb is selected but not installed"):
        train(cfg, tmp_path / "run", echo=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="run.loggers"):
        load_config(DEMO, ["run.loggers=[mlflow]"])


def test_curves_are_redrawn_at_most_every_few_seconds_and_always_at_the_end(tmp_path):
    log = runlog.RunLog(tmp_path, echo=False)
    log.append_metrics({"epoch": 1, "loss": 1.0, "ce": 1.0, "robust": 0.0, "train_acc": 0.5})
    log.plot()                                           # the first epoch is drawn
    drawn = (tmp_path / "curves.png").stat().st_mtime_ns
    log.append_metrics({"epoch": 2, "loss": 0.9, "ce": 0.9, "robust": 0.0, "train_acc": 0.6})
    log.plot()                                           # a second later: not redrawn
    assert (tmp_path / "curves.png").stat().st_mtime_ns == drawn
    log.plot(final=True)                                 # the run's last epoch: always
    assert (tmp_path / "curves.png").stat().st_mtime_ns > drawn


@pytest.mark.parametrize("left", ["", "epoch,lr,lo", "HEADER\r\n1,0.1,0.9"])
def test_a_metrics_file_a_kill_left_half_written_is_read_and_continued_whole(tmp_path, left):
    """A kill can leave metrics.csv created but unwritten, or its last line cut short: the cut
    line is not a row, and the next row is appended after the whole lines, under a header."""
    header = ",".join(runlog.METRIC_FIELDS)
    (tmp_path / "metrics.csv").write_bytes(left.replace("HEADER", header).encode())
    log = runlog.RunLog(tmp_path, echo=False)
    assert log.logged_epochs() == []
    log.append_metrics({"epoch": 1, "loss": 0.5})
    log.append_metrics({"epoch": 2, "loss": 0.25})
    rows = runlog.read_metrics(tmp_path)
    assert [(r["epoch"], r["loss"]) for r in rows] == [("1", "0.5"), ("2", "0.25")]
    lines = (tmp_path / "metrics.csv").read_bytes().split(b"\r\n")
    assert lines[0].decode() == header and lines[-1] == b"" and len(lines) == 4


def test_an_older_runs_metrics_keep_their_own_columns(tmp_path):
    (tmp_path / "metrics.csv").write_bytes(b"epoch,loss\r\n1,0.5\r\n")
    runlog.RunLog(tmp_path, echo=False).append_metrics({"epoch": 2, "loss": 0.25, "lr": 0.1})
    assert (tmp_path / "metrics.csv").read_bytes() == b"epoch,loss\r\n1,0.5\r\n2,0.25\r\n"

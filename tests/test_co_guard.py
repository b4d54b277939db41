"""The catastrophic-overfitting guard, through the commands a user types: FGSM without a random
start at the demo's budget (eps 32/255) overfits catastrophically on the digits around epoch 10
(PGD accuracy on the validation points falls from ~30 % to ~15 % while FGSM's climbs to ~80 %);
the guard rolls back, stops, keeps the last good weights and says so; a resume keeps its state;
a healthy run trains exactly as without it."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_when
from torch import nn

import advgkl.training.loop as train_mod
from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main
from advgkl.config import load_config
from advgkl.errors import UserError
from advgkl.training.co_guard import COGuard, guard_mode

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"
FGSM = ["loss.method=fgsm_rs", "loss.start=zero", "train.co_guard=rollback",
        "train.co_guard_rollbacks=1", "train.save_every=1"]


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """The FGSM run, SIGKILLed right after its rollback and resumed."""
    out = tmp_path_factory.mktemp("co")
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "train", str(DEMO), *FGSM,
                             f"run.out_dir={out}", "run.name=fgsm"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "fgsm" / "train.log"
    kill_when(proc, lambda: log.exists() and "is restored" in log.read_text())
    proc.wait()
    assert main(["train", "--resume", str(out / "fgsm")]) == 0
    return out / "fgsm"


@pytest.mark.slow
def test_guard_rolls_back_to_its_best_epoch_then_stops_and_keeps_its_best_weights(overfit,
                                                                                   capsys):
    log = (overfit / "train.log").read_text()
    assert "CO guard: catastrophic overfitting at epoch" in log
    table = rows(overfit)
    events = [r for r in table if r["co_event"]]
    assert [e["co_event"] for e in events] == ["rollback", "stop"]
    for r in events:           # the collapse the guard saw: PGD fell, FGSM did not
        assert float(r["co_fgsm_acc"]) > float(r["co_pgd_acc"]) + 0.3
    state = load_checkpoint(overfit / "last.pt")["co_guard"]
    first = state["events"][0]["best_epoch"]   # rated best before the rollback
    rated = {int(r["epoch"]): float(r["co_pgd_acc"]) for r in table[:table.index(events[0])]}
    assert rated[first] == max(rated.values())                 # its best by its own check
    redone = [r for r in table if int(r["epoch"]) == first + 1]
    assert len(redone) == 2    # training went on from the best epoch, at half the lr
    assert float(redone[1]["lr"]) == pytest.approx(float(redone[0]["lr"]) / 2, rel=1e-12)
    stop = int(events[1]["epoch"])
    last = load_checkpoint(overfit / "last.pt")
    kept_epoch = state["best_epoch"]
    assert (state["stopped_at"], last["epoch"]) == (stop, kept_epoch)
    assert (state["rollbacks"], state["lr_scale"]) == (1, 0.5)   # kept across the SIGKILL
    kept = load_checkpoint(overfit / f"epoch-{kept_epoch:03d}.pt")["model"]
    assert all(torch.equal(last["model"][k], v) for k, v in kept.items())
    assert f"training stops; the final model is epoch {kept_epoch}'s (the guard's best" in log
    assert main(["train", "--resume", str(overfit)]) == 0
    assert "nothing to resume" in capsys.readouterr().out


@pytest.mark.slow
def test_every_evaluation_record_of_a_stopped_run_says_so(overfit, tmp_path):
    assert main(["eval", str(overfit / "last.pt"), "--quick", "pgd-5", "--n-examples", "40",
                 "--out", str(tmp_path), "--eps", "32/255"]) == 0
    record = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert "training STOPPED" in record["training"]["co_guard"]
    assert "the one the guard rated best" in record["training"]["co_guard"]
    assert "its own single step (fgsm)" in record["training"]["method"]
    assert "threads, torch" in record["machine"]


def test_a_healthy_run_is_left_alone(tmp_path):
    """Guard on (warn) or off: the same weights to the bit (its attacks draw from their own
    random stream), and no event in a healthy N-FGSM run."""
    weights = {}
    for mode in ("off", "warn"):
        cfg = load_config(DEMO, ["loss.method=n_fgsm", f"train.co_guard={mode}",
                                 "train.epochs=3"])
        train_mod.train(cfg, tmp_path / mode, echo=False)
        weights[mode] = load_checkpoint(tmp_path / mode / "last.pt")["model"]
    assert all(torch.equal(weights["off"][k], v) for k, v in weights["warn"].items())
    table = rows(tmp_path / "warn")
    assert all(r["co_pgd_acc"] and not r["co_event"] for r in table)
    assert not any(r["co_pgd_acc"] for r in rows(tmp_path / "off"))


def _measured(robust):
    return {"co_pgd_acc": robust, "co_fgsm_acc": 1.0, "co_distortion": None, "co_seconds": 0.0}


def test_guard_modes_and_rules():
    assert guard_mode("auto", single_step=True, check="val") == ("stop", "")
    assert guard_mode("auto", single_step=False, check="val") == ("off", "")
    assert "needs a validation split" in guard_mode("auto", single_step=True, check="none")[1]
    with pytest.raises(UserError, match="train.co_guard: stop checks a validation split"):
        load_config(DEMO, ["train.co_guard=stop", "eval.check=test"])
    guard = COGuard("warn", torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
                    eps=0.1, steps=2, drop=0.2, fraction=0.5, min_drop=0.1, rollbacks=1,
                    batch_size=1)
    results = iter([0.30, 0.20, 0.04, 0.08, 0.40, 0.09])
    guard._measure = lambda model: _measured(next(results))
    actions = [guard.check(None, epoch)[1] for epoch in range(1, 7)]
    # 0.20: drop 0.10, above half the best: fine. 0.04: below half of 0.30 by 0.26. 0.08 after
    # a best of 0.30: still. 0.40: fine. 0.09: by 0.31 below the last good: Wong's rule.
    assert actions == ["", "", "warn", "warn", "", "warn"]
    assert (guard.state.best_epoch, guard.state.best) == (5, 0.40)   # what stop would keep
    low = COGuard("warn", torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), eps=0.1,
                  steps=2, drop=0.2, fraction=0.5, min_drop=0.1, rollbacks=1, batch_size=1)
    results = iter([0.05, 0.01])
    low._measure = lambda model: _measured(next(results))
    assert [low.check(None, e)[1] for e in (1, 2)] == ["", ""]   # noise at a low accuracy


class Saturated(nn.Module):
    """The model's logits times 10^4: its softmax saturates, CE's input gradients vanish."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1e4 * self.model(x)


@pytest.mark.slow
def test_the_strengthened_check_sees_a_collapse_that_masks_ce(demo_run, tmp_path):
    """A robust epoch, then one whose model lost its robustness behind a saturated softmax (a
    plainly trained model, logits scaled): the old check, CE PGD, reads the second as robust as
    it is accurate and would go on; the guard's worst of CE and margin PGD reads it at ~0 and
    stops, keeping the first epoch."""
    from advgkl.data.tensors import load_split, to_unit_float
    from advgkl.evaluation.quick import correct_under, pgd
    from advgkl.models.loading import model_from_checkpoint

    cfg = load_config(DEMO, ["loss.method=pgd_at", "attack.steps=0", "attack.random_start=none",
                             "train.epochs=4", "eval.check=none"])
    train_mod.train(cfg, tmp_path / "plain", echo=False)
    robust = model_from_checkpoint(load_checkpoint(demo_run / "last.pt"), weights="ema").eval()
    plain = Saturated(model_from_checkpoint(load_checkpoint(tmp_path / "plain" / "last.pt")))
    val = load_split("digits", train=True)
    x, y = to_unit_float(val.images[:144]), val.labels[:144]
    eps = 32 / 255

    def old_check(model):   # the guard before: CE PGD-10 alone
        return correct_under(model.eval(), x, y, pgd(eps, 10), batch_size=144,
                             device="cpu").float().mean().item()

    guard = COGuard("stop", x, y, eps=eps, steps=10, drop=0.2, fraction=0.5, min_drop=0.1,
                    rollbacks=1, batch_size=144)
    first, action = guard.check(robust, 1)
    assert action == "" and first["co_pgd_acc"] > 0.3
    second, action = guard.check(plain, 2)
    assert old_check(plain) > first["co_pgd_acc"] + 0.3     # the old check: fooled, no event
    assert second["co_pgd_acc"] < 0.05 and action == "stop"
    assert guard.state.best_epoch == 1 and "the final model is epoch 1's" in guard.message(2)

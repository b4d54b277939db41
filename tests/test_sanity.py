"""Whether an evaluation can be trusted: the sanity battery passes a healthy model, flags one
whose gradients are masked, and AutoAttack's own checks appear one by one in the record."""

import json

import pytest
import torch
from torch import nn

from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main
from advgkl.data.tensors import load_split
from advgkl.evaluation.autoattack import evaluate_autoattack
from advgkl.evaluation.leaderboard import detailed_record
from advgkl.evaluation.sanity import (AA_CHECKS, FINDINGS, after_attack, autoattack_checks, battery,
                                      finding, gap_row)
from advgkl.models.loading import model_from_checkpoint

EPS = 32 / 255


class _ZeroBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Masked(nn.Module):
    """The model behind a layer whose backward returns zero: gradient attacks see nothing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_ZeroBackward.apply(x))


class Randomized(nn.Module):
    """The model on a noisy copy of its input: every forward differs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


def _model(run):
    model = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    return model.eval()


def _points(n):
    split = load_split("digits", train=False)
    return split.images[:n], split.labels[:n]


@pytest.mark.slow
def test_a_healthy_digits_model_passes_every_check(demo_run, tmp_path, capsys):
    assert main(["eval", str(demo_run / "last.pt"), "--sanity", "--n-examples", "100", "--eps",
                 "32/255", "--batch-size", "100", "--out", str(tmp_path)]) == 0
    assert "sanity: 0 of 6 checks flagged" in capsys.readouterr().out   # the terminal table
    record = json.loads(next(tmp_path.rglob("*.detailed.json")).read_text())
    rows = record["sanity"]["rows"]
    assert [r["verdict"] for r in rows] == ["pass"] * 6, rows
    assert rows[-1]["check"] == "PGD is close to AutoAttack"
    assert {r["check"] for r in rows} == set(FINDINGS)    # every row can say what went wrong
    checks = record["autoattack_checks"]
    assert [c["check"] for c in checks] == [name for name, _, _ in AA_CHECKS]
    assert all(c["ran"] and not c["fired"] for c in checks), checks
    assert "every attack failed" in record["worst_case"]


@pytest.mark.slow
def test_a_flagged_row_says_what_went_wrong_with_its_numbers():
    row = gap_row([True] * 8, [True] * 7 + [False])   # PGD 100 %, AutoAttack 87.5 %
    assert row["verdict"] == "FLAG"
    assert finding(row) == "PGD overestimates AutoAttack by 12.5 points (threshold 10)"


@pytest.mark.slow
def test_masked_gradients_are_flagged_by_several_checks(demo_run, capsys):
    model = Masked(_model(demo_run))
    x, y = _points(40)
    checks = battery(model, x, y, eps=EPS, norm="Linf", num_classes=10, batch_size=40,
                     device=torch.device("cpu"))
    result = evaluate_autoattack(model, x, y, eps=EPS, version="custom",
                                 attacks=["apgd-ce", "square"], batch_size=40, progress=False)
    rows = after_attack(checks, result.robust_flags, 1.0)["rows"]
    flagged = {r["check"] for r in rows if r["verdict"] == "FLAG"}
    assert len(flagged) >= 2, rows
    printed = capsys.readouterr().out   # each flag in words, with its numbers
    assert "sanity FLAG: an unbounded attack leaves" in printed
    assert "sanity FLAG: PGD overestimates AutoAttack by" in printed
    assert {"an unbounded attack reaches chance", "PGD is close to AutoAttack"} <= flagged
    zero = next(c for c in autoattack_checks(result.check_flags, result.attacks, "custom")
                if c["check"] == "square_success")
    assert zero["ran"] and zero["fired"]  # AutoAttack's own Square check agrees


class Dynamic(nn.Module):
    """A forward that takes an input gradient (a test-time defense): AutoAttack's dynamic check."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.model(x).logsumexp(1).sum(), [x])
        return self.model(x.detach() - 0.001 * grad.sign())


def test_autoattack_s_dynamic_check_fires_for_a_dynamic_model_only_and_each_time():
    """The counter pyautoattack never resets is reset before each check: a plain model after a
    dynamic one is not flagged, a dynamic one is, every time."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(768, 10)).eval()
    x, y = _points(8)

    def fired(model):
        result = evaluate_autoattack(model, x, y, eps=EPS, version="custom", attacks=["apgd-ce"],
                                     batch_size=8, progress=False)
        rows = autoattack_checks(result.check_flags, result.attacks, "custom")
        return next(r for r in rows if r["check"] == "dynamic_defense")["fired"]

    assert [fired(m) for m in (Dynamic(plain), plain, Dynamic(plain), plain)] == [
        True, False, True, False]


def test_a_randomized_model_s_autoattack_warning_is_in_its_record():
    torch.manual_seed(0)
    model = Randomized(nn.Sequential(nn.Flatten(), nn.Linear(768, 10))).eval()
    x, y = _points(8)
    result = evaluate_autoattack(model, x, y, eps=EPS, version="custom", attacks=["apgd-ce"],
                                 batch_size=8, progress=False)
    record = detailed_record(result, dataset="digits", arch="linear", checkpoint=None,
                             checkpoint_sha256=None, weights="model", config=None)
    rows = {c["check"]: c for c in record["autoattack_checks"]}
    assert rows["randomness"]["ran"] and rows["randomness"]["fired"]
    assert "randomized defense" in rows["randomness"]["messages"][0]
    assert not rows["softmax_output"]["fired"] and not rows["square_success"]["ran"]

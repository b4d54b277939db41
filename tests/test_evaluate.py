"""AutoAttack wrapper: identical to pyautoattack, resumable, shardable; records and export."""

import copy
import json
import os
import subprocess
import sys

import pyautoattack
import pytest
import torch
from helpers import torchrun

from advgkl.checkpoint import model_checkpoint, save_checkpoint
from advgkl.data.tensors import load_split, to_unit_float
from advgkl.errors import UserError
from advgkl.evaluation.autoattack import (EvalResult, evaluate_autoattack, merge_results,
                                          resolve_attacks)
from advgkl.evaluation.quick import evaluate_pgd
from advgkl.models import create_model

EPS = 24 / 255


def digits_points(n=48):
    test = load_split("digits", train=False)
    return to_unit_float(test.images[:n]), test.labels[:n]


def trained_model():
    """A linear model fit for a few steps on digits: clean-accurate, partly robust at EPS."""
    torch.manual_seed(0)
    train = load_split("digits", train=True)
    x, y = to_unit_float(train.images), train.labels
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return trained_model()


@pytest.mark.slow
def test_identical_to_a_direct_pyautoattack_call(model):
    x, y = digits_points()
    ours = evaluate_autoattack(model, x, y, eps=EPS, batch_size=16, seed=0, device="cpu",
                               progress=False)
    direct = pyautoattack.AutoAttack(model, eps=EPS, norm="Linf", seed=0, device="cpu",
                                     version="standard")
    _, y_adv = direct.run_standard_evaluation(x, y, batch_size=16)
    assert ours.robust_flags == (y_adv == y).tolist()
    assert 0 < ours.robust_acc < ours.clean_acc  # attacks broke some points, not all
    assert [a["attack"] for a in ours.per_attack] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    robust_after = [a["robust"] for a in ours.per_attack]
    assert robust_after == sorted(robust_after, reverse=True)
    assert all(a["seconds"] > 0 for a in ours.per_attack)


def test_resume_after_a_crash_skips_finished_work(model, tmp_path, monkeypatch):
    x, y = digits_points()
    kw = dict(eps=EPS, version="custom", attacks=["apgd-ce", "apgd-t"], batch_size=16,
              seed=0, device="cpu", progress=False)
    reference = evaluate_autoattack(model, x, y, **kw)

    real, calls = pyautoattack.AutoAttack.run_standard_evaluation, []

    def crashing(self, *args, **kwargs):
        calls.append(list(self.attacks_to_run))
        if self.attacks_to_run == ["apgd-t"] and len([c for c in calls if c == ["apgd-t"]]) == 2:
            raise KeyboardInterrupt  # killed in the second batch of the second attack
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", crashing)
    state = tmp_path / "aa_state.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate_autoattack(model, x, y, state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert [a["attack"] for a in saved["done"]] == ["apgd-ce"]
    assert saved["current"]["batches_done"] == 1

    calls.clear()
    resumed = evaluate_autoattack(model, x, y, state_path=state, **kw)
    assert ["apgd-ce"] not in calls                      # the finished attack is skipped
    assert resumed.robust_flags == reference.robust_flags
    assert resumed.per_attack[0]["robust"] == reference.per_attack[0]["robust"]


def test_state_of_other_settings_is_refused(model, tmp_path):
    x, y = digits_points(16)
    kw = dict(version="custom", attacks=["apgd-ce"], device="cpu", progress=False,
              state_path=tmp_path / "s.json")
    evaluate_autoattack(model, x, y, eps=EPS, **kw)
    with pytest.raises(UserError, match="other settings"):
        evaluate_autoattack(model, x, y, eps=EPS / 2, **kw)
    other = copy.deepcopy(model)                     # the same settings, other weights
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(UserError, match="other settings \\(model weights"):
        evaluate_autoattack(other, x, y, eps=EPS, **kw)


def test_checks_flag_softmax_outputs(model):
    x, y = digits_points(16)
    softmax_model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    result = evaluate_autoattack(softmax_model, x, y, eps=EPS, version="custom",
                                 attacks=["apgd-ce"], device="cpu", progress=False)
    assert any("probability distribution" in m for m in result.check_flags)


def test_merge_is_the_union_of_shards(model):
    x, y = digits_points(40)
    kw = dict(eps=EPS, version="custom", attacks=["apgd-ce"], batch_size=8, device="cpu",
              progress=False)
    shards = [evaluate_autoattack(model, x[a:b], y[a:b], first_index=a, **kw)
              for a, b in ((20, 40), (0, 20))]
    merged = merge_results(shards)
    assert merged.robust_flags == shards[1].robust_flags + shards[0].robust_flags
    assert merged.per_attack[0]["robust"] == sum(s.per_attack[0]["robust"] for s in shards)
    assert merged.n_examples == 40 and merged.first_index == 0
    with pytest.raises(UserError, match="not contiguous"):
        merge_results([shards[0], EvalResult.from_dict({**shards[1].to_dict(), "first_index": 5})])


def test_quick_evaluations_are_labelled(model):
    x, y = digits_points(32)
    torch.manual_seed(0)
    pgd = evaluate_pgd(model, x, y, eps=EPS, steps=10, device="cpu", progress=False)
    cw = evaluate_pgd(model, x, y, eps=EPS, steps=10, loss="cw", device="cpu", progress=False)
    assert "NON-STANDARD" in pgd.label and pgd.attacks == ["pgd-10"] and not pgd.standard
    assert "CW" in cw.label and cw.attacks == ["cw-10"]
    assert pgd.robust_acc <= pgd.clean_acc


@pytest.mark.parametrize("version, attacks, message", [
    ("custom", ["apgd-ce", "pgd"], "unknown attack 'pgd'"),
    ("custom", None, "needs a list of attacks"),
    ("standard", ["apgd-ce"], "fixed by version 'standard'"),
    ("fast", None, "version: 'fast'"),
])
def test_resolve_attacks_errors(version, attacks, message):
    with pytest.raises(UserError, match=message):
        resolve_attacks(version, attacks)


# --- the CLI: records, bad input, sharding under torchrun, export ---

def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "advgkl", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A wrn-10-1 digits checkpoint in advgkl's format (random weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "run-a" / "last.pt"
    save_checkpoint(path, model_checkpoint(create_model("wrn-10-1", 10).state_dict(),
                                           arch="wrn-10-1", num_classes=10,
                                           config={"data": {"dataset": "digits"}}))
    return path


def test_eval_writes_robustbench_records(digits_ckpt, tmp_path):
    out = run_cli("eval", str(digits_ckpt), "--n-examples", "24", "--eps", "8/255",
                  "--batch-size", "12", "--out", str(tmp_path), "--authors", "A. Author")
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "digits" / "Linf"
    info = json.loads((folder / "run-a.json").read_text())
    assert info["eps"] == "8/255" and info["authors"] == "A. Author" and info["name"] == ""
    assert info["architecture"] == "WideResNet-10-1" and info["number_forward_passes"] == 1
    assert len(info["clean_acc"].split(".")[1]) == 2 and "autoattack_acc" in info
    detailed = json.loads((folder / "run-a.detailed.json").read_text())
    assert [a["attack"] for a in detailed["per_attack"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert detailed["n_examples"] == 24 and len(detailed["checkpoint_sha256"]) == 64
    assert "advgkl: clean accuracy" in (folder / "run-a.log").read_text()
    again = run_cli("eval", str(digits_ckpt), "--n-examples", "24", "--out", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_quick_eval_never_writes_model_info(digits_ckpt, tmp_path):
    out = run_cli("eval", str(digits_ckpt), "--n-examples", "16", "--quick", "pgd-5",
                  "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "NON-STANDARD" in out.stdout
    files = sorted(p.name for p in (tmp_path / "digits" / "Linf").iterdir())
    assert files == ["run-a.pgd-5.json"]


@pytest.mark.parametrize("args, message", [
    (["--eps", "8"], "did you mean 8/255"),
    (["--n-examples", "1000"], "more than the 360 test images of digits"),
    (["--dataset", "cifar100"], "the checkpoint has 10 classes, cifar100 has 100"),
    (["--version", "custom", "--attacks", "apgd-ce,pgd"], "unknown attack 'pgd'"),
    (["--quick", "fgsm"], "expected pgd-K, cw-K or apgd"),
])
def test_eval_bad_input_is_one_clear_error(digits_ckpt, tmp_path, args, message):
    out = run_cli("eval", str(digits_ckpt), "--n-examples", "8", *args, "--out", str(tmp_path))
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_union(digits_ckpt, tmp_path):
    common = ["--n-examples", "30", "--version", "custom", "--attacks", "apgd-ce",
              "--batch-size", "10", "--eps", "16/255"]
    run = subprocess.run(torchrun("eval", str(digits_ckpt), *common,
                                  "--out", str(tmp_path / "torchrun")), capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for i in range(2):
        out = run_cli("eval", str(digits_ckpt), *common, "--shard", f"{i}/2",
                      "--out", str(tmp_path / "manual"))
        assert out.returncode == 0, out.stderr
    folder = tmp_path / "manual" / "digits" / "Linf"
    shards = [json.loads((folder / f"run-a.shard-{i}-of-2.json").read_text()) for i in range(2)]
    merged = run_cli("eval-merge", *(str(folder / f"run-a.shard-{i}-of-2.json") for i in (1, 0)),
                     "--out", str(tmp_path / "manual"))
    assert merged.returncode == 0, merged.stderr
    by_torchrun = json.loads((tmp_path / "torchrun" / "digits" / "Linf" /
                              "run-a.custom.json").read_text())
    by_hand = json.loads((folder / "run-a.custom.json").read_text())
    assert "NON-STANDARD" in by_hand["label"]
    union = shards[0]["result"]["robust_flags"] + shards[1]["result"]["robust_flags"]
    assert by_torchrun["result"]["robust_flags"] == union == by_hand["result"]["robust_flags"]
    assert by_torchrun["per_attack"][0]["robust"] == sum(
        s["per_attack"][0]["robust"] for s in shards)


@pytest.mark.slow
def test_export_bundle(digits_ckpt, tmp_path):
    out = run_cli("eval", str(digits_ckpt), "--n-examples", "12", "--out", str(tmp_path / "r"),
                  "--batch-size", "12")
    assert out.returncode == 0, out.stderr
    info = tmp_path / "r" / "digits" / "Linf" / "run-a.json"
    refused = run_cli("export", str(digits_ckpt), "--eval", str(info), "--out",
                      str(tmp_path / "sub"))
    assert refused.returncode == 2 and "--allow-partial" in refused.stderr
    done = run_cli("export", str(digits_ckpt), "--eval", str(info), "--out",
                   str(tmp_path / "sub"), "--allow-partial")
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert files == ["model_zoo_entry.py", "new_model_issue.md", "run-a.json", "run-a.pt",
                     "run-a.pt.sha256"]
    assert "PARTIAL" in (tmp_path / "sub" / "new_model_issue.md").read_text()
    assert "WideResNet(depth=10, widen_factor=1" in (tmp_path / "sub" / "model_zoo_entry.py").read_text()
    from advgkl.models.robustbench import robustbench_model

    robustbench_model("wrn-10-1", 10).load_state_dict(
        torch.load(tmp_path / "sub" / "run-a.pt", weights_only=True), strict=True)
    other = tmp_path / "other.pt"
    other.write_bytes(digits_ckpt.read_bytes() + b"\0")
    mismatch = run_cli("export", str(other), "--eval", str(info), "--out", str(tmp_path / "x"),
                       "--allow-partial")
    assert mismatch.returncode == 2 and "sha256 differs" in mismatch.stderr


def test_per_class_accuracy_and_the_worst_class_come_from_the_flags():
    from advgkl.evaluation.autoattack import EvalResult, merge_results

    def result(first, labels, clean, robust):
        return EvalResult(n_examples=len(labels), clean_flags=clean, robust_flags=robust,
                          per_attack=[{"attack": "apgd-ce", "robust": sum(robust), "seconds": 1}],
                          eps=0.1, norm="Linf", version="standard", attacks=["apgd-ce"], seed=0,
                          first_index=first, labels=labels)

    a = result(0, [0, 1, 1, 2], [True, True, False, True], [True, False, False, True])
    b = result(4, [2, 0], [True, False], [False, False])
    merged = merge_results([b, a])
    assert merged.labels == [0, 1, 1, 2, 2, 0]
    assert merged.per_class() == [
        {"class": 0, "n": 2, "clean_acc": 0.5, "robust_acc": 0.5},
        {"class": 1, "n": 2, "clean_acc": 0.5, "robust_acc": 0.0},
        {"class": 2, "n": 2, "clean_acc": 1.0, "robust_acc": 0.5}]
    assert merged.worst_class()["class"] == 1

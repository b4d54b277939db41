"""The benchmarks: bench_step's reference computes the same step as ours; both scripts run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_step  # noqa: E402

from advgkl.models import create_model  # noqa: E402


@pytest.mark.parametrize("awp", [False, True])
def test_reference_step_computes_the_same_first_loss_as_ours(awp):
    """Same weights, batch and seed: the paper-style step and `TrainStep` agree on the loss.
    Pixels stay away from 0 and 1, where the reference's unclamped attack start differs."""
    class Args:
        model, batch_size, steps, no_awp = "wrn-10-1", 16, 3, not awp

    torch.manual_seed(0)
    init = create_model("wrn-10-1", 10)
    x, y = torch.rand(16, 3, 32, 32) * 0.98 + 0.01, torch.arange(16) % 10
    losses = {}
    for variant in ("reference", "fp32"):
        torch.manual_seed(1)
        losses[variant] = bench_step.build(variant, init, Args, torch.device("cpu"))(x, y)
    assert losses["fp32"] == pytest.approx(losses["reference"], rel=1e-4)


def test_bench_step_runs_and_writes_json(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_step.py"), "--model", "wrn-10-1", "--batch-size", "4",
         "--steps", "1", "--repeats", "1", "--warmup", "0", "--variants", "reference,fp32",
         "--loss-curve", "2", "--device", "cpu", "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["reference", "fp32"]
    assert result["rows"][0]["speedup_vs_reference"] == 1.0
    assert set(result["loss_curve"]["mean_abs_diff_vs_fp32"]) == {
        "fp32-attack-seed", "fp32-other-data", "bf16"}


@pytest.mark.slow
def test_bench_aa_projects_from_full_budget_costs(tmp_path):
    """The AutoAttack projection runs, every point stays robust (full budgets were timed), and
    the projection is the profile-weighted sum of the per-point costs."""
    import bench_aa

    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_aa.py"), "--model", "small-cnn", "--n", "2",
         "--variants", "plain,bf16", "--device", "cpu", "--json", str(tmp_path / "aa.json")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "aa.json").read_text())
    for row in result["rows"]:
        costs = {k: v / 1000 for k, v in row["ms_per_point"].items()}
        assert set(costs) == {"apgd-ce", "apgd-t", "fab-t", "square"}
        assert row["projected_hours_10k"] == pytest.approx(
            bench_aa.project(costs, 0.85, 0.60, 0.57) / 3600)
    assert bench_aa.project({"apgd-ce": 1, "apgd-t": 2, "fab-t": 3, "square": 4}, 1, 0.5, 0.25,
                            n=10) == 10 * (1 + 0.5 * 2 + 0.25 * 7)


def test_bench_distill_times_every_method_against_trades_and_a_teacher_forward(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_distill.py"), "--student", "small-cnn", "--teacher",
         "wrn-10-1", "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "0",
         "--device", "cpu", "--json", str(tmp_path / "distill.json")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "distill.json").read_text())["rows"]}
    assert set(rows) == {"teacher-forward", "trades", "ard", "rslad", "rslad-gkl", "gkl-kd",
                         "adaad"}
    assert all("within_bound" in rows[v] for v in ("ard", "rslad", "rslad-gkl", "gkl-kd"))


def test_bench_data_runs_and_writes_json(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_data.py"), "--images", "9",
                           "--json", str(tmp_path / "data.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "data.json").read_text())["rows"]
    assert {(r["source"], r["transform"].split()[0]) for r in rows} == {
        ("folder", "train"), ("shards", "train"), ("folder", "eval"), ("shards", "eval")}
    assert all(r["img_per_s_one_worker"] > 0 for r in rows)


def test_bench_fast_times_each_method_against_pgd_at(tmp_path, monkeypatch):
    import bench_fast

    monkeypatch.setattr(sys, "argv", [
        "bench_fast.py", "--model", "wrn-10-1", "--batch-size", "4", "--steps", "2", "--repeats",
        "1", "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "fast.json")])
    bench_fast.main()
    result = json.loads((tmp_path / "fast.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"pgd_at", "gkl", "fgsm_rs", "n_fgsm", "grad_align", "gkl_n_fgsm"}
    assert rows["pgd_at"]["ratio_to_pgd_at"] == 1.0 and "threads" in result["machine"]


def test_bench_imagenet_step_times_the_recipe_against_a_clean_step(tmp_path, monkeypatch):
    import bench_imagenet_step

    monkeypatch.setattr(sys, "argv", [
        "bench_imagenet_step.py", "--arch", "timm:test_efficientnet", "--batch-size", "4",
        "--image-size", "32", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json",
        str(tmp_path / "step.json")])
    bench_imagenet_step.main()
    result = json.loads((tmp_path / "step.json").read_text())
    seconds = result["seconds"]   # no timed assertion: the numbers only have to be consistent
    assert set(seconds) == set(result["img_s"]) == {"recipe", "clean"}
    assert result["ratio"] == seconds["recipe"] / seconds["clean"] and seconds["clean"] > 0
    assert all(result["img_s"][k] == 4 / seconds[k] for k in seconds)

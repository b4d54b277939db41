"""`advgkl study`: a tiny study runs, survives a SIGKILL of the study process, skips what is
finished, shows failed runs as such, and its summary equals its records."""

import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from advgkl.errors import UserError
from advgkl.evaluation.sanity import findings
from advgkl.studies.study import load_study

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo" / "digits_gkl.yaml"
TINY = {
    "name": "tiny", "base": str(DEMO), "seeds": [0, 1],
    "overrides": ["train.epochs=2", "attack.steps=1", "eval.pgd_steps=1", "eval.val_size=64",
                  "model.arch=small-cnn", "train.co_guard=warn"],
    "eval": {"n_examples": 20, "eps": "32/255", "batch_size": 20, "sanity": 20},
    "rows": [{"name": "plain", "overrides": ["loss.method=pgd_at", "attack.steps=0",
                                             "attack.random_start=none"]},
             {"name": "gkl", "overrides": []},
             {"name": "broken", "overrides": ["train.lr=1e30"]}],   # fails: non-finite loss
}


def write_study(tmp_path, tree=TINY):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def study_cli(path, *args):
    return subprocess.run([sys.executable, "-m", "advgkl", "study", str(path), *args],
                          capture_output=True, text=True, cwd=path.parent)


def alive(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


@pytest.mark.slow
def test_study_runs_resumes_after_sigkill_skips_finished_runs_and_aggregates_exactly(tmp_path):
    path = write_study(tmp_path)
    out = tmp_path / "studies" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "study", str(path)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "results" / "digits" / "Linf" / "plain-s0.json"
    second = out / "runs" / "plain-s1"
    deadline = time.monotonic() + 120
    while not (first.exists() and (second / "train.log").exists()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()                                      # the study process, mid-way through run 2
    proc.wait()
    time.sleep(1)
    assert not alive("run.name=plain-s1"), "the killed study left its training running"
    before = {p: p.stat().st_mtime_ns for p in (out / "runs" / "plain-s0").iterdir()}

    done = study_cli(path, "-j", "2")
    assert done.returncode == 2                                     # the broken row failed
    assert done.stderr.splitlines()[-1].startswith(
        "advgkl: error: 2 run(s) failed: broken-s0: training failed")
    assert {p: p.stat().st_mtime_ns for p in (out / "runs" / "plain-s0").iterdir()} == before
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert logs["plain-s0.log"].count("$ advgkl") == 2            # trained and evaluated once
    assert "train --resume" in logs["plain-s1.log"]                # the killed run continued

    again = study_cli(path, "-j", "2")                 # nothing left but the broken row
    assert {p.name: p.read_text() for p in (out / "logs").iterdir() if "broken" not in p.name} \
        == {k: v for k, v in logs.items() if "broken" not in k}
    assert again.returncode == 2

    with open(out / "summary.csv", newline="") as f:
        summary = {row["row"]: row for row in csv.DictReader(f)}
    assert summary["broken"]["runs_done"] == "0"
    assert "failed: broken-s0, broken-s1" in summary["broken"]["status"]
    assert "failed: broken-s0" in (out / "summary.md").read_text()
    for row in ("plain", "gkl"):
        records = [json.loads((out / "results" / "digits" / "Linf" /
                               f"{row}-s{s}.detailed.json").read_text()) for s in (0, 1)]
        robust = [r["robust_acc"] for r in records]
        assert float(summary[row]["robust_mean"]) == statistics.fmean(robust)
        assert float(summary[row]["robust_std"]) == statistics.stdev(robust)
        clean = [r["clean_acc"] for r in records]
        assert float(summary[row]["clean_mean"]) == statistics.fmean(clean)
        worst = [min(c["robust_acc"] for c in r["per_class"]) for r in records]
        assert float(summary[row]["worst_class_robust_mean"]) == statistics.fmean(worst)
        after_t = [next(a["robust_acc"] for a in r["per_attack"] if a["attack"] == "apgd-t")
                   for r in records]
        assert float(summary[row]["after_apgd-t_mean"]) == statistics.fmean(after_t)
    for png in ("robust_vs_clean.png", "per_class.png", "curves.png"):
        assert (out / png).stat().st_size > 0
    with open(out / "runs.csv", newline="") as f:     # per run: guard events, sanity flags
        runs = {row["run"]: row for row in csv.DictReader(f)}
    record = json.loads((out / "results" / "digits" / "Linf" / "gkl-s0.detailed.json").read_text())
    assert int(runs["gkl-s0"]["sanity_flags"]) == record["sanity"]["flags"]
    assert runs["gkl-s0"]["sanity_flagged"] == "; ".join(findings(record["sanity"]["rows"]))
    assert runs["gkl-s0"]["co_events"] != "" and runs["gkl-s0"]["machine"] == record["machine"]
    assert f"Machine: {record['machine']}" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_teacher_is_trained_first_then_distilled_and_has_its_own_row(tmp_path):
    """... and every run is scored on a corrupted copy of the test digits too."""
    from advgkl.data.corrupting import corrupt_dataset

    corrupt_dataset(dataset="digits", root="data", out=tmp_path / "digits-C",
                    corruptions=["fog", "contrast"], n=20, progress=False)
    tree = {**TINY, "seeds": [0], "checkpoint": "last.pt",
            "eval": {"n_examples": 20, "eps": "32/255", "batch_size": 20, "quick": "pgd-2",
                     "corruptions": "digits-C"},
            "teacher": {"name": "teacher", "overrides": ["model.arch=wrn-10-1"]},
            "rows": [{"name": "rslad", "overrides": ["loss.method=rslad",
                                                     "distill.teacher={teacher}"]}]}
    path = write_study(tmp_path, tree)
    study = load_study(path, tmp_path / "studies" / "tiny")
    assert [r.name for r in study.runs] == ["teacher-s0", "rslad-s0"]
    out = study_cli(path, "--run", "rslad-s0")          # its teacher is not trained yet
    assert out.returncode == 2 and "run it first (--run teacher-s0)" in out.stderr
    out = study_cli(path, "-j", "2")
    assert out.returncode == 0, out.stderr
    runs = tmp_path / "studies" / "tiny" / "runs"
    teacher = (runs / "teacher-s0" / "last.pt").resolve()
    assert f"teacher: {teacher}" in (runs / "rslad-s0" / "train.log").read_text()
    summary = (tmp_path / "studies" / "tiny" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["teacher", "rslad"]
    with open(tmp_path / "studies" / "tiny" / "runs.csv", newline="") as f:
        runs = {row["run"]: row for row in csv.DictReader(f)}
    record = json.loads((tmp_path / "studies" / "tiny" / "results" / "digits" / "corruptions" /
                         "rslad-s0.generated-partial.json").read_text())
    assert float(runs["rslad-s0"]["corruptions_acc"]) == record["corruptions_acc"]
    assert runs["rslad-s0"]["worst_corruption"] == record["worst_corruption"]["corruption"]
    summary_md = (tmp_path / "studies" / "tiny" / "summary.md").read_text()
    assert "corruptions (mean)" in summary_md and "Corruptions: digits-C (see" in summary_md
    assert (tmp_path / "studies" / "tiny" / "corruptions_rslad.png").stat().st_size > 0


@pytest.mark.slow
def test_concurrent_run_tasks_keep_each_others_failures(tmp_path):
    """Cluster tasks (`--run`) that fail at the same time each record their own failure."""
    path = write_study(tmp_path, {**TINY, "rows": [TINY["rows"][2]]})   # broken-s0, broken-s1
    procs = [subprocess.Popen([sys.executable, "-m", "advgkl", "study", str(path), "--run", name],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for name in ("broken-s0", "broken-s1")]
    for proc in procs:
        assert proc.wait() == 2 and "training failed" in proc.stderr.read()
    from advgkl.studies.study import failures
    study = load_study(path, tmp_path / "studies" / "tiny")
    assert sorted(failures(study)) == ["broken-s0", "broken-s1"]


def test_print_gives_one_command_per_run_and_a_slurm_array(tmp_path):
    path = write_study(tmp_path)
    out = study_cli(path, "--print")
    assert out.returncode == 0, out.stderr
    commands = out.stdout.splitlines()
    assert commands[0] == f"advgkl study {path} --run plain-s0" and len(commands) == 6
    script = (tmp_path / "studies" / "tiny" / "slurm_array.sh").read_text()
    assert "#SBATCH --array=0-5" in script and "--run $SLURM_ARRAY_TASK_ID" in script
    study = load_study(path, tmp_path / "studies" / "tiny")
    assert [r.name for r in study.runs][5] == "broken-s1"


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"rows": [{"name": "a", "overrides": ["train.epochz=3"]}]}, "row a: train.epochz"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "each row needs a unique plain name"),
    ({"rows": [{"name": ".."}]}, "each row needs a unique plain name"),
    ({"name": ".."}, "name '..' may hold letters"),
    ({"base": "missing.yaml"}, "base config missing.yaml not found"),
    ({"seeds": []}, "seeds a non-empty list"),
    ({"eval": {"eps": 8}}, "did you mean 8/255?"),
    ({"rows": [{"name": "a", "overrides": ["eval.check=none", "train.co_guard=off"]}]},
     "writes no best.pt"),
    ({"rows": [{"name": "a", "overrides": ["distill.teacher={teacher}"]}]},
     "row a names {teacher}, but the study has no teacher"),
    ({"teacher": {"overrides": []}}, "teacher must be a mapping with a name"),
])
def test_a_bad_study_file_is_refused_naming_what_is_wrong(tmp_path, change, message):
    path = write_study(tmp_path, {**TINY, **change})
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_study(path)


STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_loads_and_each_row_validates(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and any("Cost:" in line for line in lines if line[:1] == "#")
    assert any(f"advgkl study configs/studies/{path.name}" in line for line in lines[:6])
    study = load_study(path)
    teacher = 1 if study.teacher else 0
    assert len(study.runs) == (len(study.rows) - teacher) * len(study.seeds) + teacher >= 2

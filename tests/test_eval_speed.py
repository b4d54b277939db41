"""Faster evaluation that keeps standard AutoAttack: the fast paths give the plain path's robust
flags on the same points (and the record lists any that differ); bf16 is a labelled screening;
the batch can be sized by a probe."""

import json
from pathlib import Path

import pytest
import torch

from advgkl.cli import main
from advgkl.config import load_config
from advgkl.errors import UserError
from advgkl.evaluation.speed import probe_batch_size
from advgkl.training.loop import train

DEMO = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("speed") / "run"
    train(load_config(DEMO, ["train.epochs=3", "attack.steps=2", "eval.pgd_steps=1",
                             "eval.val_size=64"]), run, echo=False)
    return run / "last.pt"


def evaluate(checkpoint, out, name, *extra):
    """APGD-CE + APGD-T (the attacks a fast path changes; FAB-T and Square on the robust points
    would take minutes here) on 40 digits; the record's path and contents."""
    assert main(["eval", str(checkpoint), "--n-examples", "40", "--batch-size", "20", "--eps",
                 "32/255", "--version", "custom", "--attacks", "apgd-ce,apgd-t", "--out", str(out),
                 "--model-name", name, *extra]) == 0
    (path,) = (out / "digits" / "Linf").glob(f"{name}.*json")
    return path, json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--channels-last"], ["--channels-last", "--compile"]],
                         ids=["channels_last", "channels_last+compile"])
def test_fast_paths_give_the_plain_paths_robust_flags(checkpoint, tmp_path, flags, capsys):
    plain_path, plain = evaluate(checkpoint, tmp_path, "plain")
    _, fast = evaluate(checkpoint, tmp_path, "fast", *flags, "--cudnn-benchmark",
                       "--compare-with", str(plain_path))
    _, later = evaluate(checkpoint, tmp_path, "later")   # the same process, after the fast path
    assert "--cudnn-benchmark is a CUDA option; ignored on cpu" in capsys.readouterr().out
    # AutoAttack's checks raise no false flag: not for the compiled model (whose first call,
    # traced from a cold compile cache, builds its backward graph), nor for a later evaluation
    for record in (plain, fast, later):
        assert not any(c["fired"] for c in record["autoattack_checks"]), record["autoattack_checks"]
    assert fast["speed"] == {"channels_last": True, "compile": "--compile" in flags,
                             "cudnn_benchmark": False, "batch_size": 20,
                             "batch_size_probed": False, "precision": "fp32"}
    assert fast["flags_vs_reference"]["differ"] == 0 and fast["flags_vs_reference"]["points"] == []
    assert fast["result"]["robust_flags"] == plain["result"]["robust_flags"]
    assert 0 < sum(plain["result"]["robust_flags"]) < 40        # a test that could fail
    assert fast["label"] == plain["label"]                     # the same attack, labelled alike


def test_bf16_is_a_labelled_screening_compared_point_by_point(checkpoint, tmp_path):
    plain_path, plain = evaluate(checkpoint, tmp_path, "plain")
    path, screen = evaluate(checkpoint, tmp_path, "screen", "--precision", "bf16",
                            "--compare-with", str(plain_path))
    assert path.name == "screen.custom-bf16.json"            # never a model_info record
    assert "NON-STANDARD" in screen["label"] and screen["result"]["precision"] == "bf16"
    compared = screen["flags_vs_reference"]
    differ = [i for i, (a, b) in enumerate(zip(screen["result"]["robust_flags"],
                                               plain["result"]["robust_flags"])) if a != b]
    assert compared["points"] == differ and compared["differ"] == len(differ)


def test_batch_size_auto_probes_the_gpu_and_is_recorded(checkpoint, tmp_path):
    _, record = evaluate(checkpoint, tmp_path, "auto", "--batch-size", "auto")
    assert record["speed"]["batch_size"] == 40 and record["speed"]["batch_size_probed"]
    cuda = torch.device("cuda")  # the probe's logic, with a stand-in for the GPU's memory
    assert probe_batch_size(None, torch.zeros(1), cuda, limit=10_000,
                            fits=lambda m, s, b, d: b <= 256) == 128
    assert probe_batch_size(None, torch.zeros(1), cuda, limit=100,
                            fits=lambda m, s, b, d: b <= 256) == 100
    with pytest.raises(UserError, match="not even 32 images fit"):
        probe_batch_size(None, torch.zeros(1), cuda, limit=100, fits=lambda m, s, b, d: False)

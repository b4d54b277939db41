"""`advgkl eval --robustbench NAME`: a model-zoo entry, loaded by RobustBench's own loader from a
weights file placed beforehand (offline), runs through the same evaluation and records."""

import json

import pytest
import torch

import advgkl.evaluation.job as eval_job
from advgkl.checkpoint import sha256_file
from advgkl.cli import main
from advgkl.compat import import_robustbench
from advgkl.data.tensors import Split

robustbench = import_robustbench()  # registers the autoattack adapter first
from robustbench.model_zoo.architectures.wide_resnet import WideResNet  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402
from robustbench.utils import all_models  # noqa: E402

ENTRY = "Advgkl2026Tiny"


def fake_cifar10_test(dataset, *, train, root="data", download=False):
    """CIFAR-10's test split is not on this machine (no download): 40 random 32x32 images."""
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(40) % 10)


@pytest.fixture
def zoo_entry(tmp_path, monkeypatch):
    """An entry registered as RobustBench registers its zoo, with RobustBench's own WideResNet
    class (depth 10, width 1) and random weights in MODEL_DIR/cifar10/Linf/ENTRY.pt."""
    entries = all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(entries, ENTRY, {"model": lambda: WideResNet(depth=10, widen_factor=1),
                                         "gdrive_id": "placed-beforehand"})
    torch.manual_seed(0)
    weights = tmp_path / "models" / "cifar10" / "Linf" / f"{ENTRY}.pt"
    weights.parent.mkdir(parents=True)
    model = WideResNet(depth=10, widen_factor=1)
    torch.save(model.state_dict(), weights)
    monkeypatch.setattr(eval_job, "load_split", fake_cifar10_test)
    return model.eval(), weights


def test_a_zoo_entry_is_evaluated_offline_with_standard_autoattack(zoo_entry, tmp_path, capsys):
    model, weights = zoo_entry
    out = tmp_path / "res"
    assert main(["eval", "--robustbench", ENTRY, "--model-dir", str(tmp_path / "models"),
                 "--n-examples", "20", "--batch-size", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RobustBench's leaderboard: no numbers in the installed robustbench" in printed
    records = out / "cifar10" / "Linf"
    detailed = json.loads((records / f"{ENTRY}.detailed.json").read_text())
    assert detailed["checkpoint"] == f"robustbench:cifar10/Linf/{ENTRY}"
    assert detailed["weights"] == "zoo" and detailed["architecture"] == "WideResNet"
    assert detailed["checkpoint_sha256"] == sha256_file(weights)
    assert detailed["config"]["robustbench"]["entry"] == ENTRY
    assert json.loads((records / f"{ENTRY}.json").read_text())["eps"] == "8/255"
    split = fake_cifar10_test("cifar10", train=False)
    with torch.no_grad():
        pred = model(split.images[:20].float() / 255).argmax(1)
    assert detailed["result"]["clean_flags"] == (pred == split.labels[:20]).tolist()


def test_leaderboard_numbers_are_recorded_when_robustbench_has_them(zoo_entry, tmp_path,
                                                                    monkeypatch, capsys):
    root = tmp_path / "rb_checkout" / "robustbench"
    info = root.parent / "model_info" / "cifar10" / "Linf" / f"{ENTRY}.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"clean_acc": "12.34", "autoattack_acc": "5.67"}))
    monkeypatch.setattr(robustbench, "__file__", str(root / "__init__.py"))
    assert main(["eval", "--robustbench", ENTRY, "--model-dir", str(tmp_path / "models"),
                 "--n-examples", "10", "--quick", "pgd-2", "--out", str(tmp_path / "res")]) == 0
    assert "RobustBench's leaderboard: clean 12.34%, AutoAttack 5.67%" in capsys.readouterr().out
    record = json.loads((tmp_path / "res" / "cifar10" / "Linf" / f"{ENTRY}.pgd-2.json").read_text())
    assert record["config"]["robustbench"]["leaderboard"]["autoattack_acc"] == "5.67"


@pytest.mark.parametrize("args, message", [
    (["--robustbench", "Nope2099"], "no such entry in RobustBench's cifar10 Linf zoo"),
    (["--robustbench", ENTRY, "--dataset", "digits"], "evaluated here are cifar10, cifar100"),
    (["--robustbench", ENTRY, "--model-dir", "elsewhere"], "no weights at elsewhere"),
    (["x.pt", "--robustbench", ENTRY], "give a CHECKPOINT or --robustbench NAME"),
])
def test_zoo_mistakes_are_one_line(zoo_entry, args, message, tmp_path, monkeypatch, capsys):
    import robustbench.utils

    def offline(*a, **kw):  # the machine's edge: no download is possible here
        raise ConnectionError("offline")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *args, "--n-examples", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err

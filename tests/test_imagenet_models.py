"""timm models and RobustBench's ConvStem variants: the same keys and outputs as RobustBench's
classes; `model.init` from every accepted source, loaded strictly or refused in one line; an
ImageNet zoo entry evaluated through --robustbench as RobustBench's own loader gives it."""

import json

import pytest
import torch
from safetensors.torch import save_file

from advgkl.checkpoint import model_checkpoint, save_checkpoint
from advgkl.cli import main
from advgkl.compat import import_robustbench
from advgkl.errors import UserError
from advgkl.models import create_model
from advgkl.models.imagenet import CONVSTEM
from advgkl.training.init_weights import load_init

import_robustbench()
from robustbench.model_zoo.architectures.convstem_models import get_convstem_models  # noqa: E402
from robustbench.model_zoo.architectures.utils_architectures import normalize_model  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402
from robustbench.utils import all_models, load_model  # noqa: E402
from trees import config, one_line_error  # noqa: E402

ENTRY = "Advgkl2026TinyImageNet"


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CONVSTEM))
def test_convstem_models_have_robustbench_keys_and_shapes(arch):
    ours, theirs = create_model(arch, 1000), get_convstem_models(CONVSTEM[arch].robustbench)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convstem-convnext-t", "convstem-convnext-b", "convstem-vit-s"])
def test_convstem_models_give_robustbench_outputs_with_the_same_weights(arch):
    torch.manual_seed(0)
    theirs = get_convstem_models(CONVSTEM[arch].robustbench).eval()
    ours = create_model(arch, 1000).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def _tiny():
    return create_model("timm:test_efficientnet", 1000)


def test_model_init_loads_each_source_strictly(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = _tiny()
    inner = {k: v.clone() for k, v in source.model.state_dict().items()}
    timm_file, st_file, ckpt_file = (tmp_path / "w.pth", tmp_path / "w.safetensors",
                                     tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in inner.items()}}, timm_file)
    save_file({k: v.contiguous() for k, v in inner.items()}, str(st_file))
    save_checkpoint(ckpt_file, model_checkpoint(source.state_dict(), arch="timm:test_efficientnet",
                                                num_classes=1000))
    zoo_dir = _zoo_entry(tmp_path, monkeypatch, source)
    for spec in (timm_file, st_file, ckpt_file, f"robustbench:imagenet/Linf/{ENTRY}"):
        torch.manual_seed(2)
        model = _tiny()
        info = load_init(model, str(spec), arch="timm:test_efficientnet", model_dir=zoo_dir)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
        assert len(info["sha256"]) == 64
    with pytest.raises(UserError, match="do not fit this architecture"):
        load_init(create_model("timm:test_vit", 1000), str(st_file), arch="timm:test_vit",
                  model_dir=zoo_dir)
    with pytest.raises(UserError, match="a different number of classes"):
        load_init(create_model("timm:test_efficientnet", 10), str(st_file),
                  arch="timm:test_efficientnet", model_dir=zoo_dir)


def _zoo_entry(tmp_path, monkeypatch, model):
    """An ImageNet entry registered as RobustBench registers its zoo (normalize_model around a
    timm network), its weights placed in MODEL_DIR/imagenet/Linf/ENTRY.pt as RobustBench keeps
    ImageNet files (the bare network's keys)."""
    entries = all_models[BenchmarkDataset.imagenet][ThreatModel.Linf]
    import timm

    monkeypatch.setitem(entries, ENTRY, {
        "model": lambda: normalize_model(timm.create_model("test_efficientnet"),
                                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "gdrive_id": "placed-beforehand", "preprocessing": "Res256Crop224"})
    weights = tmp_path / "models" / "imagenet" / "Linf" / f"{ENTRY}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.model.state_dict(), weights)
    return str(tmp_path / "models")


@pytest.mark.slow
def test_an_imagenet_zoo_entry_evaluates_as_robustbench_loads_it(tree, tmp_path, monkeypatch):
    from robustbench.data import PREPROCESSINGS, load_imagenet

    torch.manual_seed(3)
    zoo_dir = _zoo_entry(tmp_path, monkeypatch, _tiny())
    out = tmp_path / "res"
    assert main(["eval", "--robustbench", ENTRY, "--dataset", "imagenet", "--model-dir",
                 zoo_dir, "--data-root", str(tree), "--n-examples", "6", "--quick", "pgd-1",
                 "--out", str(out)]) == 0
    record = json.loads((out / "imagenet" / "Linf" / f"{ENTRY}.pgd-1.json").read_text())
    assert record["data"]["preprocessing"] == "Res256Crop224"
    assert record["config"]["robustbench"]["preprocessing"] == "Res256Crop224"
    x, y = load_imagenet(6, str(tree), PREPROCESSINGS["Res256Crop224"])
    theirs = load_model(ENTRY, model_dir=zoo_dir, dataset="imagenet", threat_model="Linf")
    with torch.no_grad():
        flags = (theirs(x).argmax(1) == y).tolist()
    assert record["result"]["clean_flags"] == flags and record["result"]["labels"] == y.tolist()


@pytest.mark.parametrize("init, message", [
    ("missing.pth", "missing.pth not found"),
    ("robustbench:imagenet/Linf/Nope2099", "no such entry"),
    ("robustbench:imagenet/Linf/" + ENTRY, "no weights at"),
])
def test_a_bad_init_is_one_line_and_leaves_nothing(init, message, tree, tmp_path, monkeypatch,
                                                   capsys):
    import robustbench.utils

    entries = all_models[BenchmarkDataset.imagenet][ThreatModel.Linf]
    monkeypatch.setitem(entries, ENTRY, {"model": _tiny, "gdrive_id": "x",
                                         "preprocessing": "Res256Crop224"})

    def offline(*a, **kw):  # the machine's edge: no download is possible here
        raise ConnectionError("offline")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, tree, model={"init": init, "model_dir": "zoo"})
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "zoo").exists()


def test_model_init_from_a_cifar_zoo_entry(tmp_path, monkeypatch):
    """A CIFAR-10 entry (RobustBench's WideResNet-10-1) initialises our wrn-10-1 strictly."""
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    entries = all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(entries, "Advgkl2026TinyCifar", {
        "model": lambda: WideResNet(depth=10, widen_factor=1), "gdrive_id": "placed"})
    torch.manual_seed(4)
    theirs = WideResNet(depth=10, widen_factor=1)
    weights = tmp_path / "models" / "cifar10" / "Linf" / "Advgkl2026TinyCifar.pt"
    weights.parent.mkdir(parents=True)
    torch.save(theirs.state_dict(), weights)
    ours = create_model("wrn-10-1", 10)
    load_init(ours, "robustbench:cifar10/Linf/Advgkl2026TinyCifar", arch="wrn-10-1",
              model_dir=str(tmp_path / "models"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-6)

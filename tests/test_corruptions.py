"""RobustBench's common-corruption boards: every cell, the mean and the mCE equal RobustBench's
own loaders and `corruptions_evaluation` on files in the released layouts (CIFAR-10-C .npy
blocks, sparse; an ImageNet-C tree of generated JPEGs); a zoo entry scores as RobustBench scores
it; a killed evaluation resumes with the same numbers and two shards merge to one run; the
export matches RobustBench's corruptions model_info field for field; bad input is one line;
`advgkl data corrupt` runs every corruption at the digits' size."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import kill_when
from torch import nn
from trees import write_jpeg

import advgkl.evaluation.job as eval_job
from advgkl.checkpoint import model_checkpoint, save_checkpoint
from advgkl.cli import main
from advgkl.compat import import_robustbench
from advgkl.data.corrupted import SEVERITIES
from advgkl.data.corrupting import corrupt_image
from advgkl.data.folders import imagenet_point_ids, imagenet_wnids
from advgkl.data.tensors import Split
from advgkl.evaluation.corruptions import (CORRUPTIONS, CORRUPTIONS_3DCC, CorruptionResult,
                                           alexnet_accuracies, cell_key)
from advgkl.models import create_model

robustbench = import_robustbench()
import robustbench.eval as rb_eval  # noqa: E402
from robustbench.data import CORRUPTIONS as RB_CORRUPTIONS  # noqa: E402
from robustbench.data import CORRUPTIONS_3DCC as RB_CORRUPTIONS_3DCC  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402
from robustbench.utils import all_models, load_model  # noqa: E402

N = 12


def fake_cifar10_test(dataset, *, train, root="data", download=False):
    """CIFAR-10's test split is not on this machine (no download): 40 random 32x32 images."""
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(40) % 10)


def colour(label):
    """trees.py's write_jpeg colour of a class, in [0, 255]."""
    return np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], np.float64)


class ColourModel(nn.Module):
    """A classifier that can be right on the generated images: the class whose colour
    (`colour`) is nearest the image's mean colour."""

    def __init__(self, classes=1000):
        super().__init__()
        self.colours = nn.Parameter(torch.tensor(np.stack([colour(k) for k in range(classes)]),
                                                 dtype=torch.float32) / 255)

    def forward(self, x):
        return -100 * torch.cdist(x.mean((2, 3)), self.colours)


@pytest.fixture(scope="module")
def cifar_c(tmp_path_factory):
    """DATA/CIFAR-10-C as released: 15 x uint8 (50,000, 32, 32, 3) and labels.npy, written
    sparse, only the first N images of each severity's block filled (what a cell reads): images
    of their class's colour, noisier with the severity and the corruption's rank."""
    data = tmp_path_factory.mktemp("data")
    folder = data / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    base = np.stack([colour(k) for k in labels])[:, None, None, :]
    for k, corruption in enumerate(CORRUPTIONS):
        images = np.lib.format.open_memmap(folder / f"{corruption}.npy", mode="w+",
                                           dtype=np.uint8, shape=(50_000, 32, 32, 3))
        for s in SEVERITIES:
            noise = rng.normal(0, 30 * s + 6 * k, (N, 32, 32, 3))
            images[(s - 1) * 10_000:(s - 1) * 10_000 + N] = np.clip(base + noise, 0, 255)
        images.flush()
    all_labels = np.zeros(50_000, dtype=np.int64)
    all_labels[:N] = labels
    np.save(folder / "labels.npy", all_labels)
    return data


CIFAR_ENTRY = "Advgkl2026ColoursCifar"


@pytest.fixture
def cifar_zoo_entry(tmp_path, monkeypatch):
    """A colour-model entry in RobustBench's CIFAR-10 corruptions zoo, its weights placed where
    RobustBench's loader looks; the clean test points' stand-in."""
    entries = all_models[BenchmarkDataset.cifar_10][ThreatModel.corruptions]
    monkeypatch.setitem(entries, CIFAR_ENTRY, {"model": lambda: ColourModel(10),
                                               "gdrive_id": "placed"})
    weights = tmp_path / "models" / "cifar10" / "corruptions" / f"{CIFAR_ENTRY}.pt"
    weights.parent.mkdir(parents=True)
    torch.save(ColourModel(10).state_dict(), weights)
    monkeypatch.setattr(eval_job, "load_split", fake_cifar10_test)
    return tmp_path / "models"


def test_the_boards_are_robustbench_s_and_the_mce_reproduces_its_published_numbers():
    """The corruption lists are robustbench's; from RobustBench's per-cell accuracies of
    Standard_R50 (its unaggregated_results[_3d].csv, commit fe235fb) our mean and mCE give its
    model_info numbers: 39.48 / 76.38 on ImageNet-C, 47.12 / 73.16 on ImageNet-3DCC."""
    assert CORRUPTIONS == tuple(RB_CORRUPTIONS)
    assert CORRUPTIONS_3DCC == tuple(RB_CORRUPTIONS_3DCC)
    standard_r50 = {  # RobustBench's CSV rows, cells in its order (corruption, severity 1-5)
        "corruptions": [
            .5828, .4486, .2856, .1026, .0352, .636, .5342, .3754, .2158, .1452, .5468,
            .312, .3494, .2344, .165, .638, .6434, .4598, .293, .2088, .602, .4878, .3124,
            .1422, .0288, .5914, .5154, .3808, .2752, .1824, .736, .7222, .6958, .6496,
            .5886, .6092, .56, .4674, .4024, .236, .5258, .4302, .356, .2844, .2194, .6106,
            .4366, .3064, .2864, .2258, .5362, .3974, .1708, .1306, .1034, .4854, .3862,
            .2904, .113, .0244, .6428, .5824, .466, .2098, .0542, .6644, .6234, .6004,
            .4786, .3254, .6684, .4514, .5456, .4122, .1702],
        "corruptions_3d": [
            .667, .6298, .5892, .559, .523, .6708, .6064, .5372, .4888, .4456, .6338,
            .5696, .4886, .4026, .2476, .73, .7176, .6776, .5074, .1854, .4924, .4532,
            .3976, .3312, .2196, .6542, .5176, .4016, .3128, .2526, .7064, .6964, .6464,
            .514, .5216, .7078, .7064, .6888, .655, .6248, .406, .37, .2896, .19, .0804,
            .555, .519, .4644, .399, .2828, .5112, .3934, .2972, .2292, .179, .476, .3978,
            .328, .276, .2492]}
    published = {"corruptions": ("39.48", "76.38"), "corruptions_3d": ("47.12", "73.16")}
    for threat, names in (("corruptions", CORRUPTIONS), ("corruptions_3d", CORRUPTIONS_3DCC)):
        accs = iter(standard_r50[threat])
        cells = {cell_key(c, s): round(next(accs) * 5000) for c in names for s in SEVERITIES}
        result = CorruptionResult(threat, "imagenet", list(names), 5000, 3836, cells)
        got = (str(round(100 * result.corruptions_acc, 2)), str(round(100 * result.mce(), 2)))
        assert got == published[threat]
        alexnet = alexnet_accuracies(threat)
        assert list(alexnet) == list(names)          # every corruption, RobustBench's order
    assert CorruptionResult("corruptions", "cifar10", list(CORRUPTIONS), 10, 5,
                            {cell_key(c, s): 5 for c in CORRUPTIONS for s in SEVERITIES}).mce() \
        is None                                      # no AlexNet cells for CIFAR


@pytest.fixture
def cifar_checkpoint(tmp_path, monkeypatch):
    """A wrn-10-1 CIFAR-10 checkpoint (random weights) and the clean test points' stand-in."""
    torch.manual_seed(0)
    path = tmp_path / "wrn" / "last.pt"
    save_checkpoint(path, model_checkpoint(create_model("wrn-10-1", 10).state_dict(),
                                           arch="wrn-10-1", num_classes=10,
                                           config={"data": {"dataset": "cifar10"}}))
    monkeypatch.setattr(eval_job, "load_split", fake_cifar10_test)
    return path


@pytest.mark.slow
def test_a_zoo_entry_s_cifar10_c_cells_and_mean_equal_robustbench_s(cifar_c, cifar_zoo_entry,
                                                                     tmp_path):
    out = tmp_path / "res"
    assert main(["eval", "--robustbench", CIFAR_ENTRY, "--dataset", "cifar10", "--threat",
                 "corruptions", "--model-dir", str(cifar_zoo_entry), "--data-root", str(cifar_c),
                 "--n-examples", str(N), "--batch-size", "5", "--out", str(out)]) == 0
    detailed = json.loads((out / "cifar10" / "corruptions" /
                           f"{CIFAR_ENTRY}.detailed.json").read_text())
    assert detailed["checkpoint"] == f"robustbench:cifar10/corruptions/{CIFAR_ENTRY}"
    # RobustBench's own loader and clean_accuracy, cell by cell, on the entry RobustBench loads
    # (its corruptions_evaluation cannot run on CIFAR: robustbench 1.1.1 passes its CIFAR loader
    # a `prepr` it does not take, and would then look for an AlexNet row its CIFAR files lack)
    from robustbench.data import load_cifar10c
    from robustbench.utils import clean_accuracy

    model = load_model(CIFAR_ENTRY, model_dir=str(cifar_zoo_entry), dataset="cifar10",
                       threat_model="corruptions")
    with pytest.raises(TypeError, match="prepr"):
        rb_eval.corruptions_evaluation(5, str(cifar_c), BenchmarkDataset.cifar_10,
                                       ThreatModel.corruptions, torch.device("cpu"), model, N,
                                       False, None, CIFAR_ENTRY)
    seen = {}
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            x, y = load_cifar10c(N, s, str(cifar_c), corruptions=[c])
            seen[(c, s)] = clean_accuracy(model, x, y, batch_size=5)
    theirs = pd.DataFrame(seen, index=[CIFAR_ENTRY]).values.mean()  # corruptions_evaluation's
    ours = [r["accuracy"] for r in detailed["cells"][1:]]
    assert ours == list(seen.values())                            # every cell, exactly
    assert detailed["corruptions_acc"] == theirs                  # the mean, exactly
    assert len(set(ours)) >= 4, ours                              # cells that differ
    clean = fake_cifar10_test("cifar10", train=False)
    assert detailed["clean_acc"] == clean_accuracy(model, clean.images[:N].float() / 255,
                                                   clean.labels[:N], batch_size=5)
    assert detailed["mce"] is None and "KeyError: 'AlexNet'" in detailed["mce_reference"]


@pytest.mark.slow
def test_the_corruptions_export_matches_robustbench_s_files_field_for_field(cifar_c,
                                                                            cifar_checkpoint,
                                                                            tmp_path):
    out = tmp_path / "res"
    assert main(["eval", str(cifar_checkpoint), "--threat", "corruptions", "--data-root",
                 str(cifar_c), "--n-examples", str(N), "--batch-size", "6", "--out", str(out),
                 "--footnote", "Trained for Linf robustness."]) == 0
    records = out / "cifar10" / "corruptions"
    detailed = json.loads((records / "wrn.detailed.json").read_text())
    assert (records / "wrn.cells.csv").read_text().count("\n") == 77
    assert (records / "wrn.heatmap.png").stat().st_size > 0
    info = json.loads((records / "wrn.json").read_text())
    # RobustBench's model_info/cifar10/corruptions/Gowal2020Uncovering_70_16_Linf.json
    assert list(info) == ["link", "name", "authors", "additional_data", "number_forward_passes",
                          "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                          "corruptions_acc", "footnote"]
    assert info["eps"] is None and info["architecture"] == "WideResNet-10-1"
    assert info["corruptions_acc"] == str(round(100 * detailed["corruptions_acc"], 2))
    assert main(["export", str(cifar_checkpoint), "--eval", str(records / "wrn.json"),
                 "--out", str(tmp_path / "bundle"), "--allow-partial"]) == 0
    bundle = tmp_path / "bundle"
    exported = json.loads((bundle / "wrn.json").read_text())
    assert list(exported) == list(info) and "PARTIAL" in exported["footnote"]
    assert "common_corruptions OrderedDict" in (bundle / "model_zoo_entry.py").read_text()
    assert "Threat model**: Common Corruptions" in (bundle / "new_model_issue.md").read_text()


class Wrapped(nn.Module):   # RobustBench's ImageNet entries hold their network as `.model`
    def __init__(self):
        super().__init__()
        self.model = ColourModel(1000)

    def forward(self, x):
        return self.model(x)


IMAGENET_ENTRY = "Advgkl2026Colours"


@pytest.fixture
def imagenet_c(tree, tmp_path, monkeypatch):
    """A colour-model entry in RobustBench's ImageNet corruptions zoo (weights placed where its
    loader looks) and ImageNet-C for one corruption: the 1,000 wnid folders of each severity,
    RobustBench's first 8 points as JPEGs, noisier with the severity."""
    entries = all_models[BenchmarkDataset.imagenet][ThreatModel.corruptions]
    monkeypatch.setitem(entries, IMAGENET_ENTRY, {"model": Wrapped, "gdrive_id": "placed",
                                                  "preprocessing": "Res256Crop224"})
    weights = tmp_path / "models" / "imagenet" / "corruptions" / f"{IMAGENET_ENTRY}.pt"
    weights.parent.mkdir(parents=True)
    torch.save(ColourModel(1000).state_dict(), weights)
    root = tmp_path / "ImageNet-C"
    rng = np.random.default_rng(0)
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    for s in SEVERITIES:
        for wnid in imagenet_wnids():
            (root / "fog" / str(s) / wnid).mkdir(parents=True)
        for pid in imagenet_point_ids()[:8]:
            write_jpeg(root / "fog" / str(s) / pid, index[pid.split("/")[0]], rng,
                       size=(40 + 8 * s, 44))
    return root


@pytest.mark.slow
def test_imagenet_c_cells_mean_and_mce_equal_robustbench_s_benchmark(imagenet_c, tree, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "res"
    assert main(["eval", "--robustbench", IMAGENET_ENTRY, "--dataset", "imagenet", "--threat",
                 "corruptions", "--model-dir", str(tmp_path / "models"), "--data-root", str(tree),
                 "--corruptions-dir", str(imagenet_c), "--corruptions", "fog", "--n-examples",
                 "8", "--batch-size", "4", "--out", str(out)]) == 0
    ours = json.loads((out / "imagenet" / "corruptions" /
                       f"{IMAGENET_ENTRY}.partial.json").read_text())
    # RobustBench's benchmark on the same entry and files (its corruption list cut to fog, as
    # ours; AlexNet's cells from our copy of its CSV, in the working folder where it reads it)
    monkeypatch.setitem(rb_eval.CORRUPTIONS_DICT[BenchmarkDataset.imagenet],
                        ThreatModel.corruptions, ("fog",))
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "model_info" / "imagenet" / "corruptions" / "unaggregated_results.csv"
    csv.parent.mkdir(parents=True)
    cols = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    alexnet = alexnet_accuracies("corruptions")
    csv.write_text("," + ",".join(c for c, _ in cols) + "\n," + ",".join(str(s) for _, s in cols)
                   + "\nAlexNet," + ",".join(str(alexnet[c][s - 1]) for c, s in cols) + "\n")
    model = load_model(IMAGENET_ENTRY, model_dir=str(tmp_path / "models"), dataset="imagenet",
                       threat_model="corruptions")
    clean, theirs = rb_eval.benchmark(
        model, n_examples=8, dataset="imagenet", threat_model="corruptions", to_disk=True,
        model_name=IMAGENET_ENTRY, data_dir=str(tree), corruptions_data_dir=str(tmp_path),
        batch_size=4)
    info = json.loads((tmp_path / "model_info" / "imagenet" / "corruptions" /
                       f"{IMAGENET_ENTRY}.json").read_text())
    assert ours["clean_acc"] == clean and ours["corruptions_acc"] == theirs
    assert info["corruptions_mce"] == str(round(100 * ours["mce"], 2))
    accs = [r["accuracy"] for r in ours["cells"][1:]]
    assert len(accs) == 5 and len(set(accs)) > 1 and max(accs) > 0   # cells that differ


@pytest.mark.slow
def test_a_killed_evaluation_resumes_and_two_shards_merge_to_one_run(demo_run, tmp_path):
    """On a digits-C made by `advgkl data corrupt` (4 corruptions): SIGKILL mid-way, then the
    same command gives the uninterrupted run's cells; shards 0/2 and 1/2 merge to them too."""
    corrupted = tmp_path / "digits-C"
    made = subprocess.run([sys.executable, "-m", "advgkl", "data", "corrupt", "--dataset",
                           "digits", "--out", str(corrupted), "--n", "40", "--corruptions",
                           "gaussian_noise,fog,glass_blur,contrast"], capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stderr
    index = json.loads((corrupted / "index.json").read_text())
    assert index["complete"] and "not the released sets" in index["note"]
    common = [str(demo_run / "last.pt"), "--threat", "corruptions", "--corruptions-dir",
              str(corrupted), "--batch-size", "1"]

    def cells(out, name):
        record = out / "digits" / "corruptions" / f"{name}.generated-partial.json"
        return [(r["corruption"], r["severity"], r["correct"])
                for r in json.loads(record.read_text())["cells"]]

    assert main(["eval", *common, "--out", str(tmp_path / "whole"), "--model-name", "m"]) == 0
    state = tmp_path / "state.json"
    args = [sys.executable, "-m", "advgkl", "eval", *common, "--out", str(tmp_path / "cut"),
            "--model-name", "m", "--state", str(state)]
    kill_when(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
              lambda: state.exists() and 3 <= len(json.loads(state.read_text())["cells"]) < 20)
    done_before = len(json.loads(state.read_text())["cells"])
    assert not (tmp_path / "cut" / "digits" / "corruptions" / "m.generated-partial.json").exists()
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert cells(tmp_path / "cut", "m") == cells(tmp_path / "whole", "m")
    assert done_before < 20 and f"{done_before}/20" in resumed.stderr   # continued, not redone

    for i in (0, 1):
        assert main(["eval", *common, "--out", str(tmp_path / "shards"), "--model-name", "m",
                     "--shard", f"{i}/2"]) == 0
    shards = sorted((tmp_path / "shards" / "digits" / "corruptions").glob("m.shard-*.json"))
    assert main(["eval-merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    assert cells(tmp_path / "merged", "m") == cells(tmp_path / "whole", "m")


def test_every_corruption_runs_at_the_digits_size_deterministically():
    """All 15 of RobustBench's corruptions through imagecorruptions (its fog and glass blur on
    today's NumPy and scikit-image through advgkl.compat) at 32 px, the size the digits are
    corrupted at; the same seed gives the same image, and the image changes."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for corruption in CORRUPTIONS:
        for s in (1, 5):
            out = corrupt_image(image, corruption, s, seed=7)
            assert out.dtype == np.uint8 and out.shape == image.shape, corruption
            assert np.array_equal(out, corrupt_image(image, corruption, s, seed=7)), corruption
            assert not np.array_equal(out, image), corruption
    assert not hasattr(np, "float_")   # the compat layer touched imagecorruptions only


def _ckpt(tmp_path, dataset="digits", classes=10):
    path = tmp_path / "m" / "last.pt"
    save_checkpoint(path, model_checkpoint(create_model("small-cnn", classes).state_dict(),
                                           arch="small-cnn", num_classes=classes,
                                           config={"data": {"dataset": dataset}}))
    return path


def _npy_set(folder, n=4, shape=(16, 16, 3), dtype=np.uint8, labels=None):
    folder.mkdir(parents=True)
    for c in CORRUPTIONS:
        np.save(folder / f"{c}.npy", np.zeros((5 * n, *shape), dtype=dtype))
    np.save(folder / "labels.npy", np.zeros(5 * n if labels is None else labels, np.int64))
    (folder / "index.json").write_text(json.dumps({"created": "now", "settings": {
        "points": n, "corruptions": list(CORRUPTIONS)}}))
    return folder


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: _npy_set(d).joinpath("fog.npy").unlink(), [], "fog.npy: missing"),
    (lambda d: _npy_set(d, shape=(16, 16)), [], "expected uint8 (5 x N, H, W, 3)"),
    (lambda d: _npy_set(d, dtype=np.float32), [], "float32"),
    (lambda d: _npy_set(d, labels=7), [], "7 labels for the 20 images"),
    (_npy_set, ["--corruptions", "fog,rain"], "--corruptions: rain not among"),
    (_npy_set, ["--eps", "8/255"], "--eps: the corruption boards have no eps"),
    (_npy_set, ["--norm", "Linf"], "--norm and --threat"),
    (None, [], "digits has no released corruption set"),
])
def test_bad_corruption_input_is_one_line_and_writes_nothing(make, extra, message, tmp_path,
                                                             capsys):
    ckpt, corrupted, out = _ckpt(tmp_path), tmp_path / "digits-C", tmp_path / "out"
    if make is not None:
        make(corrupted)
    assert main(["eval", str(ckpt), "--threat", "corruptions", "--corruptions-dir",
                 str(corrupted), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("severity", "fog/3: missing (corruption fog, severity 3)"),
    ("wnids", "has 999 class folders, ImageNet's are the 1000 wnids"),
    ("jpeg", "n01440764_"),
])
def test_bad_imagenet_c_trees_are_one_line(imagenet_c, tree, tmp_path, damage, message, capsys):
    fog = imagenet_c / "fog"
    if damage == "severity":
        shutil.rmtree(fog / "3")
    elif damage == "wnids":
        shutil.rmtree(fog / "1" / imagenet_wnids()[-1])
    else:
        first = fog / "1" / imagenet_point_ids()[0]
        message = f"{first.name}"
        first.write_bytes(b"not a jpeg")
    assert main(["eval", "--robustbench", IMAGENET_ENTRY, "--dataset", "imagenet", "--threat",
                 "corruptions", "--model-dir", str(tmp_path / "models"), "--data-root",
                 str(tree), "--corruptions-dir", str(imagenet_c), "--corruptions", "fog",
                 "--n-examples", "2", "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "advgkl: error: " in err[-1] and message in err[-1], err   # after the bar, if any
    assert damage == "jpeg" or len(err) == 1             # refused before any cell ran
    assert not (tmp_path / "res").exists()


def test_a_corruptions_record_is_refused_by_a_linf_export(cifar_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    records = tmp_path / "res" / "cifar10" / "corruptions"
    records.mkdir(parents=True)
    (records / "wrn.json").write_text("{}")
    (records / "wrn.detailed.json").write_text(json.dumps({"board": "corruptions"}))
    assert main(["export", str(cifar_checkpoint), "--eval", str(records / "wrn.json"),
                 "--threat", "Linf", "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "a record of the corruptions board; --threat Linf exports Linf records" in err
    assert not (tmp_path / "bundle").exists()
    assert not os.listdir(data)

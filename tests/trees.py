"""Small ImageNet-format folder trees of generated JPEGs, made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from advgkl.data.folders import imagenet_point_ids, imagenet_wnids


def write_jpeg(path: Path, label: int, rng: np.random.Generator, size=(40, 48)) -> None:
    """A noisy image whose mean colour depends on its class, with saturated pixels."""
    base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], np.float64)
    pixels = base + rng.normal(0, 60, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def imagenet_tree(root: Path, *, n_val: int = 8, per_class: int = 6, seed: int = 0) -> list[str]:
    """ROOT/train and ROOT/val with all 1000 wnid folders (most empty): `per_class` training
    images for each class of RobustBench's first `n_val` ImageNet points, and those points in
    val under their RobustBench names. Returns the classes that hold images."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for wnid in imagenet_wnids():
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
    ids = imagenet_point_ids()[:n_val]
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    classes = sorted({pid.split("/")[0] for pid in ids})
    for pid in ids:
        write_jpeg(root / "val" / pid, index[pid.split("/")[0]], rng, size=(44, 36))
    for wnid in classes:
        for k in range(per_class):
            write_jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", index[wnid], rng)
    return classes


def folder_tree(root: Path, *, classes=("cat", "dog", "eel"), per_class: int = 5,
                n_val: int = 2, seed: int = 0) -> None:
    """Any ImageFolder tree: `classes` with `per_class` training and `n_val` val images each."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for k in range(per_class):
            write_jpeg(root / "train" / name / f"{k}.jpg", label, rng)
        for k in range(n_val):
            write_jpeg(root / "val" / name / f"v{k}.jpg", label, rng)


TINY = {"data": {"dataset": "imagenet", "image_size": 32, "preprocessing": "Res36Crop32",
                 "augment": "imagenet", "num_workers": 2},
        "model": {"arch": "timm:test_efficientnet"},
        "attack": {"eps": "4/255", "step_size": "2/255", "steps": 2},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "device": "cpu"},
        "eval": {"check": "val", "val_size": 8, "batch_size": 8, "eps": "4/255", "pgd_steps": 2}}


def config(tmp_path, root, **sections):
    body = {k: dict(v) for k, v in TINY.items()}
    body["data"]["root"] = str(root)
    body["run"] = {"out_dir": str(tmp_path / "runs")}
    for section, values in sections.items():
        body.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("advgkl: error:") and message in err, err

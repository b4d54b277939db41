"""`advgkl data corrupt`: a corrupted copy of any data set's evaluation points with the
`imagecorruptions` package (Hendrycks & Dietterich's code, not re-implemented), in the layouts the
released sets use, so that `advgkl eval --threat corruptions --corruptions-dir OUT` reads it:

- in-memory sets (the digits, CIFAR-10/100 test images): OUT/<corruption>.npy, uint8
  (5 x N, H, W, 3), the five severities' blocks in order, and OUT/labels.npy;
- image folders (ImageNet's 5,000 RobustBench points, or a folder's ROOT/val): OUT/<corruption>/
  <severity>/<class>/<file> (ImageNet's images resized to 256 and cropped to 224 first, as
  ImageNet-C was made; saved as JPEG of quality 85 as it was).

imagecorruptions refuses images under 32 px: the digits (16 px) are upsampled to 32 px
(bilinear), corrupted there and downsampled back to 16 px (bilinear, antialiased), so that a model
trained on them reads them as it reads the test digits. OUT/index.json says what was made, with
which imagecorruptions release, and labels every file as generated: not the released sets, not
comparable to the board. Each image's corruption draws from its own seeded stream, so a copy is
the same whenever it is made; a stopped copy continues with the corruption it was writing.
"""

from __future__ import annotations

import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from advgkl.compat import import_imagecorruptions
from advgkl.data.corrupted import GENERATED_NOTE, INDEX, SEVERITIES
from advgkl.data.folders import FOLDER_DATASETS, default_points, evaluation_points, load_image
from advgkl.data.tensors import NUM_CLASSES, load_split
from advgkl.errors import UserError

MIN_SIZE = 32   # imagecorruptions' smallest side


def _seeded(seed: int, corruption: int, severity: int, index: int) -> int:
    return (seed * 1_000_003 + corruption * 10_007 + severity * 101 + index) % 2 ** 32


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """imagecorruptions' `corrupt` of a uint8 (H, W, 3) image (sides >= 32) under its own
    NumPy stream (the caller's is left as it was)."""
    module = import_imagecorruptions()
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        out = module.corrupt(image, severity=severity, corruption_name=corruption)
    finally:
        np.random.set_state(saved)
    return np.uint8(np.clip(np.asarray(out, dtype=np.float64), 0, 255))


def _through_32(images: torch.Tensor, corrupt) -> torch.Tensor:
    """Corrupt (N, 3, H, W) uint8 images at 32 px when they are smaller, back at their size."""
    size = images.shape[-1]
    big = images if size >= MIN_SIZE else F.interpolate(
        images.float(), size=MIN_SIZE, mode="bilinear", align_corners=False).round().clamp(
        0, 255).to(torch.uint8)
    out = torch.from_numpy(np.stack([corrupt(i, x.permute(1, 2, 0).numpy())
                                     for i, x in enumerate(big)])).permute(0, 3, 1, 2)
    if size >= MIN_SIZE:
        return out
    return F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True).round().clamp(0, 255).to(torch.uint8)


def _check(corruptions: list[str]) -> None:
    known = import_imagecorruptions().get_corruption_names("all")
    unknown = [c for c in corruptions if c not in known]
    if unknown:
        raise UserError(f"--corruptions: {', '.join(unknown)} not among imagecorruptions' "
                        f"{', '.join(known)}")


def _start(out: Path, settings: dict) -> dict:
    """The index of a new copy, or of a stopped one with the same settings (continued)."""
    index_path = out / INDEX
    if out.exists():
        old = json.loads(index_path.read_text()) if index_path.is_file() else None
        if old is None or old.get("complete") or old.get("settings") != settings:
            raise UserError(f"{out} already exists; choose another --out (nothing was "
                            "overwritten)")
        return old
    out.mkdir(parents=True)
    index = {"generated_with": f"imagecorruptions {version('imagecorruptions')}",
             "note": f"generated with imagecorruptions {version('imagecorruptions')}: "
                     f"{GENERATED_NOTE}", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
             "complete": False, "settings": settings, "files": {}}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    return index


def _save_index(out: Path, index: dict) -> None:
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX)


def _memory_set(dataset: str, root: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split(dataset, train=False, root=root)
    n = n or len(test.labels)
    if n > len(test.labels):
        raise UserError(f"--n {n} is more than the {len(test.labels)} test images of {dataset}")
    return test.images[:n], test.labels[:n]


def corrupt_dataset(*, dataset: str, root: str, out: str | Path, corruptions: list[str],
                    n: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write the corrupted copy (see the module's docstring); returns OUT/index.json."""
    if dataset not in (*NUM_CLASSES, *FOLDER_DATASETS):
        raise UserError(f"--dataset {dataset!r}: one of "
                        f"{', '.join((*NUM_CLASSES, *FOLDER_DATASETS))}")
    _check(corruptions)
    out = Path(out)
    memory = dataset not in FOLDER_DATASETS
    if memory:
        images, labels = _memory_set(dataset, root, n)
        points = len(labels)
    else:
        samples = evaluation_points(root, dataset, n or default_points(dataset, root))
        points = len(samples)
    settings = {"dataset": dataset, "source": str(Path(root).resolve()), "points": points,
                "corruptions": corruptions, "severities": list(SEVERITIES), "seed": seed,
                "layout": "npy" if memory else "folders",
                "corrupted_at": "32 px (upsampled from the data set's size, then back)"
                if memory and images.shape[-1] < MIN_SIZE else "the images' own size"}
    index = _start(out, settings)
    bar = tqdm(total=len(corruptions) * len(SEVERITIES), unit="cell", desc="corrupting",
               disable=None if progress else True)
    for k, corruption in enumerate(corruptions):
        name = f"{corruption}.npy" if memory else corruption
        if name in index["files"]:
            bar.update(len(SEVERITIES))
            continue
        if memory:
            _write_npy(out, corruption, k, images, seed, bar)
        else:
            _write_folders(out, dataset, corruption, k, samples, seed, bar)
        index["files"][name] = index["note"]
        _save_index(out, index)
    bar.close()
    if memory and not (out / "labels.npy").exists():
        np.save(out / "labels.npy", np.tile(labels.numpy().astype(np.int64), len(SEVERITIES)))
    index["files"]["labels.npy" if memory else "(class folders)"] = index["note"]
    index["complete"] = True
    _save_index(out, index)
    return out / INDEX


def _write_npy(out: Path, corruption: str, k: int, images: torch.Tensor, seed: int,
               bar: tqdm) -> None:
    n, _, h, w = images.shape
    tmp = out / f".{corruption}.npy.tmp"
    blocks = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                       shape=(len(SEVERITIES) * n, h, w, 3))
    for severity in SEVERITIES:
        done = _through_32(images, lambda i, x: corrupt_image(
            x, corruption, severity, _seeded(seed, k, severity, i)))
        blocks[(severity - 1) * n:severity * n] = done.permute(0, 2, 3, 1).numpy()
        bar.update(1)
    blocks.flush()
    del blocks
    os.replace(tmp, out / f"{corruption}.npy")


def _write_folders(out: Path, dataset: str, corruption: str, k: int,
                   samples: list[tuple[str, int]], seed: int, bar: tqdm) -> None:
    import torchvision.transforms as T

    crop = T.Compose([T.Resize(256), T.CenterCrop(224)]) if dataset == "imagenet" else None
    tmp = out / f".{corruption}.tmp"
    for severity in SEVERITIES:
        for i, (path, _) in enumerate(samples):
            image = load_image(path)
            array = np.asarray(crop(image) if crop else image)
            if min(array.shape[:2]) < MIN_SIZE:
                raise UserError(f"{path}: under {MIN_SIZE} px, which imagecorruptions refuses")
            done = corrupt_image(array, corruption, severity, _seeded(seed, k, severity, i))
            target = tmp / str(severity) / Path(path).parent.name / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(done).save(target, quality=85)
        _class_folders(Path(samples[0][0]).parent.parent, tmp / str(severity))
        bar.update(1)
    os.replace(tmp, out / corruption)


def _class_folders(source: Path, target: Path) -> None:
    """Every class folder of the source split, so that the labels (folder indices) agree."""
    for entry in os.scandir(source):
        if entry.is_dir():
            (target / entry.name).mkdir(exist_ok=True)

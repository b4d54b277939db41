"""Image-folder data sets, streamed from disk: ImageNet (`imagenet`) and any other ImageFolder
tree (`folder`), laid out as ROOT/train/<class>/<image> and ROOT/val/<class>/<image>.

Images are decoded and transformed in the loader's workers and never held in memory, except the
few points an evaluation or the per-epoch check scores (uint8, after their preprocessing).
Labels are the index of the class folder in sorted order, as torchvision's ImageFolder and
RobustBench's loader give them; for `imagenet` the class folders must be the 1,000 ImageNet wnids,
so the labels are RobustBench's. ImageNet's evaluation points are RobustBench's: the first n of
its list of 5,000 validation images (robustbench/helper_files/imagenet_test_image_ids.txt).
A file that cannot be decoded stops the job with one line naming it (never skipped silently).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from advgkl.data.tensors import Split
from advgkl.errors import UserError, first_line

FOLDER_DATASETS = ("imagenet", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_POINTS = 5000
FOLDER_AUGMENTS = ("none", "imagenet")


def _robustbench_file(name: str) -> Path:
    """A file of robustbench's helper_files, found without importing robustbench."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("robustbench is not installed; its ImageNet id list and class map are "
                        "needed (pip install robustbench==1.1.1)")
    return Path(spec.submodule_search_locations[0]) / "helper_files" / name


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet class folders (wnids) in label order."""
    mapping = json.loads(_robustbench_file("imagenet_class_to_id_map.json").read_text())
    return tuple(sorted(mapping, key=mapping.__getitem__))


@functools.cache
def imagenet_point_ids() -> tuple[str, ...]:
    """RobustBench's ImageNet evaluation points, `wnid/ILSVRC2012_val_XXXXXXXX.JPEG`, in order."""
    lines = _robustbench_file("imagenet_test_image_ids.txt").read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@dataclass
class Tree:
    """The classes of a split (sorted folder names) and its images as (path, label), sorted by
    class, then by file name."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]


def class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def scan(root: str | Path, split: str, dataset: str) -> Tree:
    """The images of ROOT/`split`; a missing folder, no classes, or (imagenet) class folders
    other than the 1,000 wnids are refused in one line."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (an image-folder data set is laid out as "
                        f"ROOT/train/<class>/<image> and ROOT/val/<class>/<image>; set "
                        "data.root to ROOT)")
    classes = class_folders(folder)
    if not classes:
        raise UserError(f"{folder}: no class folders in it")
    if dataset == "imagenet" and tuple(classes) != imagenet_wnids():
        odd = sorted(set(classes) - set(imagenet_wnids()))[:3]
        odd_text = f"; not wnids: {', '.join(odd)}" if odd else ""
        raise UserError(f"{folder}: has {len(classes)} class folders, ImageNet's are the 1000 "
                        f"wnids (n01440764 ... n15075141){odd_text}; use data.dataset=folder "
                        "for another tree")
    samples = [(str(folder / name / f), label) for label, name in enumerate(classes)
               for f in sorted(os.listdir(folder / name))
               if f.lower().endswith(IMAGE_EXTENSIONS)]
    return Tree(folder, classes, samples)


def training_tree(root: str | Path, dataset: str) -> Tree:
    """ROOT/train, checked against ROOT/val's class folders when ROOT/val exists."""
    tree = scan(root, "train", dataset)
    if not tree.samples:
        raise UserError(f"{tree.root}: no images in its class folders (extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    check_same_classes(tree.classes, Path(root) / "val", f"{tree.root}")
    return tree


def check_same_classes(classes: Sequence[str], folder: Path, what: str) -> None:
    if folder.is_dir() and class_folders(folder) != list(classes):
        other = class_folders(folder)
        differ = sorted(set(other) ^ set(classes))[:3]
        raise UserError(f"{what} and {folder} have different class folders ({len(classes)} vs "
                        f"{len(other)}; e.g. {', '.join(differ)}): labels would not agree")


def evaluation_points(root: str | Path, dataset: str, n: int,
                      split: str = "val") -> list[tuple[str, int]]:
    """The first `n` evaluation points as (path, label): RobustBench's ids for imagenet, the
    images of ROOT/`split` in sorted order for folder (split: val, or a corruption's severity
    folder, ImageNet-C/<corruption>/<severity>)."""
    val = Path(root) / split
    if dataset == "imagenet":
        if n > IMAGENET_POINTS:
            raise UserError(f"--n-examples {n}: RobustBench's ImageNet evaluation has at most "
                            f"{IMAGENET_POINTS} points")
        scan(root, split, dataset)  # the folder and its 1,000 class folders
        index = {wnid: label for label, wnid in enumerate(imagenet_wnids())}
        points = [(str(val / pid), index[pid.split("/")[0]]) for pid in imagenet_point_ids()[:n]]
        missing = [p for p, _ in points if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{missing[0]}: missing ({len(missing)} of the first {n} RobustBench "
                            f"ImageNet points are missing from {val})")
        return points
    tree = scan(root, split, dataset)
    if n > len(tree.samples):
        raise UserError(f"--n-examples {n} is more than the {len(tree.samples)} images of {val}")
    return tree.samples[:n]


def folder_classes(dataset: str, root: str | Path | None) -> int:
    """The class count of an image-folder data set: 1000 for imagenet, ROOT/val's folders."""
    if dataset == "imagenet":
        return 1000
    return len(scan(root or "data", "val", dataset).classes)


def default_points(dataset: str, root: str | Path | None) -> int:
    """How many points an evaluation takes by default: RobustBench's 5,000 on ImageNet, 10,000
    elsewhere, at most the images of an image folder's val."""
    if dataset == "imagenet":
        return IMAGENET_POINTS
    if dataset == "folder":
        return min(10_000, len(scan(root or "data", "val", dataset).samples))
    return 10_000


def load_image(path: str) -> Image.Image:
    """The image at `path` as RGB; an unreadable file is one line naming it."""
    try:
        with open(path, "rb") as f:
            return decode(f, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({first_line(exc)})") from None


def decode(stream, name: str) -> Image.Image:
    try:
        img = Image.open(stream)
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (unknown or damaged format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{name}: not a readable image ({first_line(exc)})") from None


_PREPROCESSING = re.compile(r"(Bicubic)?Res(\d+)Crop(\d+)|Crop(\d+)|Res(\d+)")


def check_preprocessing(name: str) -> None:
    if not _PREPROCESSING.fullmatch(name):
        raise UserError(f"preprocessing {name!r}: expected one of RobustBench's names "
                        "(Res256Crop224, BicubicRes256Crop224, Crop288, Res224) or the same forms "
                        "with other sizes (e.g. Res40Crop32)")


def preprocessing(name: str, floats: bool = False) -> Callable[[Image.Image], Tensor]:
    """RobustBench's evaluation preprocessing `name` (or the same form at other sizes): PIL ->
    uint8 (3, H, W), or with `floats` values in [0, 1] as ToTensor gives. `Res256Crop224` =
    Resize(256) + CenterCrop(224); `BicubicRes256Crop224` the same with bicubic resizing; `Crop288` = CenterCrop(288); `Res224` = Resize((224, 224))."""
    import torchvision.transforms as T

    check_preprocessing(name)
    bicubic, res, crop, only_crop, only_res = _PREPROCESSING.fullmatch(name).groups()
    if res:
        mode = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
        steps = [T.Resize(int(res), interpolation=mode), T.CenterCrop(int(crop))]
    elif only_crop:
        steps = [T.CenterCrop(int(only_crop))]
    else:
        steps = [T.Resize([int(only_res)] * 2)]
    return T.Compose([*steps, T.ToTensor() if floats else T.PILToTensor()])


def crop_size(name: str) -> int:
    """The side of the images `preprocessing(name)` gives."""
    check_preprocessing(name)
    return int(re.findall(r"\d+", name)[-1])


def train_transform(augment: str, size: int, eval_preprocessing: str, *, rand_augment: str = "",
                    color_jitter: float = 0.4, interpolation: str = "bilinear",
                    re_prob: float = 0.0) -> Callable[[Image.Image], Tensor]:
    """PIL -> float (3, size, size) in [0, 1] (RandomErasing's noise can leave it). `imagenet`:
    timm's ImageNet training transform (RandomResizedCrop(size, scale 0.08-1) with
    `interpolation`, horizontal flip, RandAugment `rand_augment` or else colour jitter,
    RandomErasing with `re_prob` in pixel mode) with mean 0 and std 1, as Singh et al. build it
    (the models normalise inside); `none`: the evaluation preprocessing."""
    if augment not in FOLDER_AUGMENTS:
        raise UserError(f"data.augment: {augment!r}; image-folder data sets take "
                        f"{' or '.join(FOLDER_AUGMENTS)}")
    if augment == "none":
        return preprocessing(eval_preprocessing, floats=True)
    from advgkl.models.imagenet import import_timm

    if rand_augment and not rand_augment.startswith("rand-"):
        raise UserError(f"data.rand_augment: {rand_augment!r} is not a timm RandAugment policy "
                        "(e.g. rand-m9-mstd0.5-inc1)")
    try:
        return import_timm().data.create_transform(
            size, is_training=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            auto_augment=rand_augment or None, color_jitter=color_jitter,
            interpolation=interpolation, re_prob=re_prob, re_mode="pixel")
    except (AssertionError, ValueError, KeyError) as exc:
        raise UserError(f"data.rand_augment: {rand_augment!r}: timm refuses it ({exc})") from None


class FolderDataset(Dataset):
    """(transform(image), label) for each (path, label) in `samples`, decoded on access."""

    def __init__(self, samples: Sequence[tuple[str, int]],
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_image(path)), label


def decode_points(dataset: Dataset, *, workers: int, desc: str, progress: bool = True) -> Split:
    """Every item of `dataset` (uint8 images, labels) as a Split, decoded in `workers` loader
    processes, in order."""
    loader = DataLoader(dataset, batch_size=64, num_workers=workers)
    images, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False,
                     disable=None if progress else True):  # None: off without a terminal
        images.append(x)
        labels.append(y)
    return Split(torch.cat(images), torch.cat(labels).long())


def load_points(root: str | Path, dataset: str, n: int, preprocessing_name: str, *,
                first: int = 0, workers: int | None = None, progress: bool = True) -> Split:
    """Evaluation points [first, n) after `preprocessing_name`, as uint8 (N, 3, H, W)."""
    samples = evaluation_points(root, dataset, n)[first:]
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return decode_points(FolderDataset(samples, preprocessing(preprocessing_name)),
                         workers=workers, desc=f"decoding {len(samples)} points",
                         progress=progress)

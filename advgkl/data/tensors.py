"""Data sets as uint8 image tensors, and the training augmentations.

- cifar10 / cifar100: torchvision's files (downloaded only when asked); test order is
  torchvision's, which is RobustBench's.
- digits: scikit-learn's bundled handwritten digits (real data, offline), 8x8 gray images scaled
  to 16x16 RGB, split 80/20 with a fixed seed, stratified by class.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from advgkl.errors import UserError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}
_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("CIFAR100", "cifar-100-python", "train, test, meta"),
}
DIGITS_SIZE = 16
DIGITS_SPLIT_SEED = 0


@dataclass
class Split:
    """Images (N, 3, H, W) uint8 and labels (N,) integers, in the data set's own order; images
    can be a tensor or an object indexed like one (generated images on disk)."""

    images: Tensor
    labels: Tensor


def _load_cifar(name: str, root: str, train: bool, download: bool) -> Split:
    import torchvision.datasets as D

    cls_name, folder, files = _CIFAR[name]
    try:
        ds = getattr(D, cls_name)(root=root, train=train, download=download)
    except RuntimeError as exc:
        raise UserError(f"{name}: no data set in {Path(root) / folder} (expected files: {files}); "
                        f"put it there or set data.download=true ({exc})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as `load_digits()` returns them, images (1797, 8, 8) and
    targets (1797,), read from its digits.csv.gz without importing scikit-learn (whose import
    costs every training and evaluation process over a second)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise UserError("digits: scikit-learn is not installed (pip install scikit-learn)")
    data = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz",
                      delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_split() -> dict[str, list[int]]:
    """The fixed 80/20 split, {"train": [...], "test": [...]} in order: scikit-learn's stratified
    train_test_split with seed DIGITS_SPLIT_SEED, kept in digits_split.json."""
    return json.loads((Path(__file__).parent / "digits_split.json").read_text())


def _load_digits(train: bool) -> Split:
    images, target = digits_arrays()
    idx = torch.tensor(digits_split()["train" if train else "test"])
    gray = torch.from_numpy(images).float()[idx] / 16.0          # (N, 8, 8) in [0, 1]
    gray = torch.nn.functional.interpolate(gray[:, None], size=DIGITS_SIZE, mode="bilinear",
                                           align_corners=False)
    images = (gray.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return Split(images, torch.from_numpy(target)[idx].long())


def load_split(dataset: str, *, train: bool, root: str = "data", download: bool = False) -> Split:
    """The train or test split of `dataset` as uint8 tensors."""
    if dataset == "digits":
        return _load_digits(train)
    if dataset in _CIFAR:
        return _load_cifar(dataset, root, train, download)
    raise UserError(f"data.dataset: {dataset!r} is not one of {', '.join(NUM_CLASSES)}")


def validation_indices(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(the rest, `size` indices of range(n) drawn at random with `seed`), each in order: the
    validation split carved from a training set of n images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[size:].sort().values, perm[:size].sort().values


def carve_validation(split: Split, size: int, seed: int) -> tuple[Split, Split]:
    """(the rest, `size` images drawn at random with `seed`): a validation split carved from a
    training set; both keep the data set's order."""
    rest, val = validation_indices(len(split.labels), size, seed)
    return (Split(split.images[rest], split.labels[rest]),
            Split(split.images[val], split.labels[val]))


class Cutout:
    """Zero one square of side `length` centred at a uniformly random pixel (DeVries & Taylor)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        cy, cx = (int(torch.randint(h, ())), int(torch.randint(w, ())))
        half = self.length // 2
        img = img.clone()
        img[..., max(cy - half, 0):cy + half, max(cx - half, 0):cx + half] = 0
        return img


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 images -> floats in [0, 1] (the default dtype: float32 unless changed), dividing by
    255 exactly as torchvision's ToTensor."""
    return images.to(torch.get_default_dtype()).div(255)


def as_float(images: Tensor) -> Tensor:
    """uint8 images -> floats in [0, 1] (`to_unit_float`); float images are returned as they are.
    Evaluation points of image folders stay uint8 until their batch is attacked."""
    return to_unit_float(images) if images.dtype == torch.uint8 else images


def image_transform(augment: str, size: int) -> Callable[[Tensor], Tensor]:
    """uint8 (3, H, W) -> float (3, H, W) in [0, 1], with `augment` applied."""
    to_float = to_unit_float
    if augment == "none":
        return to_float
    import torchvision.transforms.v2 as T  # here: its import costs a second (torch._dynamo)

    basic = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    if augment == "basic":
        return T.Compose([*basic, to_float])
    if augment == "autoaugment":
        return T.Compose([*basic, T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), to_float])
    if augment == "cutout":
        return T.Compose([*basic, to_float, Cutout(size // 2)])
    raise UserError(f"data.augment: {augment!r} is not one of none, basic, autoaugment, cutout")


def random_crop_flip(images: Tensor, padding: int = 4) -> Tensor:
    """Basic augmentation of a uint8 batch (B, C, H, W) on its own device: a crop at a uniform
    offset from the zero-padded image, then a horizontal flip with probability 1/2, per image,
    the same distribution as RandomCrop(padding) + RandomHorizontalFlip on the CPU."""
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(2 * padding + 1, (b, 1), device=dev)
    left = torch.randint(2 * padding + 1, (b, 1), device=dev)
    flip = torch.rand(b, 1, device=dev) < 0.5
    cols = torch.arange(w, device=dev)
    cols = left + torch.where(flip, w - 1 - cols, cols)                       # (B, W)
    rows = top + torch.arange(h, device=dev)                                  # (B, H)
    return padded[torch.arange(b, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def keep_uint8(img: Tensor) -> Tensor:
    """The identity transform: images travel as uint8 and are augmented on the device."""
    return img


class ImageDataset(Dataset):
    """A Split with a transform; with `second` it yields ((view, second view), label)."""

    def __init__(self, split: Split, transform: Callable[[Tensor], Tensor],
                 second: Callable[[Tensor], Tensor] | None = None) -> None:
        self.split, self.transform, self.second = split, transform, second

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        img, label = self.split.images[i], int(self.split.labels[i])
        if self.second is None:
            return self.transform(img), label
        return (self.transform(img), self.second(img)), label


def train_dataset(split: Split, *, augment: str, two_view: bool,
                  on_device: bool = False) -> ImageDataset:
    """Single view with `augment`, or (basic view, `augment` view) pairs as in the paper's
    AutoAugment runs; `on_device`: uint8 images, augmented later by `random_crop_flip`."""
    size = split.images.shape[-1]
    if on_device:
        return ImageDataset(split, keep_uint8)
    if two_view:
        return ImageDataset(split, image_transform("basic", size), image_transform(augment, size))
    return ImageDataset(split, image_transform(augment, size))

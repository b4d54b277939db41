"""Corrupted test sets in the layouts RobustBench's corruption boards release, read without
holding them in memory:

- `.npy` blocks (CIFAR-10-C, CIFAR-100-C): DIR/<corruption>.npy, uint8 (5 x B, H, W, 3), the five
  severities' blocks of B images in order, and DIR/labels.npy with as many labels; a cell is the
  first n images of its severity's block (memory-mapped), labelled by the first n labels, as
  RobustBench's `load_corruptions_cifar` takes them (B = 10,000 for the released sets);
- severity folders (ImageNet-C, ImageNet-3DCC): DIR/<corruption>/<severity>/<class>/<image>,
  the points of an image-folder evaluation (RobustBench's 5,000 ImageNet ids, in order).

A copy made by `advgkl data corrupt` carries DIR/index.json saying so: it is not a released set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from advgkl.data.folders import FolderDataset, decode_points, evaluation_points, preprocessing
from advgkl.data.tensors import Split
from advgkl.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)
INDEX = "index.json"
GENERATED_NOTE = "not the released sets, not comparable to the board"


def read_index(folder: str | Path) -> dict | None:
    """The index `advgkl data corrupt` writes beside a generated copy (None: none there)."""
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        if {"points", "corruptions"} <= set(index["settings"]) and "created" in index:
            return index
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    raise UserError(f"{path}: not a readable index of `advgkl data corrupt`")


def layout(folder: str | Path) -> str:
    """"npy" (a labels.npy and one .npy per corruption) or "folders" (one folder per
    corruption); a folder holding neither is refused in one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of corrupted images (give --corruptions-dir, "
                        "or put the released set there)")
    return "npy" if (folder / "labels.npy").is_file() else "folders"


def _npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable .npy file ({exc})") from None


def check_npy_set(folder: str | Path, corruptions: tuple[str, ...], block: int | None) -> int:
    """Every corruption's .npy is uint8 (5 x B, H, W, 3) with as many labels in labels.npy (B =
    `block` when given: 10,000 for the released CIFAR sets); returns B."""
    folder = Path(folder)
    labels = _npy(folder / "labels.npy", "the labels of the corrupted images")
    sizes = set()
    for corruption in corruptions:
        path = folder / f"{corruption}.npy"
        images = _npy(path, f"corruption {corruption}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 \
                or images.shape[0] % len(SEVERITIES):
            raise UserError(f"{path}: {images.dtype} {tuple(images.shape)}; expected uint8 "
                            "(5 x N, H, W, 3): the five severities' blocks in order")
        if block is not None and images.shape[0] != len(SEVERITIES) * block:
            raise UserError(f"{path}: {images.shape[0]} images; the released set has "
                            f"{len(SEVERITIES)} x {block:,}")
        if labels.shape != (images.shape[0],):
            raise UserError(f"{folder / 'labels.npy'}: {labels.shape[0]} labels for the "
                            f"{images.shape[0]} images of {path.name}")
        sizes.add(images.shape[0] // len(SEVERITIES))
    if len(sizes) > 1:
        raise UserError(f"{folder}: its .npy files hold different numbers of images")
    return sizes.pop()


def npy_cell(folder: str | Path, corruption: str, severity: int, first: int, end: int,
             block: int) -> Split:
    """Points [first, end) of a cell as uint8 (N, 3, H, W) and their labels."""
    folder = Path(folder)
    if end > block:
        raise UserError(f"--n-examples {end}: {folder} has {block} images per severity")
    images = np.load(folder / f"{corruption}.npy", mmap_mode="r")
    start = (severity - 1) * block
    x = torch.from_numpy(np.array(images[start + first:start + end]))
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    y = torch.from_numpy(np.asarray(labels[first:end]).astype(np.int64))
    return Split(x.permute(0, 3, 1, 2).contiguous(), y)


def _cell_points(folder: Path, dataset: str, corruption: str, severity: int,
                 end: int) -> list[tuple[str, int]]:
    root = folder / corruption
    if not (root / str(severity)).is_dir():
        raise UserError(f"{root / str(severity)}: missing (corruption {corruption}, severity "
                        f"{severity})")
    return evaluation_points(root, dataset, end, split=str(severity))


def check_folder_set(folder: str | Path, dataset: str, corruptions: tuple[str, ...],
                     end: int) -> None:
    """Every severity folder of every corruption is there, with the data set's class folders
    and its first `end` points."""
    for corruption in corruptions:
        for severity in SEVERITIES:
            _cell_points(Path(folder), dataset, corruption, severity, end)


def folder_cell(folder: str | Path, dataset: str, corruption: str, severity: int, first: int,
                end: int, preprocessing_name: str, *, workers: int) -> Split:
    """Points [first, end) of a cell of a severity-folder set, after `preprocessing_name`,
    decoded by `workers` loader processes."""
    samples = _cell_points(Path(folder), dataset, corruption, severity, end)[first:]
    return decode_points(FolderDataset(samples, preprocessing(preprocessing_name)),
                         workers=workers, desc=f"{corruption} {severity}", progress=False)

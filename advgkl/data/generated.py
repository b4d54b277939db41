"""Generated training images read from disk, never loaded into RAM, and batches that mix them
with the real training set at a fixed fraction.

Accepted files (DM-AT's EDM data format): an `.npz` with `image` (N, H, W, 3) uint8 and `label`
(N,) integers, stored uncompressed (`np.savez`), read in place; or the folder that
`advgkl data convert` writes (image.npy, label.npy) from any `.npz`, compressed ones included.
Images are read with `os.pread`, one image per call, so the process's memory does not grow with
the file (a memory map would keep every touched page resident in the process).
"""

from __future__ import annotations

import functools
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler
from tqdm import tqdm

from advgkl.data.tensors import Split
from advgkl.errors import UserError

MEMBERS = ("image", "label")
_CHUNK = 16 << 20        # bytes per read/write when streaming
_LOCAL_HEADER = 30       # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class NpyLocation:
    """Where one array's raw C-order bytes start in a file, and their shape and dtype."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


def _read_npy_header(f: BinaryIO, what: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
    except ValueError as exc:
        raise UserError(f"{what}: not a NumPy array ({exc})") from None
    if fortran:
        raise UserError(f"{what}: Fortran-ordered array; save it in C order")
    return shape, dtype


def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None


def _member(zf: zipfile.ZipFile, path: Path, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(f"{name}.npy")
    except KeyError:
        raise UserError(f"{path}: no '{name}' array (expected {', '.join(MEMBERS)})") from None


def _npz_start(path: Path, name: str) -> int:
    """Byte offset of member `name`.npy inside the zip `path`; it must be stored uncompressed."""
    with _open_npz(path) as zf:
        info = _member(zf, path, name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise UserError(f"{path}: compressed, so it cannot be read in place; run once "
                        f"`advgkl data convert {path} DIR` and set data.generated=DIR")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + _LOCAL_HEADER + name_len + extra_len


def locate(path: str | Path, name: str) -> NpyLocation:
    """The raw bytes of array `name` in an uncompressed .npz or a convert folder."""
    path = Path(path)
    if path.is_dir():
        file, start = path / f"{name}.npy", 0
        if not file.is_file():
            raise UserError(f"{path}: no {name}.npy (a folder from `advgkl data convert` holds "
                            "image.npy and label.npy)")
    elif path.suffix == ".npz" and path.is_file():
        file, start = path, _npz_start(path, name)
    else:
        raise UserError(f"data.generated: {path} is neither an .npz file nor a folder with "
                        "image.npy and label.npy")
    with open(file, "rb") as f:
        f.seek(start)
        shape, dtype = _read_npy_header(f, f"{path} ({name})")
        where = NpyLocation(file, f.tell(), shape, dtype)
    if file.stat().st_size < where.offset + int(np.prod(shape)) * dtype.itemsize:
        raise UserError(f"{path}: '{name}' is truncated (the file is shorter than its header says)")
    return where


class DiskImages:
    """Images (N, H, W, 3) uint8 on disk, indexed like a (N, 3, H, W) tensor of single images."""

    def __init__(self, where: NpyLocation) -> None:
        self.where = where
        n, h, w, c = where.shape
        self.shape = (n, c, h, w)
        self.item_bytes = h * w * c
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        if self._fd is None:
            self._fd = os.open(self.where.path, os.O_RDONLY)
        raw = os.pread(self._fd, self.item_bytes, self.where.offset + int(i) * self.item_bytes)
        hwc = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*self.shape[2:], 3)
        return hwc.permute(2, 0, 1)

    def __getstate__(self) -> dict:  # a spawned worker opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _read_labels(where: NpyLocation, num_classes: int, what: str) -> Tensor:
    """All labels, checked to lie in [0, num_classes), kept compactly (1-2 bytes each)."""
    if where.dtype.kind not in "iu" or len(where.shape) != 1:
        raise UserError(f"{what}: 'label' must be a 1-D integer array, got {where.dtype} "
                        f"{where.shape}")
    out = torch.empty(where.shape[0], dtype=torch.uint8 if num_classes <= 256 else torch.int16)
    per_chunk = _CHUNK // where.dtype.itemsize
    with open(where.path, "rb") as f:
        f.seek(where.offset)
        for start in range(0, len(out), per_chunk):
            part = np.frombuffer(f.read(min(per_chunk, len(out) - start) * where.dtype.itemsize),
                                 dtype=where.dtype)
            if len(part) and (part.min() < 0 or part.max() >= num_classes):
                raise UserError(f"{what}: labels must lie in 0..{num_classes - 1}, found "
                                f"{part.min()}..{part.max()}")
            out[start:start + len(part)] = torch.from_numpy(part.astype(np.int64))
    return out


def open_generated(path: str | Path, *, num_classes: int, image_size: int) -> Split:
    """The generated set at `path` as a Split whose images stay on disk."""
    images, labels = locate(path, "image"), locate(path, "label")
    expected = (image_size, image_size, 3)
    if images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[1:] != expected:
        raise UserError(f"{path}: 'image' must be uint8 (N, {image_size}, {image_size}, 3) like "
                        f"the real training images, got {images.dtype} {images.shape}")
    if labels.shape[:1] != images.shape[:1]:
        raise UserError(f"{path}: {images.shape[0]} images but {labels.shape} labels")
    return Split(DiskImages(images), _read_labels(labels, num_classes, str(path)))


def convert(src: str | Path, dst: str | Path, *, progress: bool = True) -> Path:
    """Stream the `.npz` `src` (compressed or not) into folder `dst` as image.npy and label.npy,
    a chunk at a time; `dst` must not exist. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise UserError(f"{dst} already exists; choose another folder (nothing was overwritten)")
    tmp = dst.with_name(dst.name + ".partial")
    with _open_npz(src) as zf:
        infos = [_member(zf, src, name) for name in MEMBERS]
        tmp.mkdir(parents=True, exist_ok=True)
        for name, info in zip(MEMBERS, infos):
            with zf.open(info) as member, open(tmp / f"{name}.npy", "wb") as out:
                shape, dtype = _read_npy_header(member, f"{src} ({name})")
                np.lib.format.write_array_header_2_0(
                    out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": shape})
                data_start = out.tell()
                total = int(np.prod(shape)) * dtype.itemsize
                with tqdm(total=total, unit="B", unit_scale=True, desc=name,
                          disable=None if progress else True) as bar:
                    while chunk := member.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                if out.tell() - data_start != total:
                    raise UserError(f"{src}: '{name}' is truncated")
    tmp.rename(dst)
    return dst


@functools.lru_cache(maxsize=4)  # the current and next pass of the real and generated streams
def _permutation(n: int, seed: int) -> Tensor:
    dtype = torch.int32 if n < 2**31 else torch.int64  # 200 MB for 50M images
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def permutation_stream(n: int, start: int, count: int, seed: int) -> Tensor:
    """Items start..start+count of the endless sequence perm_0 ++ perm_1 ++ ... of fresh
    permutations of range(n): every index appears once per pass."""
    out, pos = [], start
    while pos < start + count:
        p, offset = divmod(pos, n)
        take = min(n - offset, start + count - pos)
        out.append(_permutation(n, seed * 1_000_003 + p)[offset:offset + take])
        pos += take
    return torch.cat(out).long() if out else torch.empty(0, dtype=torch.int64)


class MixedBatchSampler(Sampler[list[int]]):
    """Index batches over ConcatDataset([real, generated]): every global batch holds
    round(fraction * batch_size) generated and the rest real images; an epoch is
    ceil(epoch_samples / batch_size) full batches. Each set is walked in fresh permutations
    that continue across epochs, so no image repeats before all were seen. Rank r of `world`
    yields items r, r + world, ... of each global batch; batches depend only on (seed, epoch)."""

    def __init__(self, n_real: int, n_generated: int, *, batch_size: int, fraction: float,
                 epoch_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n_gen_batch = round(batch_size * fraction)
        self.n_real_batch = batch_size - self.n_gen_batch
        if self.n_gen_batch and not n_generated or self.n_real_batch and not n_real:
            raise UserError("data.generated_fraction: a batch needs images from an empty set")
        self.n_real, self.n_generated = n_real, n_generated
        self.batches = max(1, -(-epoch_samples // batch_size))
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        nr, ng = self.n_real_batch, self.n_gen_batch
        real = permutation_stream(self.n_real, self.epoch * self.batches * nr,
                                  self.batches * nr, 2 * self.seed)
        gen = permutation_stream(self.n_generated, self.epoch * self.batches * ng,
                                 self.batches * ng, 2 * self.seed + 1) + self.n_real
        for k in range(self.batches):
            batch = torch.cat([gen[k * ng:(k + 1) * ng], real[k * nr:(k + 1) * nr]])
            yield batch[self.rank::self.world].tolist()

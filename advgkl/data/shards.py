"""An image-folder split as WebDataset tar shards, written with webdataset's TarWriter and read
with random access through wids (webdataset's indexed datasets).

`write_shards` puts the images of ROOT/train (the files' own bytes, not re-encoded) in
folder order into OUT/train-NNNNNN.tar, `shard_size` images each, and writes OUT/train.json
last: wids' shard index plus what the shards were written from (classes, image count and a
sha256 over the relative paths and file sizes). Each shard appears under its final name only once
complete, so a stopped run continues where it stopped. Sample i of the shards is image i of the
folder: the same sampler gives the same batches from either.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from advgkl.data.folders import Tree, decode, training_tree
from advgkl.errors import UserError

KIND = "wids-shard-index-v1"


def tree_fingerprint(tree: Tree) -> str:
    """sha256 over each image's path relative to the split and its size in bytes, in order."""
    digest = hashlib.sha256()
    for path, label in tree.samples:
        digest.update(f"{os.path.relpath(path, tree.root)}\0{label}\0"
                      f"{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def _extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def write_shards(root: str | Path, out: str | Path, *, dataset: str, shard_size: int = 1000,
                 progress: bool = True) -> Path:
    """Write ROOT/train as shards into `out`; returns the index file. Complete shards left by
    an earlier, stopped call with the same source and shard size are kept; a finished index is
    never rewritten, nor are shards this command did not start."""
    import webdataset as wds

    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    split = "train"
    tree = training_tree(root, dataset)
    out = Path(out)
    index_path = out / f"{split}.json"
    if index_path.exists():
        raise UserError(f"{index_path} already exists (nothing was overwritten)")
    source = f"{tree_fingerprint(tree)} {shard_size}"
    marker = out / f".{split}.source"   # which tree and shard size the shards so far came from
    if marker.exists() and marker.read_text() != source:
        raise UserError(f"{out} holds shards of another tree or shard size; use a new --out")
    if not marker.exists() and out.is_dir() and any(out.glob(f"{split}-*.tar")):
        raise UserError(f"{out} holds shards this command did not start; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(source)
    n = len(tree.samples)
    starts = range(0, n, shard_size)
    shards = []
    bar = tqdm(total=n, desc=f"writing {split} shards", unit="img",
                disable=None if progress else True)
    for k, start in enumerate(starts):
        name = f"{split}-{k:06d}.tar"
        part = tree.samples[start:start + shard_size]
        if not (out / name).is_file():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            try:
                with os.fdopen(fd, "wb") as stream, wds.TarWriter(stream) as sink:
                    for i, (path, label) in enumerate(part, start):
                        sink.write({"__key__": f"{i:09d}",
                                    _extension(path): Path(path).read_bytes(),
                                    "cls": str(label),
                                    "path": os.path.relpath(path, tree.root)})
                os.chmod(tmp, 0o644)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        shards.append({"url": name, "nsamples": len(part),
                       "filesize": (out / name).stat().st_size})
        bar.update(len(part))
    bar.close()
    index = {"__kind__": KIND, "wids_version": 1, "name": f"{Path(root).name}-{split}",
             "shardlist": shards, "advgkl": {"split": split, "dataset": dataset,
                                             "classes": tree.classes, "samples": n,
                                             "source": str(Path(root).resolve()),
                                             "fingerprint": source.split()[0]}}
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    marker.unlink()
    return index_path


def read_index(folder: str | Path, split: str = "train") -> dict:
    """The index `write_shards` wrote, with every shard present at its recorded size."""
    folder = Path(folder)
    path = folder / f"{split}.json"
    if not path.is_file():
        raise UserError(f"data.shards: {path} not found (write the shards with `advgkl data "
                        "shards ROOT --out DIR`)")
    try:
        index = json.loads(path.read_text())
        shards = index["shardlist"]
        if not {"classes", "samples", "fingerprint"} <= set(index["advgkl"]):
            raise KeyError("advgkl")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a shard index written by advgkl data shards") from None
    for shard in shards:
        file = folder / shard["url"]
        if not file.is_file() or file.stat().st_size != shard["filesize"]:
            raise UserError(f"{file}: missing or of another size than its index records "
                            f"({shard['filesize']} bytes); the shards are incomplete")
    return index


def check_against(index: dict, tree: Tree, folder: str | Path) -> None:
    """Refuse shards whose source differs from `tree` (other images, labels or classes)."""
    meta = index["advgkl"]
    if meta["classes"] != tree.classes or meta["fingerprint"] != tree_fingerprint(tree):
        raise UserError(f"data.shards: {folder} does not match {tree.root} (the shards hold "
                        f"{meta['samples']} images of {len(meta['classes'])} classes, the folder "
                        f"{len(tree.samples)} of {len(tree.classes)}, or other files); rewrite "
                        "them with advgkl data shards")


class ShardDataset(Dataset):
    """(transform(image), label) for sample i of the shards, through wids' ShardListDataset.
    Shards are opened where they lie (wids' lock files go to a private temporary folder)."""

    def __init__(self, folder: str | Path, index: dict,
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.folder, self.index, self.transform = Path(folder).resolve(), index, transform
        self._shards = None

    def __len__(self) -> int:
        return self.index["advgkl"]["samples"]

    def _open(self):
        import wids

        shards = [{**s, "url": str(self.folder / s["url"])} for s in self.index["shardlist"]]
        with contextlib.redirect_stderr(io.StringIO()):   # wids prints a summary line
            return wids.ShardListDataset(shards, localname=self._localname,
                                         transformations=[lambda sample: sample])

    @staticmethod
    def _localname(url: str) -> str:
        """wids opens the returned path and locks path + '.lock' (the shards' folder may be
        read-only): a link to the shard in this user's temporary folder."""
        links = Path(tempfile.gettempdir()) / f"advgkl-wids-{os.getuid()}"
        links.mkdir(exist_ok=True)
        link = links / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{Path(url).name}"
        if not link.exists():
            with contextlib.suppress(FileExistsError):
                os.symlink(url, link)
        return str(link)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._shards is None:   # opened in each loader worker, not pickled with the dataset
            self._shards = self._open()
        sample = self._shards[i]   # wids hands each member over as a BytesIO
        name = f"{sample['__shard__']}:{sample['.path'].getvalue().decode()}"
        image = next(v for k, v in sample.items()
                     if not k.startswith("__") and k not in (".cls", ".path"))
        return self.transform(decode(image, name)), int(sample[".cls"].getvalue().decode())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

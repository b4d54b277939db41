"""Image-folder loading speed: decoded + transformed images per second of one loader worker,
from the folder and from its tar shards, with the training transform (timm's RandomResizedCrop
+ flip + colour jitter at 224 px) and the evaluation preprocessing (BicubicRes256Crop224), on
generated ImageNet-sized JPEGs (500x375, quality 90, about 100 kB each like ImageNet's).

    python scripts/bench_data.py [--images 256] [--workers 1] [--json OUT.json]

With --workers N > 1 it also times a DataLoader with N workers (batch 64) over the same images.
One worker's rate times the node's cores (minus the training processes) is what a node can feed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advgkl.data.folders import (FolderDataset, preprocessing, train_transform,  # noqa: E402
                                 training_tree)
from advgkl.data.shards import ShardDataset, read_index, write_shards  # noqa: E402


def make_tree(root: Path, n: int) -> None:
    """`n` smooth random 500x375 JPEGs in 8 class folders (train and an empty val)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(img, np.float64) + rng.normal(0, 12, (375, 500, 3))
        path = root / "train" / f"class{i % 8}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def per_worker(dataset, n: int) -> float:
    """Images per second of one process decoding and transforming `n` items in a random order."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    dataset[int(order[0])]   # open files, warm caches
    start = time.perf_counter()
    for i in order.tolist():
        dataset[i]
    return n / (time.perf_counter() - start)


def loader_rate(dataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        make_tree(root, args.images)
        for k in range(8):
            (root / "val" / f"class{k}").mkdir(parents=True)
        tree = training_tree(root, "folder")
        write_shards(root, Path(tmp) / "shards", dataset="folder", shard_size=64, progress=False)
        index = read_index(Path(tmp) / "shards")
        mean_kb = np.mean([Path(p).stat().st_size for p, _ in tree.samples]) / 1024
        transforms = {"train 224 (RRC+flip+jitter)":
                      train_transform("imagenet", 224, "Res256Crop224"),
                      "eval BicubicRes256Crop224":
                      preprocessing("BicubicRes256Crop224", floats=True)}
        rows = []
        for tname, transform in transforms.items():
            for source, ds in (("folder", FolderDataset(tree.samples, transform)),
                               ("shards", ShardDataset(Path(tmp) / "shards", index, transform))):
                row = {"source": source, "transform": tname,
                       "img_per_s_one_worker": per_worker(ds, args.images - 1)}
                if args.workers > 1:
                    row[f"img_per_s_{args.workers}_workers"] = loader_rate(ds, args.workers)
                rows.append(row)
    cpu = platform.processor() or platform.machine()
    print(f"{args.images} JPEGs of 500x375 ({mean_kb:.0f} kB mean), torch {torch.__version__}, "
          f"{cpu}, 1 thread per worker")
    for row in rows:
        extra = "".join(f", {k}: {v:.0f}" for k, v in row.items() if k.endswith("workers"))
        print(f"{row['source']:7s} {row['transform']:30s} {row['img_per_s_one_worker']:6.0f} img/s"
              f" per worker{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "mean_kb": mean_kb,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""What a training run reads: the training images (in-memory tensors, generated files, or an
image folder / its shards streamed from disk), the per-epoch check's points, and each rank's
batches of an epoch."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from advgkl import distributed
from advgkl.config import Config
from advgkl.data.folders import (FOLDER_DATASETS, FolderDataset, check_same_classes, decode_points,
                                 imagenet_wnids, load_points, preprocessing, train_transform,
                                 training_tree)
from advgkl.data.generated import MixedBatchSampler, open_generated
from advgkl.data.tensors import (NUM_CLASSES, Split, carve_validation, load_split, train_dataset,
                                 validation_indices)
from advgkl.errors import UserError


@dataclass
class TrainData:
    """The training set (`n_real` real images first, generated ones after), the check's points
    (None: no check) and their label for the records, the class count, and a line for the log."""

    dataset: Dataset
    n_real: int
    check: Split | None
    check_label: str
    num_classes: int
    source: str = ""


def check_data_options(cfg: Config) -> None:
    data = cfg.data
    if data.dataset in FOLDER_DATASETS:   # augment and preprocessing: train_transform checks
        if data.two_view or data.device_augment or data.generated:
            raise UserError("data.two_view, data.device_augment and data.generated are for "
                            "in-memory data sets; not with an image folder")
        return
    if data.augment == "imagenet" or data.shards or data.rand_augment or data.re_prob:
        raise UserError(f"data.augment=imagenet (with data.rand_augment, data.re_prob) and "
                        f"data.shards are for image-folder data sets "
                        f"(data.dataset imagenet or folder), not {data.dataset}")
    if data.device_augment and (data.augment != "basic" or data.two_view):
        raise UserError("data.device_augment: runs the basic augmentation only; use it with "
                        "data.augment=basic and data.two_view=false")
    if not data.generated and (data.generated_fraction or data.epoch_samples):
        raise UserError("data.generated_fraction and data.epoch_samples need data.generated "
                        "(a file of generated images)")


def check_points(cfg: Config, real: Split) -> tuple[Split, Split | None, str]:
    """(training images, the per-epoch check's points, their label for the records):
    eval.check=val holds out eval.val_size training images drawn with train.seed; test takes the
    first eval.holdout_size TEST points (selection on test data); none: no check."""
    if cfg.eval.check == "none":
        return real, None, ""
    if cfg.eval.check == "test":
        test = load_split(cfg.data.dataset, train=False, root=cfg.data.root,
                          download=cfg.data.download)
        n = min(cfg.eval.holdout_size, len(test.labels))
        return real, Split(test.images[:n], test.labels[:n]), f"TEST-{n}"
    _check_val_size(cfg, len(real.labels))
    rest, val = carve_validation(real, cfg.eval.val_size, cfg.train.seed)
    return rest, val, f"val-{cfg.eval.val_size}"


def _check_val_size(cfg: Config, n: int) -> None:
    if cfg.eval.val_size >= n:
        raise UserError(f"eval.val_size: {cfg.eval.val_size} leaves no training images (the "
                        f"training set has {n})")


def training_set(cfg: Config, real: Split, num_classes: int) -> Dataset:
    """The real training images, followed by the generated images when configured."""
    kw = {"augment": cfg.data.augment, "two_view": cfg.data.two_view,
          "on_device": cfg.data.device_augment}
    dataset = train_dataset(real, **kw)
    if cfg.data.generated:
        generated = open_generated(cfg.data.generated, num_classes=num_classes,
                                   image_size=real.images.shape[-1])
        dataset = ConcatDataset([dataset, train_dataset(generated, **kw)])
    return dataset


def augment_options(cfg: Config) -> dict:
    """timm's training-transform options the config sets (augment imagenet)."""
    d = cfg.data
    return {"rand_augment": d.rand_augment, "color_jitter": d.color_jitter,
            "interpolation": d.interpolation, "re_prob": d.re_prob}


def _folder_sets(cfg: Config) -> tuple[Dataset, Dataset, list[str], str]:
    """(training images with the training transform, the same with the evaluation
    preprocessing, the classes, where they come from): ROOT/train, or its shards."""
    from advgkl.data.shards import ShardDataset, check_against, read_index

    data = cfg.data
    augment = train_transform(data.augment, data.image_size, data.preprocessing,
                              **augment_options(cfg))
    fixed = preprocessing(data.preprocessing)
    if not data.shards:
        tree = training_tree(data.root, data.dataset)
        return (FolderDataset(tree.samples, augment), FolderDataset(tree.samples, fixed),
                tree.classes, str(tree.root))
    index = read_index(data.shards)
    classes = index["advgkl"]["classes"]
    if (Path(data.root) / "train").is_dir():
        check_against(index, training_tree(data.root, data.dataset), data.shards)
    elif data.dataset == "imagenet" and tuple(classes) != imagenet_wnids():
        raise UserError(f"data.shards: {data.shards} holds {len(classes)} classes, not "
                        "ImageNet's 1000 wnids")
    check_same_classes(classes, Path(data.root) / "val", f"data.shards {data.shards}")
    return (ShardDataset(data.shards, index, augment), ShardDataset(data.shards, index, fixed),
            classes, f"{data.shards} ({len(index['shardlist'])} shards)")


def folder_training_data(cfg: Config) -> TrainData:
    """An image folder (or its shards) streamed from disk; the check's points are decoded once
    with the evaluation preprocessing: a split of the training images (val), the first
    eval.holdout_size evaluation points (test) or none."""
    train_set, fixed_set, classes, source = _folder_sets(cfg)
    n, workers = len(train_set), cfg.data.num_workers
    check, label = None, ""
    if cfg.eval.check == "val":
        _check_val_size(cfg, n)
        rest, val = validation_indices(n, cfg.eval.val_size, cfg.train.seed)
        train_set = Subset(train_set, rest.tolist())
        check = decode_points(Subset(fixed_set, val.tolist()), workers=workers,
                              desc="decoding the check's points")
        label = f"val-{cfg.eval.val_size}"
    elif cfg.eval.check == "test":
        check = load_points(cfg.data.root, cfg.data.dataset, cfg.eval.holdout_size,
                            cfg.data.preprocessing, workers=workers)
        label = f"TEST-{len(check.labels)}"
    return TrainData(train_set, len(train_set), check, label, len(classes),
                     f"{len(train_set)} training images of {len(classes)} classes from {source}")


def training_data(cfg: Config) -> TrainData:
    """The run's data, checked before any run folder exists."""
    check_data_options(cfg)
    check_inside_epoch(cfg)
    if cfg.data.dataset in FOLDER_DATASETS:
        return folder_training_data(cfg)
    num_classes = NUM_CLASSES[cfg.data.dataset]
    real, check, label = check_points(
        cfg, load_split(cfg.data.dataset, train=True, root=cfg.data.root,
                        download=cfg.data.download))
    dataset = training_set(cfg, real, num_classes)
    return TrainData(dataset, len(real.labels), check, label, num_classes)


class SeededItems(Dataset):
    """`dataset`'s items, each transformed under random streams (Python's, NumPy's, torch's)
    seeded by (`seed`, its index), the caller's streams left as they were: an item gets the same
    augmentation whichever worker draws it and whenever, so an epoch resumed in its middle sees
    the batches it would have seen."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        seed = (self.seed * 1_000_003 + i) % 2 ** 62
        py, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                torch.manual_seed(seed)
                return self.dataset[i]
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def check_inside_epoch(cfg: Config) -> None:
    """Checkpoints inside an epoch resume exactly when each item's augmentation does not depend
    on the worker that drew it: image folders (seeded per item), or in-memory data augmented in
    the main process."""
    if cfg.train.checkpoint_steps and cfg.data.dataset not in FOLDER_DATASETS \
            and cfg.data.num_workers:
        raise UserError("train.checkpoint_steps: in-memory data sets resume inside an epoch "
                        "exactly only with data.num_workers=0 (augmentation in the main "
                        "process); image folders take any number of workers")


def epoch_loader(cfg: Config, dataset: Dataset, n_real: int, ranks: distributed.DistInfo,
                 epoch: int, pin_memory: bool, skip: int = 0) -> DataLoader:
    """This rank's batches of `epoch` from its batch `skip` on; together the ranks' batches form
    the global batches a single process would draw. The loader workers are seeded per rank
    (train.seed + rank), image-folder items per item; with Mixup/CutMix an incomplete last batch
    is dropped (as timm's training loader does)."""
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": pin_memory,  # workers: seed + rank
          "generator": torch.Generator().manual_seed((cfg.train.seed + ranks.rank) * 100_003
                                                     + epoch)}
    if cfg.data.dataset in FOLDER_DATASETS:
        dataset = SeededItems(dataset, cfg.train.seed * 100_003 + epoch)
    if cfg.data.generated:
        batches = MixedBatchSampler(
            n_real, len(dataset) - n_real, batch_size=cfg.train.batch_size,
            fraction=cfg.data.generated_fraction, epoch_samples=cfg.data.epoch_samples or n_real,
            seed=cfg.train.seed, rank=ranks.rank, world=ranks.world)
        batches.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=list(batches)[skip:], **kw)
    # Rank r takes every world-th image of the single-process permutation.
    sampler = DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    local = cfg.train.batch_size // ranks.world
    mixing = bool(cfg.data.mixup or cfg.data.cutmix)  # Mixup pairs images: full batches only
    return DataLoader(dataset, batch_size=local, sampler=list(sampler)[skip * local:],
                      drop_last=mixing, **kw)

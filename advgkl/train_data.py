"""What a training run reads: the training images (in-memory tensors, generated files, or an
image folder / its shards streamed from disk), the per-epoch check's points, and each rank's
batches of an epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from advgkl import distributed
from advgkl.config import Config
from advgkl.data import (NUM_CLASSES, Split, carve_validation, load_split, train_dataset,
                         validation_indices)
from advgkl.errors import UserError
from advgkl.folders import (FOLDER_DATASETS, FolderDataset, check_same_classes, decode_points,
                            imagenet_wnids, load_points, preprocessing, train_transform,
                            training_tree)
from advgkl.generated import MixedBatchSampler, open_generated


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
    if data.augment == "imagenet" or data.shards:
        raise UserError(f"data.augment=imagenet and data.shards are for image-folder data sets "
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


def _folder_sets(cfg: Config) -> tuple[Dataset, Dataset, list[str], str]:
    """(training images with the training transform, the same with the evaluation
    preprocessing, the classes, where they come from): ROOT/train, or its shards."""
    from advgkl.shards import ShardDataset, check_against, read_index

    data = cfg.data
    augment = train_transform(data.augment, data.image_size, data.preprocessing)
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
    if cfg.data.dataset in FOLDER_DATASETS:
        return folder_training_data(cfg)
    num_classes = NUM_CLASSES[cfg.data.dataset]
    real, check, label = check_points(
        cfg, load_split(cfg.data.dataset, train=True, root=cfg.data.root,
                        download=cfg.data.download))
    dataset = training_set(cfg, real, num_classes)
    return TrainData(dataset, len(real.labels), check, label, num_classes)


def epoch_loader(cfg: Config, dataset: Dataset, n_real: int, ranks: distributed.DistInfo,
                 epoch: int, pin_memory: bool) -> DataLoader:
    """This rank's batches of `epoch`; together the ranks' batches form the global batches a
    single process would draw."""
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": pin_memory,
          "generator": torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)}
    if cfg.data.generated:
        batches = MixedBatchSampler(
            n_real, len(dataset) - n_real, batch_size=cfg.train.batch_size,
            fraction=cfg.data.generated_fraction, epoch_samples=cfg.data.epoch_samples or n_real,
            seed=cfg.train.seed, rank=ranks.rank, world=ranks.world)
        batches.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=batches, **kw)
    # Rank r takes every world-th image of the single-process permutation.
    sampler = DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.train.batch_size // ranks.world, sampler=sampler,
                      **kw)

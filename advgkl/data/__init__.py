"""What training and evaluation read: the in-memory data sets as tensors with their augmentation
(`tensors`: CIFAR-10/100, the digits), generated images on disk (`generated`), image folders
streamed from disk (`folders`) or from tar shards (`shards`), and what a training run reads, with
its validation split and each rank's batches (`train_data`)."""

from advgkl.data.folders import FOLDER_DATASETS, FolderDataset, load_points
from advgkl.data.generated import convert, open_generated
from advgkl.data.shards import ShardDataset, write_shards
from advgkl.data.tensors import (NUM_CLASSES, Split, as_float, carve_validation, load_split,
                                 to_unit_float, train_dataset)
from advgkl.data.train_data import TrainData, epoch_loader, training_data

__all__ = ["FOLDER_DATASETS", "FolderDataset", "NUM_CLASSES", "ShardDataset", "Split", "TrainData",
           "as_float", "carve_validation", "convert", "epoch_loader", "load_points", "load_split",
           "open_generated", "to_unit_float", "train_dataset", "training_data", "write_shards"]

"""Data: the embedded digits split, the CIFAR error, and the augmentations."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T

from advgkl.data.tensors import (DIGITS_SPLIT_SEED, Cutout, Split, digits_arrays, digits_split,
                                 image_transform, load_split, random_crop_flip, train_dataset)
from advgkl.errors import UserError


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test = load_split("digits", train=True), load_split("digits", train=False)
    assert len(train.labels) + len(test.labels) == 1797 and len(test.labels) == 360
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 16, 16)
    assert torch.equal(load_split("digits", train=False).images, test.images)  # same every time
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert test.images.max() == 255 and test.images.min() == 0


def test_digits_are_scikit_learn_s_and_the_split_is_its_stratified_split():
    """Read without importing scikit-learn (digits.csv.gz, the stored split): equal to
    load_digits() and to train_test_split(..., stratify=target) with the fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, target = digits_arrays()
    digits = load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(target, digits.target)
    train, test = train_test_split(range(1797), test_size=0.2, random_state=DIGITS_SPLIT_SEED,
                                   stratify=digits.target)
    split = digits_split()
    assert (split["train"], split["test"]) == (list(train), list(test))


def test_missing_cifar_names_folder_and_files(tmp_path):
    with pytest.raises(UserError, match="cifar10: no data set in .*cifar-10-batches-py "
                                        "\\(expected files: data_batch_1..5"):
        load_split("cifar10", train=False, root=str(tmp_path))
    with pytest.raises(UserError, match="cifar-100-python"):
        load_split("cifar100", train=True, root=str(tmp_path))


def fake_split(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                 torch.arange(n) % 10)


@pytest.mark.parametrize("augment", ["none", "basic", "autoaugment", "cutout"])
def test_transforms_give_float_images_in_unit_range(augment):
    img = fake_split().images[0]
    out = image_transform(augment, 16)(img)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    assert 0 <= out.min() and out.max() <= 1
    if augment == "none":
        assert torch.equal(out, img.float() / 255)


def test_cutout_zeroes_one_square():
    torch.manual_seed(3)
    out = Cutout(8)(torch.ones(3, 16, 16))
    zero = (out == 0).all(0)
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    assert 0 < zero.sum() <= 64
    assert zero.sum() == len(rows) * len(cols)  # a rectangle (a square clipped at the border)


def test_two_view_dataset_yields_basic_and_augmented_views():
    ds = train_dataset(fake_split(), augment="autoaugment", two_view=True)
    (basic, augmented), label = ds[3]
    assert basic.shape == augmented.shape == (3, 16, 16) and label == 3
    single = train_dataset(fake_split(), augment="basic", two_view=False)[3]
    assert single[0].shape == (3, 16, 16)


def crop_flip_outcomes(img, padding=4):
    """Every image RandomCrop(padding) + RandomHorizontalFlip can give, keyed by its bytes."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    outcomes = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top:top + h, left:left + w]
            for flip in (False, True):
                out = crop.flip(-1) if flip else crop
                outcomes[out.contiguous().numpy().tobytes()] = len(outcomes)
    return outcomes


def outcome_counts(outputs, outcomes):
    counts = torch.zeros(len(outcomes), dtype=torch.int64)
    for out in outputs:
        counts[outcomes[out.contiguous().numpy().tobytes()]] += 1  # KeyError: impossible image
    return counts


def test_device_crop_flip_has_the_cpu_paths_distribution():
    """Both paths give only the 162 possible crops/flips, at frequencies a chi-square test cannot
    tell apart (from each other, and from uniform)."""
    from scipy.stats import chi2_contingency, chisquare

    img = fake_split(1).images[0]
    outcomes = crop_flip_outcomes(img)
    assert len(outcomes) == 162                       # all distinct for this random image
    n = 16_200
    torch.manual_seed(0)
    device = outcome_counts(random_crop_flip(img.expand(n, -1, -1, -1)), outcomes)
    cpu_path = T.Compose([T.RandomCrop(16, padding=4), T.RandomHorizontalFlip()])
    cpu = outcome_counts((cpu_path(img) for _ in range(n)), outcomes)
    assert device.sum() == cpu.sum() == n
    assert chi2_contingency(torch.stack([device, cpu]).numpy()).pvalue > 1e-3
    assert chisquare(device.numpy()).pvalue > 1e-3
    assert random_crop_flip(img[None]).dtype == torch.uint8

"""Generated data on disk: in-place .npz reading, streaming conversion, one-line errors, batches
with a fixed generated fraction, and memory that does not grow with the file."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from advgkl.cli import main
from advgkl.data.generated import MixedBatchSampler, open_generated, permutation_stream
from advgkl.errors import UserError

DEMO = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"


def images_and_labels(n, size=16, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            rng.integers(0, classes, n).astype(np.int64))


def assert_split_equals(split, image, label):
    assert split.images.shape == (len(image), 3, *image.shape[1:3])
    for i in range(len(image)):
        assert torch.equal(split.images[i], torch.from_numpy(image[i]).permute(2, 0, 1))
    assert torch.equal(split.labels.long(), torch.from_numpy(label))


def test_uncompressed_npz_is_read_in_place_exactly(tmp_path):
    image, label = images_and_labels(37)
    np.savez(tmp_path / "g.npz", image=image, label=label)
    assert_split_equals(open_generated(tmp_path / "g.npz", num_classes=10, image_size=16),
                        image, label)


def test_compressed_npz_is_refused_and_converted_by_streaming(tmp_path, capsys):
    image, label = images_and_labels(37, classes=100)
    np.savez_compressed(tmp_path / "g.npz", image=image, label=label)
    with pytest.raises(UserError, match="compressed.*advgkl data convert"):
        open_generated(tmp_path / "g.npz", num_classes=100, image_size=16)
    assert main(["data", "convert", str(tmp_path / "g.npz"), str(tmp_path / "conv")]) == 0
    assert "37 images" in capsys.readouterr().out
    assert_split_equals(open_generated(tmp_path / "conv", num_classes=100, image_size=16),
                        image, label)
    assert np.array_equal(np.load(tmp_path / "conv" / "image.npy"), image)  # standard .npy
    assert main(["data", "convert", str(tmp_path / "g.npz"), str(tmp_path / "conv")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.int64)},
     r"uint8 \(N, 16, 16, 3\).*\(4, 32, 32, 3\)"),
    ({"image": np.zeros((4, 16, 16, 3), np.float32), "label": np.zeros(4, np.int64)}, "float32"),
    ({"image": np.zeros((4, 16, 16, 3), np.uint8)}, "no 'label' array"),
    ({"image": np.zeros((4, 16, 16, 3), np.uint8), "label": np.zeros(3, np.int64)},
     "4 images but"),
    ({"image": np.zeros((4, 16, 16, 3), np.uint8), "label": np.array([0, 1, 2, 10])},
     r"labels must lie in 0..9, found 0..10"),
    ({"image": np.zeros((4, 16, 16, 3), np.uint8), "label": np.zeros(4, np.float64)},
     "1-D integer"),
])
def test_bad_generated_files_get_one_line_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(UserError, match=message):
        open_generated(tmp_path / "g.npz", num_classes=10, image_size=16)


def test_missing_or_foreign_paths_are_named(tmp_path):
    with pytest.raises(UserError, match="neither an .npz file nor a folder"):
        open_generated(tmp_path / "nope.npz", num_classes=10, image_size=16)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        open_generated(tmp_path / "bad.npz", num_classes=10, image_size=16)
    with pytest.raises(UserError, match="no image.npy"):
        open_generated(tmp_path, num_classes=10, image_size=16)
    image, label = images_and_labels(10)
    (tmp_path / "conv").mkdir()
    np.save(tmp_path / "conv" / "image.npy", image)
    np.save(tmp_path / "conv" / "label.npy", label)
    with open(tmp_path / "conv" / "image.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)                    # an interrupted copy
    with pytest.raises(UserError, match="'image' is truncated"):
        open_generated(tmp_path / "conv", num_classes=10, image_size=16)


def test_permutation_stream_visits_every_index_once_per_pass():
    whole = permutation_stream(7, 0, 21, seed=3)
    for p in range(3):
        assert sorted(whole[7 * p:7 * (p + 1)].tolist()) == list(range(7))
    assert not torch.equal(whole[:7], whole[7:14])
    assert torch.equal(permutation_stream(7, 5, 9, seed=3), whole[5:14])  # any window, same stream


def test_mixed_batches_have_the_fraction_and_two_ranks_split_each_batch():
    kw = {"batch_size": 20, "fraction": 0.7, "epoch_samples": 90, "seed": 1}
    one = MixedBatchSampler(50, 300, **kw)
    ranks = [MixedBatchSampler(50, 300, rank=r, world=2, **kw) for r in (0, 1)]
    seen_generated = []
    for epoch in (1, 2, 3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == len(one) == 5                          # ceil(90 / 20) full batches
        for batch, r0, r1 in zip(batches, *ranks):
            assert len(batch) == 20 and sum(i >= 50 for i in batch) == 14   # 70 % generated
            assert len(r0) == len(r1) == 10 and sorted(r0 + r1) == sorted(batch)
            seen_generated += [i for i in batch if i >= 50]
        assert batches == list(one)                                   # depends only on the epoch
    # 3 epochs x 5 batches x 14 = 210 of 300 generated images: none repeats within a pass.
    assert len(set(seen_generated)) == 210 and min(seen_generated) >= 50
    with pytest.raises(UserError, match="generated_fraction"):
        MixedBatchSampler(50, 0, **kw)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from torch.utils.data import DataLoader
    from advgkl.config import load_config
    from advgkl.data.tensors import train_dataset
    from advgkl.data.generated import MixedBatchSampler, convert, open_generated
    from advgkl.training.loop import train

    path, out, demo = sys.argv[1:4]
    cfg = load_config(demo, ["data.generated=" + path, "data.generated_fraction=0.7",
                             "data.epoch_samples=512", "data.num_workers=0", "train.epochs=1",
                             "model.arch=small-cnn", "eval.val_size=64", "run.name=run"])
    train(cfg, out + "-run", echo=False)                      # one epoch with generated images
    split = open_generated(path, num_classes=10, image_size=16)
    n = len(split.labels)
    batches = MixedBatchSampler(0, n, batch_size=1000, fraction=1.0, epoch_samples=n, seed=0)
    loader = DataLoader(train_dataset(split, augment="basic", two_view=False, on_device=True),
                        batch_sampler=batches)
    assert sum(len(x) for x, _ in loader) == n                # every image read once
    convert(path, out, progress=False)
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def peak_rss_mb(tmp_path, n_images, name):
    image = np.broadcast_to(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3),
                            (n_images, 16, 16, 3))
    np.savez(tmp_path / f"{name}.npz", image=image, label=np.arange(n_images) % 10)
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / f"{name}.npz"),
                           str(tmp_path / f"{name}-conv"), str(DEMO)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    n, peak = map(int, done.stdout.split())
    assert n == n_images
    return peak


@pytest.mark.slow
def test_training_reading_and_converting_a_large_file_keep_memory_flat(tmp_path):
    """One training epoch on a 307 MB generated file, then every image of it through the loader,
    then its conversion: peak RSS within 64 MB of the same work on a 0.8 MB file."""
    small = peak_rss_mb(tmp_path, 1_000, "small")
    large = peak_rss_mb(tmp_path, 400_000, "large")
    assert large - small < 64, (small, large)

"""ImageNet and other image folders, streamed from disk: training from the folder and from its
shards through `advgkl train`, RobustBench's evaluation points, the ImageNet record and export,
DDP's share of the images, and bad input (one line, exit 2, nothing written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, kill_when
from trees import config, folder_tree, imagenet_tree, one_line_error

from advgkl.cli import main
from advgkl.compat import import_robustbench
from advgkl.data.folders import FolderDataset, load_points, preprocessing, training_tree


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    """One epoch from the folder and one from its shards, through the command a user types."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(tmp, tree)
    assert main(["data", "shards", str(tree), "--out", str(tmp / "shards"),
                 "--shard-size", "16"]) == 0
    assert main(["train", str(cfg), "run.name=folder"]) == 0
    assert main(["train", str(cfg), "run.name=shards", f"data.shards={tmp / 'shards'}"]) == 0
    return tmp


@pytest.mark.slow
def test_folder_and_shards_train_the_same_weights(trained):
    folder, shards = (torch.load(trained / "runs" / n / "last.pt", weights_only=True)
                      for n in ("folder", "shards"))
    assert folder["num_classes"] == 1000 and folder["arch"] == "timm:test_efficientnet"
    assert all(torch.equal(v, shards["model"][k]) for k, v in folder["model"].items())
    log = (trained / "runs" / "shards" / "train.log").read_text()
    assert "40 training images of 1000 classes from" in log and "(3 shards)" in log
    index = json.loads((trained / "shards" / "train.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [16, 16, 16]


@pytest.mark.slow
def test_a_run_killed_after_an_epoch_resumes_bit_identically(trained, tree, tmp_path):
    """From shards, with loader workers and timm's random transforms: SIGKILL once epoch 1 is
    saved, `advgkl train --resume`, and the weights equal an uninterrupted 2-epoch run's."""
    cfg = config(tmp_path, tree, data={"shards": str(trained / "shards")}, train={"epochs": 2})
    assert main(["train", str(cfg), "run.name=whole"]) == 0
    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "advgkl", "train", str(cfg), "run.name=killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: "epoch 1:" in ((run / "train.log").read_text()
                                           if (run / "train.log").exists() else ""))
    assert main(["train", "--resume", str(run)]) == 0
    whole, resumed = (torch.load(tmp_path / "runs" / n / "last.pt", weights_only=True)
                      for n in ("whole", "killed"))
    assert resumed["epoch"] == 2 and "resumed from" in (run / "train.log").read_text()
    assert all(torch.equal(v, resumed["model"][k]) for k, v in whole["model"].items())


def robustbench_points(root, n, prep):
    import_robustbench()
    from robustbench.data import PREPROCESSINGS, load_imagenet

    return load_imagenet(n, str(root), PREPROCESSINGS[prep])


@pytest.mark.parametrize("prep", ["Res256Crop224", "BicubicRes256Crop224"])
def test_points_and_labels_equal_robustbench_load_imagenet(tree, prep):
    x, y = robustbench_points(tree, 6, prep)
    ours = load_points(tree, "imagenet", 6, prep, workers=0, progress=False)
    assert ours.images.dtype == torch.uint8
    assert torch.equal(ours.images.float() / 255, x) and torch.equal(ours.labels, y)


@pytest.mark.slow
def test_eval_writes_an_imagenet_record_on_robustbench_points(trained, tree, tmp_path):
    out = tmp_path / "res"
    assert main(["eval", str(trained / "runs" / "folder" / "last.pt"), "--n-examples", "6",
                 "--batch-size", "6", "--out", str(out)]) == 0
    records = out / "imagenet" / "Linf"
    info = json.loads((records / "folder.json").read_text())
    assert info["eps"] == "4/255" and info["dataset"] == "imagenet" and info["unreliable"] is False
    detailed = json.loads((records / "folder.detailed.json").read_text())
    assert detailed["data"]["preprocessing"] == "Res36Crop32"
    _, y = robustbench_points(tree, 6, "Res256Crop224")
    assert detailed["result"]["labels"] == y.tolist()
    # The bundle in RobustBench's ImageNet form, verified against RobustBench's own class.
    bundle = tmp_path / "bundle"
    assert main(["export", str(trained / "runs" / "folder" / "last.pt"), "--eval",
                 str(records / "folder.json"), "--out", str(bundle), "--allow-partial"]) == 0
    entry = (bundle / "model_zoo_entry.py").read_text()
    assert "normalize_model(timm.create_model('test_efficientnet'" in entry
    assert "'preprocessing': 'Res36Crop32'" in entry and "imagenet.py" in entry
    assert "not 5,000" in (bundle / "new_model_issue.md").read_text()


@pytest.mark.slow
def test_each_training_image_is_seen_once_per_epoch_under_ddp(tree, tmp_path):
    """Two gloo processes, two loader workers each: the images the ranks draw in an epoch are
    the training set, each once (compared by their decoded bytes)."""
    cfg = config(tmp_path, tree, data={"augment": "none"}, eval={"check": "none"})
    torch.multiprocessing.spawn(_draw_epoch, args=(str(cfg), str(tmp_path), free_port()),
                                nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    tree_ = training_tree(tree, "imagenet")
    fixed = FolderDataset(tree_.samples, preprocessing("Res36Crop32", floats=True))
    everything = sorted(_digest(fixed[i][0]) for i in range(len(fixed)))
    assert len(seen[0]) == len(seen[1]) == len(everything) // 2
    assert sorted(seen[0] + seen[1]) == everything


def _digest(image):
    import hashlib

    return hashlib.sha256((image * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


def _draw_epoch(rank, cfg_path, out, port):
    import torch.distributed as dist

    from advgkl.config import load_config
    from advgkl.data.train_data import epoch_loader, training_data
    from advgkl.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = load_config(cfg_path)
    data = training_data(cfg)
    loader = epoch_loader(cfg, data.dataset, data.n_real, DistInfo(rank, 2), 1, False)
    digests = [_digest(x) for batch, _ in loader for x in batch]
    Path(out, f"rank{rank}.json").write_text(json.dumps(digests))
    dist.destroy_process_group()


def test_any_image_folder_trains_and_evaluates(tmp_path):
    root = tmp_path / "pets"
    folder_tree(root)
    cfg = config(tmp_path, root, data={"dataset": "folder"}, eval={"val_size": 3},
                 model={"arch": "small-cnn"})
    assert main(["train", str(cfg), "run.name=pets"]) == 0
    assert torch.load(tmp_path / "runs" / "pets" / "last.pt", weights_only=True)["num_classes"] == 3
    assert main(["eval", str(tmp_path / "runs" / "pets" / "last.pt"), "--quick", "pgd-2",
                 "--out", str(tmp_path / "res")]) == 0
    record = json.loads((tmp_path / "res" / "folder" / "Linf" / "pets.pgd-2.json").read_text())
    assert record["n_examples"] == 6 and record["result"]["labels"] == [0, 0, 1, 1, 2, 2]


def _no_run(tmp_path):
    return not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "no class folders"),
    ("not-wnids", "ImageNet's are the 1000 wnids"),
    ("val-differs", "have different class folders"),
    ("no-images", "no images in its class folders"),
])
def test_bad_folders_are_one_line_and_leave_nothing(case, message, tmp_path, capsys):
    root = tmp_path / "data"
    dataset = "folder"
    if case == "empty":
        (root / "train").mkdir(parents=True)
    elif case == "not-wnids":
        folder_tree(root)
        dataset = "imagenet"
    elif case == "val-differs":
        folder_tree(root)
        (root / "val" / "fox").mkdir()
    elif case == "no-images":
        (root / "train" / "cat").mkdir(parents=True)
    cfg = config(tmp_path, root, data={"dataset": dataset}, model={"arch": "small-cnn"})
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, message)
    assert _no_run(tmp_path)


@pytest.mark.slow
def test_a_corrupt_jpeg_is_named_in_one_line(tmp_path, capsys):
    """In a loader worker of `advgkl train` (a real process), and among the check's points."""
    root = tmp_path / "pets"
    folder_tree(root)
    bad = root / "train" / "dog" / "3.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = config(tmp_path, root, data={"dataset": "folder"}, eval={"check": "none"},
                 model={"arch": "small-cnn"})
    done = subprocess.run([sys.executable, "-m", "advgkl", "train", str(cfg)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"advgkl: error: {bad}: not a readable image")
    assert _no_run(tmp_path)
    (root / "val" / "cat" / "v0.jpg").write_bytes(b"broken")
    cfg = config(tmp_path, root, data={"dataset": "folder", "num_workers": 0},
                 model={"arch": "small-cnn"}, eval={"check": "test", "holdout_size": 2})
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, "v0.jpg: not a readable image")
    assert _no_run(tmp_path)


def test_shards_that_do_not_match_their_folder_are_refused(tree, tmp_path, capsys):
    assert main(["data", "shards", str(tree), "--out", str(tmp_path / "shards"),
                 "--shard-size", "32"]) == 0
    assert main(["data", "shards", str(tree), "--out", str(tmp_path / "shards")]) == 2
    one_line_error(capsys, "already exists")
    other = tmp_path / "other"
    imagenet_tree(other, n_val=8, per_class=5)
    cfg = config(tmp_path, other, data={"shards": str(tmp_path / "shards")})
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, "does not match")
    with open(tmp_path / "shards" / "train-000001.tar", "r+b") as f:   # a truncated shard
        f.truncate(1000)
    cfg = config(tmp_path, tree, data={"shards": str(tmp_path / "shards")})
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, "train-000001.tar: missing or of another size")
    assert _no_run(tmp_path)


def test_a_stopped_shard_writer_continues_with_the_complete_shards(tree, tmp_path):
    from advgkl.data.shards import tree_fingerprint, write_shards
    from advgkl.errors import UserError

    out = tmp_path / "shards"
    write_shards(tree, out, dataset="imagenet", shard_size=16, progress=False)
    first = (out / "train-000000.tar").stat().st_mtime_ns
    (out / "train.json").unlink()                    # as if stopped before the index
    (out / "train-000002.tar").unlink()
    (out / ".train.source").write_text(f"{tree_fingerprint(training_tree(tree, 'imagenet'))} 16")
    with pytest.raises(UserError, match="another tree or shard size"):
        write_shards(tree, out, dataset="imagenet", shard_size=32, progress=False)
    write_shards(tree, out, dataset="imagenet", shard_size=16, progress=False)
    assert (out / "train-000000.tar").stat().st_mtime_ns == first
    assert (out / "train-000002.tar").is_file() and not (out / ".train.source").exists()
    (out / "train.json").unlink()   # shards without their writer's marker are not reused
    with pytest.raises(UserError, match="did not start"):
        write_shards(tree, out, dataset="imagenet", shard_size=16, progress=False)

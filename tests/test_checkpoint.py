"""Checkpoints: atomic saves, weights-only loading, clear errors, foreign imports, the CLI."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import advgkl.checkpoint as ckpt_mod
from advgkl.checkpoint import (CheckpointError, clean_foreign_state_dict, load_checkpoint,
                               model_checkpoint, save_checkpoint)
from advgkl.models import create_model
from advgkl.models.loading import import_checkpoint, model_from_checkpoint


def tiny_checkpoint(arch="wrn-10-1", classes=10, **extra):
    torch.manual_seed(0)
    return model_checkpoint(create_model(arch, classes).state_dict(), arch=arch,
                            num_classes=classes, **extra)


def test_round_trip_is_self_describing(tmp_path):
    ckpt = tiny_checkpoint(epoch=3, config={"train": {"lr": 0.1}}, metrics={"robust_acc": 0.5},
                           rng={"torch": torch.get_rng_state(), "python": (3, (1, 2), None)})
    save_checkpoint(tmp_path / "last.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["format_version"] == 1 and loaded["arch"] == "wrn-10-1"
    assert loaded["epoch"] == 3 and loaded["config"] == {"train": {"lr": 0.1}}
    model = model_from_checkpoint(loaded)
    for key, value in ckpt["model"].items():
        assert torch.equal(model.state_dict()[key], value)


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def crashing_save(obj, f):
        f.write(b"PK\x03\x04 partial bytes of a new checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_killed_process_never_leaves_a_truncated_file(tmp_path):
    """SIGKILL a process that saves large checkpoints in a loop: the file always loads."""
    path = tmp_path / "last.pt"
    code = (f"import torch\nfrom advgkl.checkpoint import save_checkpoint\nimport sys\n"
            f"i = 0\nwhile True:\n    save_checkpoint({str(path)!r}, "
            f"{{'i': i, 'w': torch.full((2_000_000,), float(i))}})\n"
            f"    i += 1\n    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        proc.stdout.readline()  # a few saves completed; now kill it mid-way through the next
    proc.kill()
    proc.wait()
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((2_000_000,), float(state["i"])))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: loading it needs arbitrary unpickling"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        import_checkpoint(tmp_path / "evil.pt", arch="wrn-10-1", num_classes=10)
    assert not marker.exists()


def test_truncated_corrupt_and_missing_files(tmp_path):
    save_checkpoint(tmp_path / "good.pt", tiny_checkpoint())
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match=f"{name}: corrupt or truncated checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_wrong_architecture_names_the_keys():
    ckpt = tiny_checkpoint()
    ckpt["arch"] = "wrn-10-1-swish"
    with pytest.raises(CheckpointError, match="missing keys: \\['init_conv.weight'.*unexpected "
                                              "keys: \\['conv1.weight'"):
        model_from_checkpoint(ckpt)


def test_wrong_num_classes():
    ckpt = tiny_checkpoint(classes=100)
    ckpt["num_classes"] = 10
    with pytest.raises(CheckpointError, match="fc.weight has shape \\(100, 64\\), the model "
                                              "expects \\(10, 64\\) \\(a different number of"):
        model_from_checkpoint(ckpt)


def test_not_an_advgkl_checkpoint():
    with pytest.raises(CheckpointError, match="not an advgkl checkpoint \\(no 'arch' entry\\)"):
        model_from_checkpoint({"model": {}})


def test_unknown_architecture():
    ckpt = tiny_checkpoint()
    ckpt["arch"] = "vit-b"
    with pytest.raises(CheckpointError, match="unknown model 'vit-b'"):
        model_from_checkpoint(ckpt)


def foreign_file(tmp_path, wrap, prefix):
    torch.manual_seed(0)
    state = create_model("wrn-10-1", 100).state_dict()
    foreign = {prefix + k: v for k, v in state.items()}
    foreign[prefix + "sub_block1.layer.0.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    obj = {wrap: foreign, "epoch": 200} if wrap else foreign
    torch.save(obj, tmp_path / "foreign.pth")
    return state


@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "module.0."])
def test_import_of_wrapped_prefixed_state_dicts(tmp_path, wrap, prefix):
    state = foreign_file(tmp_path, wrap, prefix)
    ckpt = import_checkpoint(tmp_path / "foreign.pth", arch="wrn-10-1", num_classes=100)
    assert ckpt["arch"] == "wrn-10-1" and ckpt["num_classes"] == 100
    assert list(ckpt["model"]) == list(state)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state.items())


def test_clean_foreign_state_dict_keeps_only_tensors():
    cleaned = clean_foreign_state_dict({"module.a": torch.ones(1), "note": "hi"})
    assert list(cleaned) == ["a"]


def test_import_with_the_wrong_class_count_fails_clearly(tmp_path):
    foreign_file(tmp_path, None, "")
    with pytest.raises(CheckpointError, match="a different number of classes"):
        import_checkpoint(tmp_path / "foreign.pth", arch="wrn-10-1", num_classes=10)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "advgkl", *args], capture_output=True, text=True)


def test_import_checkpoint_command(tmp_path):
    foreign_file(tmp_path, "state_dict", "module.")
    out = tmp_path / "ckpts" / "imported.pt"
    args = ["import-checkpoint", str(tmp_path / "foreign.pth"), "--arch", "wrn-10-1",
            "--num-classes", "100", "--out", str(out)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert model_from_checkpoint(load_checkpoint(out)) is not None
    again = run_cli(*args)  # never overwrite
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("import-checkpoint", str(tmp_path / "nope.pth"), "--arch", "wrn-10-1",
                  "--num-classes", "10", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr

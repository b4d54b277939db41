"""The installed `advgkl` command: version, config printing, one-line errors with exit 2."""

import subprocess
import sys
from pathlib import Path

import yaml

from advgkl import __version__
from advgkl.config import build_config


def run(*args):
    return subprocess.run([sys.executable, "-m", "advgkl", *args], capture_output=True, text=True)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"advgkl {__version__}"


def test_config_prints_the_resolved_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n")
    out = run("config", str(path), "attack.eps=4/255")
    assert out.returncode == 0, out.stderr
    assert build_config(yaml.safe_load(out.stdout)) == build_config(
        {"train": {"epochs": 7}}, ["attack.eps=4/255"])


def test_config_shows_the_switched_methods_own_values():
    """`advgkl config` on the GKL demo with loss.method=mart: MART's beta 6 and CE attack, only
    MART's section, and a note saying the file's GKL values stay with GKL."""
    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    out = run("config", str(demo), "loss.method=mart")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["loss"] == {"method": "mart", "mart": {"beta": 6.0, "form": "authors",
                                                          "label_smoothing": 0.0}}
    assert printed["attack"]["objective"] == "ce" and "alpha" not in printed["attack"]
    assert "stay with gkl; mart's own values apply" in out.stderr


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  eps: 8\n")
    for args in (["config", str(tmp_path / "missing.yaml")], ["config", str(path)],
                 ["config", str(path), "attack.eps=8/255", "train.bogus=1"]):
        out = run(*args)
        assert out.returncode == 2
        assert out.stderr.startswith("advgkl: error: ") and out.stderr.count("\n") == 1
        assert "Traceback" not in out.stderr


def test_each_subcommand_has_help():
    assert run("config", "--help").returncode == 0

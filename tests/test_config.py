"""The config system: precedence, round trip, and every error naming its key."""

import pytest
import yaml

from advgkl.config import Config, build_config, dump_config, load_config, save_config
from advgkl.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_when_file_is_empty(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 50\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=0.05"])
    assert cfg.train.epochs == 50          # YAML beats default
    assert cfg.train.lr == 0.05            # override beats YAML
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_fraction_and_plain_eps_forms():
    cfg = build_config({"attack": {"eps": "8/255", "step_size": "2 / 255"},
                        "eval": {"norm": "L2", "eps": 0.5}})
    assert cfg.attack.eps == 8 / 255
    assert cfg.attack.step_size == 2 / 255
    assert cfg.eval.eps == 0.5


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `5e-4` as a string; the float field still takes it.
    assert load_config(write(tmp_path, "train:\n  weight_decay: 5e-4\n")).train.weight_decay == 5e-4


def test_round_trip_reproduces_the_config(tmp_path):
    cfg = build_config({"loss": {"method": "ikl", "gamma": 0.4}},
                       ["attack.eps=4/255", "train.lr_milestones=[50, 75]", "eval.norm=L2",
                        "eval.eps=0.5", "run.name=x"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert "eps: 4/255" in dump_config(cfg)


def test_override_values_are_parsed_as_yaml():
    cfg = build_config({}, ["train.nesterov=false", "train.lr_milestones=[10, 20]",
                            "data.root=/tmp/x y"])
    assert cfg.train.nesterov is False
    assert cfg.train.lr_milestones == [10, 20]
    assert cfg.data.root == "/tmp/x y"


@pytest.mark.parametrize("overrides, message", [
    (["attack.epsilon=1"], "attack.epsilon: unknown key; attack has norm, eps"),
    (["atack.eps=1"], "atack.eps: unknown key; keys are section.name with section one of data"),
    (["eps=1"], "eps: unknown key"),
    (["train.epochs"], "expected section.key=value"),
    (["train.epochs=ten"], "train.epochs: expected an integer, got 'ten'"),
    (["train.epochs=2.5"], "train.epochs: expected an integer"),
    (["train.nesterov=1"], "train.nesterov: expected true or false"),
    (["train.lr=fast"], "train.lr: expected a number such as 0.5 or 8/255"),
    (["attack.eps=8/0"], "attack.eps: '8/0' divides by zero"),
    (["data.root=3"], "data.root: expected a string"),
    (["train.lr_milestones=5"], "train.lr_milestones: expected a list"),
    (["train.lr_milestones=[5, x]"], "train.lr_milestones[1]: expected an integer"),
    (["loss.method=kl"], "loss.method: 'kl' is not one of pgd_at, trades, ikl, gkl"),
    (["attack.norm=linf"], "attack.norm: 'linf' is not one of Linf, L2"),
    (["train.epochs=0"], "train.epochs: 0 must be >= 1"),
    (["train.lr=0"], "train.lr: 0.0 must be > 0"),
    (["train.momentum=1"], "train.momentum: 1.0 must be < 1"),
    (["loss.prior_momentum=1.5"], "loss.prior_momentum: 1.5 must be <= 1"),
    (["attack.eps=-1/255"], "attack.eps: -0.00392156862745098 must be >= 0"),
    (["train.lr_schedule=piecewise", "train.lr_milestones=[150, 100]"],
     "train.lr_milestones: [150, 100] must be increasing"),
    (["train.lr_schedule=piecewise", "train.epochs=10"], "between 1 and train.epochs - 1 (9)"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("key", ["attack.eps", "attack.step_size", "eval.eps"])
def test_linf_eps_above_one_is_the_8_instead_of_8_over_255_mistake(key):
    with pytest.raises(ConfigError, match=rf"{key}: 8 is larger than 1.*did you mean 8/255"):
        build_config({}, [f"{key}=8"])


def test_l2_eps_above_one_is_allowed():
    assert build_config({}, ["eval.norm=L2", "eval.eps=1.5"]).eval.eps == 1.5


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping of sections, got list"),
    ("train: 5\n", "section 'train' must be a mapping"),
    ("train:\n  epochs: [1\n", "not valid YAML at line"),
    ("bogus:\n  x: 1\n", "bogus.x: unknown key"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load(config_paths):
    for path in config_paths:
        cfg = load_config(path)
        assert yaml.safe_load(dump_config(cfg))  # printable


@pytest.fixture
def config_paths():
    from pathlib import Path

    paths = sorted(p for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml")
                   if p.parent.name != "studies")  # study files: tests/test_study.py
    assert paths, "no shipped configs found"
    return paths

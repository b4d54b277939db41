"""The config system: precedence, round trip, every error naming its key, and method settings
that follow the method."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from advgkl.config import (Config, build_config, config_to_dict, dump_config, load_config,
                           save_config)
from advgkl.config.binding import RECIPE_STARTS
from advgkl.config.methods import DISTILLATION, METHODS
from advgkl.errors import ConfigError

ROOT = Path(__file__).parent.parent
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "studies")


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_when_file_is_empty(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg == build_config({})
    assert (cfg.loss.method, cfg.attack.objective, cfg.attack.random_start) == \
        ("gkl", "kl", "normal")
    assert cfg.loss.gkl == METHODS["gkl"].settings()   # the published values


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
    cfg = build_config({"loss": {"method": "gkl", "gamma": 0.4}},
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
    (["loss.method=kl"], "loss.method: 'kl' is not one of pgd_at, trades, mart, lbgat, ikl, gkl"),
    (["attack.norm=linf"], "attack.norm: 'linf' is not one of Linf, L2"),
    (["train.epochs=0"], "train.epochs: 0 must be >= 1"),
    (["train.lr=0"], "train.lr: 0.0 must be > 0"),
    (["train.momentum=1"], "train.momentum: 1.0 must be < 1"),
    (["loss.prior_momentum=1.5"], "loss.gkl.prior_momentum: 1.5 must be <= 1"),
    (["attack.eps=-1/255"], "attack.eps: -0.00392156862745098 must be >= 0"),
    (["train.lr_schedule=piecewise", "train.lr_milestones=[150, 100]"],
     "train.lr_milestones: [150, 100] must be increasing"),
    (["train.lr_schedule=piecewise", "train.epochs=10"], "between 1 and train.epochs (10)"),
    (["train.lr_first_epochs=[0.02, 0]"], "train.lr_first_epochs: [0.02, 0.0] must be > 0"),
    (["loss.alpha=3", "loss.method=mart"], "loss.mart.alpha: method mart has no 'alpha'"),
    (["loss.trades.beta=3"], "loss.trades.beta: the run trains loss.method=gkl; set "
                             "loss.method=trades too, or set loss.gkl.beta"),
    (["loss.gkl=3"], "loss.gkl: a section; set its keys"),
    (["attack.alpha=3"], "attack.alpha: 3.0 is not used: only attack.objective gkl has it"),
    (["loss.method=rslad", "distill.teacher=t.pt", "loss.gkl_beta=3", "awp.gamma=0"],
     "loss.rslad.gkl_beta: 3.0 is not used: switched off by the other loss.rslad values"),
    (["loss.method=rslad", "awp.gamma=0"], "distill.teacher: method rslad distils a teacher"),
    (["distill.teacher=t.pt"], "distill.teacher: method gkl trains without a teacher"),
    (["loss.method=lbgat"], "awp.gamma: method lbgat runs without AWP; set awp.gamma=0"),
    (["loss.method=ard", "distill.teacher=t.pt", "data.two_view=true", "awp.gamma=0"],
     "data.two_view: method ard trains on one view"),
    (["loss.method=trades", "attack.objective=gkl"], "attack.objective: gkl weighs by the class "
                                                     "prior of the trained model"),
    (["attack.objective=teacher_kl"], "attack.objective: teacher_kl attacks through a teacher"),
    (["run.name=../../x"], "run.name: '../../x' must be a plain name"),
    (["run.name=.."], "run.name: '..' must be a plain name"),
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


def test_shipped_configs_load():
    assert SHIPPED
    for path in SHIPPED:
        cfg = load_config(path)
        assert yaml.safe_load(dump_config(cfg))  # printable
        assert cfg.loss.method in path.stem.replace("-", "_") or path.parent.name == "demo"


TEACHER = ["distill.teacher=teacher.pt"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_switching_method_gives_its_published_settings_or_one_line_naming_what_to_set(path,
                                                                                       method):
    """`advgkl config CFG loss.method=M`: M's own values and attack, never the file's method's;
    or a refusal that names the key to set (a teacher, AWP off, one view)."""
    file_cfg = load_config(path)
    file_method, file_teacher = file_cfg.loss.method, bool(file_cfg.distill.teacher)
    notes = []
    try:
        cfg = load_config(path, [f"loss.method={method}"], notes=notes)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        mixing = file_cfg.data.mixup > 0 or file_cfg.data.cutmix > 0
        keys = {"distill.teacher": (method in DISTILLATION) != file_teacher,
                "awp.gamma": not METHODS[method].awp,
                "data.two_view": not METHODS[method].two_view,
                "data.mixup": mixing and not METHODS[method].soft_targets}
        assert any(key in message and why for key, why in keys.items()), message
        teacher = TEACHER if method in DISTILLATION else ["distill.teacher="]
        unmix = ["data.mixup=0", "data.cutmix=0", "data.smoothing=0"] if mixing else []
        cfg = load_config(path, [f"loss.method={method}", "awp.gamma=0", "data.two_view=false",
                                 *teacher, *unmix])
    if method != file_method:
        assert cfg.loss.settings == METHODS[method].settings()
        if notes:
            assert f"stay with {file_method}" in notes[0]
    assert cfg.attack.objective == METHODS[method].attack_objective(cfg.data.dataset)
    assert cfg.attack.random_start == RECIPE_STARTS.get(cfg.attack.kind, METHODS[method].start)
    printed = config_to_dict(cfg)["loss"]
    assert set(printed) == {"method", method}   # only the chosen method's values


def test_mart_on_the_demo_config_is_beta_6_with_a_ce_attack():
    cfg = load_config(ROOT / "configs" / "demo" / "digits_gkl.yaml", ["loss.method=mart"])
    assert (cfg.loss.mart.beta, cfg.attack.objective) == (6.0, "ce")
    printed = config_to_dict(cfg)
    assert printed["loss"] == {"method": "mart",
                               "mart": {"beta": 6.0, "form": "authors", "label_smoothing": 0.0}}
    assert "alpha" not in printed["attack"] and "distill" not in printed


def test_flat_keys_belong_to_the_method_named_beside_them(tmp_path):
    path = write(tmp_path, "loss:\n  method: trades\n  beta: 9\nattack:\n  objective: ce\n")
    same = load_config(path, ["loss.beta=7"])
    assert (same.loss.trades.beta, same.attack.objective) == (7.0, "ce")
    switched = load_config(path, ["loss.method=mart"])      # the file's values stay with trades
    assert (switched.loss.mart.beta, switched.attack.objective) == (6.0, "ce")
    gkl = load_config(path, ["loss.method=gkl", "loss.beta=30"])   # command-line keys: its own
    assert (gkl.loss.gkl.beta, gkl.attack.objective) == (30.0, "kl")


def test_a_file_may_hold_several_methods_sections(tmp_path):
    path = write(tmp_path, "loss:\n  method: gkl\n  trades:\n    beta: 9\n  gkl:\n    beta: 10\n")
    assert load_config(path).loss.gkl.beta == 10.0
    assert load_config(path, ["loss.method=trades"]).loss.trades.beta == 9.0


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_round_trips(method, tmp_path):
    extra = TEACHER if method in DISTILLATION else []
    cfg = build_config({}, [f"loss.method={method}", "awp.gamma=0", *extra])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(tmp_path / "saved.yaml", saved=True) == cfg


LEGACY = {  # a run folder's config.yaml as the previous version wrote it (every key, flat)
    "attack": {"norm": "Linf", "eps": "8/255", "step_size": "2/255", "steps": 10,
               "objective": "ce", "alpha": 1.0, "beta": 1.0, "gamma": 1.0,
               "random_start": "normal", "schedule": "constant"},
    "loss": {"method": "mart", "alpha": 4.0, "beta": 6.0, "gamma": 1.0, "temperature": 1.0,
             "prior_temperature": 4.0, "prior_momentum": 1.0, "prior_update": "epoch",
             "label_smoothing": 0.0, "natural_arch": "preact-resnet-18"},
}


def test_old_run_folders_configs_still_load():
    with pytest.raises(ConfigError, match="loss.mart.alpha"):
        build_config(LEGACY)        # as user input: keys MART does not have are refused
    cfg = build_config(LEGACY, saved=True)
    assert (cfg.loss.method, cfg.loss.mart.beta, cfg.attack.objective) == ("mart", 6.0, "ce")
    assert cfg.loss.mart.form == "exact"    # what it trained with before the authors' form
    lbgat = {**LEGACY, "loss": {**LEGACY["loss"], "method": "lbgat"}}
    assert build_config(lbgat, ["awp.gamma=0"], saved=True).loss.lbgat.natural_arch == \
        "preact-resnet-18"


def test_settings_defaults_are_the_published_values():
    """The values each method's authors' code runs (the docstring of advgkl.config.methods)."""
    published = {"trades": {"beta": 6.0}, "mart": {"beta": 6.0, "form": "authors"},
                 "lbgat": {"beta": 6.0, "natural_arch": "resnet-18-lbgat"},
                 "gkl": {"alpha": 4.0, "beta": 20.0, "gamma": 1.0, "temperature": 1.0,
                         "prior_temperature": 4.0},
                 "ard": {"alpha": 1.0, "temperature": 30.0},
                 "rslad": {"adv_weight": 5 / 6.0, "nat_weight": 1 / 6.0, "divergence": "kl"},
                 "adaad": {"alpha": 1.0, "divergence": "kl"},
                 "gkl_kd": {"alpha": 1.0, "beta": 16.0, "gamma": 0.05, "temperature": 4.0,
                            "prior_temperature": 4.0, "warmup": 20, "ce_weight": 1.0},
                 "fgsm_rs": {"step": 1.25, "start": "uniform"},
                 "n_fgsm": {"noise": 2.0, "step": 1.0, "clip": 0.0},
                 "grad_align": {"reg_weight": 0.2, "step": 1.25}}
    for method, values in published.items():
        settings = dataclasses.asdict(METHODS[method].settings())
        assert {k: settings[k] for k in values} == values, method
    attacks = {m.name: (m.attack, m.start) for m in METHODS.values()}
    assert attacks == {"pgd_at": ("ce", "uniform"), "trades": ("kl", "normal"),
                       "mart": ("ce", "normal"), "lbgat": ("kl", "normal"),
                       "ikl": ("kl", "normal"), "gkl": ("kl", "normal"),
                       "ard": ("ce", "uniform_unclamped"), "rslad": ("teacher_kl", "normal"),
                       "adaad": ("adaad", "normal"), "gkl_kd": ("teacher_kl", "normal"),
                       "fgsm_rs": ("ce", "uniform"), "n_fgsm": ("ce", "uniform"),
                       "grad_align": ("ce", "none"), "singh_at": ("ce", "none"),
                       "ares_at": ("ce", "uniform")}
    assert METHODS["gkl"].attack_objective("cifar100") == "gkl"

"""The fast methods and Rice et al.'s PGD-AT compute what their authors' scripts computed: our
trainer against a literal transcription of each script's training loop (the attack in the
model's train mode, the clamps in their order, the same random draws, the per-step lr), in
float64, over several epochs, on images with saturated pixels and every class in each epoch.

Transcribed from: Wong et al., locuslab/fast_adversarial 54f7287 CIFAR10/train_fgsm.py;
de Jorge et al., pdejorge/N-FGSM 0a9e4f0 train.py; Andriushchenko & Flammarion,
tml-epfl/understanding-fast-adv-training ceed494 train.py and utils.py; Rice et al.,
locuslab/robust_overfitting c47a25c train_cifar.py (normalisation outside their models is
inside ours: the same function of the [0, 1] image).
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_states_close
from test_paper_pipeline import N_IMAGES, saturated_images

import advgkl.data.train_data as train_data
import advgkl.training.loop as train_mod
from advgkl.attacks.pgd import PGDAttack
from advgkl.attacks.single_step import SingleStepAttack, build_single_step, gradient_alignment
from advgkl.checkpoint import load_checkpoint
from advgkl.config import ConfigError, build_config
from advgkl.config.binding import attack_description
from advgkl.config.methods import METHODS
from advgkl.data.tensors import train_dataset
from advgkl.distributed import DistInfo
from advgkl.models import create_model
from advgkl.training.build import build_attack
from advgkl.training.schedules import cyclic_momentum, learning_rate

EPS = 8 / 255
BASE = {"data": {"dataset": "cifar10", "augment": "none", "num_workers": 0},
        "model": {"arch": "wrn-10-1"}, "awp": {"gamma": 0.0},
        "train": {"batch_size": 100, "device": "cpu", "seed": 3},
        "eval": {"check": "none"}}


def _clamp(x, lower, upper):
    """Their utils.clamp, max(min(x, upper), lower), with the rule at a tie of their pinned torch
    1.4.0 made explicit: there x gets no gradient (today's torch.max / min split a tie, 0.5
    each). The values are max(min(x, upper), lower)'s."""
    upper, lower = (torch.as_tensor(b, dtype=x.dtype) for b in (upper, lower))
    below = torch.where(x < upper, x, upper)
    return torch.where(below > lower, below, lower)


def _uniform_per_channel(x, radius):
    delta = torch.zeros_like(x)
    for j in range(x.shape[1]):
        delta[:, j, :, :].uniform_(-radius, radius)
    return delta


def wong_or_de_jorge(model, batches, epochs, n, *, n_fgsm):
    """train_fgsm.py (FGSM-RS: --delta-init random, alpha 10/255) or N-FGSM's train.py (unif 2,
    alpha 8/255, clip -1): CyclicLR 0 -> 0.2 -> 0, SGD 0.9, wd 5e-4, the model in train mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2,
                                                  step_size_up=epochs * n / 2,
                                                  step_size_down=epochs * n / 2)
    model.train()
    alpha = (1.0 if n_fgsm else 1.25) * EPS
    for epoch in range(1, epochs + 1):
        for X, y in batches(epoch):
            if n_fgsm:
                eta = _clamp(_uniform_per_channel(X, 2.0 * EPS), -X, 1 - X)
                eta.requires_grad = True
                grad = torch.autograd.grad(F.cross_entropy(model(X + eta), y), eta)[0].detach()
                delta = _clamp(eta + alpha * torch.sign(grad), -X, 1 - X).detach()
            else:
                delta = _uniform_per_channel(X, EPS)
                delta.data = _clamp(delta, -X, 1 - X)
                delta.requires_grad = True
                F.cross_entropy(model(X + delta), y).backward()
                grad = delta.grad.detach()
                delta.data = _clamp(delta + alpha * torch.sign(grad), -EPS * torch.ones_like(X),
                                    EPS * torch.ones_like(X))
                delta.data = _clamp(delta, -X, 1 - X)
                delta = delta.detach()
            loss = F.cross_entropy(model(X + delta), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
    return model.state_dict()


def andriushchenko(model, batches, epochs, n, *, lam=0.2):
    """GradAlign: --attack fgsm --attack_init zero, fgsm_alpha 1.25, the cyclic lr (peak at
    2/5, lr_max 0.2) set per step at t = epoch - 1 + (i + 1) / n; their epoch 0 (one forward-only
    batch) left out: our trainer does not run it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    model.train()
    for epoch in range(1, epochs + 1):
        for i, (X, y) in enumerate(batches(epoch)):
            lr = np.interp([epoch - 1 + (i + 1) / n], [0, epochs * 2 // 5, epochs], [0, 0.2, 0])[0]
            opt.param_groups[0].update(lr=lr)
            delta = torch.zeros_like(X, requires_grad=True)
            loss = F.cross_entropy(model(_clamp(X + delta, 0, 1)), y)
            grad = torch.autograd.grad(loss, delta, create_graph=True)[0].detach()
            delta.data = torch.clamp(delta.data + 1.25 * EPS * torch.sign(grad), -EPS, EPS)
            delta.data = torch.clamp(X + delta.data, 0, 1) - X
            delta = delta.detach()
            loss = F.cross_entropy(model(X + delta), y)
            eta = torch.zeros(X.shape).uniform_(-EPS, EPS).requires_grad_(True)
            grad2 = torch.autograd.grad(F.cross_entropy(model(X + eta), y), eta,
                                        create_graph=True)[0]
            nnz = ((grad ** 2).sum([1, 2, 3]) ** 0.5 != 0) * ((grad2 ** 2).sum([1, 2, 3]) ** 0.5 != 0)
            g1, g2 = grad[nnz], grad2[nnz]
            g1 = g1 / ((g1 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
            g2 = g2 / ((g2 ** 2).sum([1, 2, 3]) ** 0.5)[:, None, None, None]
            loss = loss + lam * (1.0 - torch.sum(g1 * g2, (1, 2, 3)).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


def rice(model, batches, epochs, n, *, steps):
    """train_cifar.py --attack pgd: lr 0.1 piecewise per step (/10 from t/epochs >= 0.5, /100
    from 0.75), the attack in train mode with its final per-point loss forward, the clean forward
    after the step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        model.train()
        for i, (X, y) in enumerate(batches(epoch + 1)):
            t = epoch + (i + 1) / n
            opt.param_groups[0].update(lr=0.1 if t / epochs < 0.5 else
                                       0.01 if t / epochs < 0.75 else 0.001)
            max_loss, max_delta = torch.zeros(y.shape[0]), torch.zeros_like(X)
            delta = torch.zeros_like(X)
            delta.uniform_(-EPS, EPS)
            delta = _clamp(delta, -X, 1 - X)
            delta.requires_grad = True
            for _ in range(steps):
                F.cross_entropy(model(X + delta), y).backward()
                grad = delta.grad.detach()
                d = torch.clamp(delta + 2 / 255 * torch.sign(grad), min=-EPS, max=EPS)
                delta.data = _clamp(d, -X, 1 - X)
                delta.grad.zero_()
            all_loss = F.cross_entropy(model(X + delta), y, reduction="none")
            max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
            robust_loss = F.cross_entropy(model(torch.clamp(X + max_delta, 0, 1)), y)
            opt.zero_grad()
            robust_loss.backward()
            opt.step()
            model(X)
    return model.state_dict()


CASES = {
    "fgsm_rs": ({"train": {"epochs": 3, "lr": 0.2, "lr_schedule": "cyclic",
                           "cycle_momentum": True}},
                lambda m, b, e, n: wong_or_de_jorge(m, b, e, n, n_fgsm=False)),
    "n_fgsm": ({"train": {"epochs": 3, "lr": 0.2, "lr_schedule": "cyclic",
                          "cycle_momentum": True}},
               lambda m, b, e, n: wong_or_de_jorge(m, b, e, n, n_fgsm=True)),
    "grad_align": ({"train": {"epochs": 3, "lr": 0.2, "lr_schedule": "superconverge"}},
                   andriushchenko),
    "pgd_at": ({"train": {"epochs": 4, "lr": 0.1, "lr_schedule": "piecewise_step",
                          "lr_milestones": [2, 3]}, "attack": {"steps": 3}},
               lambda m, b, e, n: rice(m, b, e, n, steps=3)),
}


def _config(method, extra):
    tree = {k: dict(v) for k, v in BASE.items()}
    tree["loss"] = {"method": method}
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    return build_config(tree)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_trainer_equals_a_transcription_of_the_authors_script(method, tmp_path, monkeypatch,
                                                              float64):
    monkeypatch.setattr(train_data, "load_split", saturated_images)
    extra, authors = CASES[method]
    cfg = _config(method, extra)
    train_mod.train(cfg, tmp_path / "run", echo=False)

    dataset = train_dataset(saturated_images("cifar10", train=True), augment="none",
                            two_view=False)

    def batches(epoch):  # the same images in the same order as the trainer drew them
        yield from train_data.epoch_loader(cfg, dataset, N_IMAGES, DistInfo(), epoch, False)

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.arch, 10)
    theirs = authors(model, batches, cfg.train.epochs, N_IMAGES // cfg.train.batch_size)
    ours = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert_states_close(ours, theirs, f"{method} weights", bound=1e-10)
    # BatchNorm's running statistics moved with every forward the script runs in train mode.
    assert_states_close(ours, {k: v for k, v in theirs.items() if "running" in k},
                        f"{method} BN statistics", bound=1e-10)


def test_n_fgsm_delta_is_not_projected_and_fgsm_rs_delta_is(float64):
    """N-FGSM's delta reaches past eps (up to 3 eps at k = 2), FGSM-RS's stays in the ball; both
    keep x + delta in the image."""
    torch.manual_seed(0)
    model = create_model("wrn-10-1", 10)
    x, y = saturated_images("cifar10", train=True).images[:32].double() / 255, torch.arange(32) % 10
    for method, bound in (("n_fgsm", 3 * EPS), ("fgsm_rs", EPS)):
        attack = build_single_step(METHODS[method].attack_kind, METHODS[method].settings(), EPS,
                                   random_start="uniform", objective="ce", bn_train=True)
        delta = (attack(model, x, y) - x).abs().amax()
        assert delta <= bound + 1e-12
        assert (delta > 1.5 * EPS) == (method == "n_fgsm")
        assert attack.start_grad is not None


def test_gradient_alignment_leaves_out_zero_gradients_and_backprops_twice(float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    grad = torch.randn_like(x)
    grad[1] = 0                          # left out: the mean runs over the other three
    torch.manual_seed(1)
    reg = gradient_alignment(model, x, y, grad, EPS)
    torch.manual_seed(1)
    eta = torch.zeros_like(x).uniform_(-EPS, EPS).requires_grad_(True)
    g2 = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta, create_graph=True)[0]
    keep = [0, 2, 3]
    cos = F.cosine_similarity(grad[keep].flatten(1), g2[keep].flatten(1), dim=1, eps=0)
    assert torch.allclose(reg, 1 - cos.mean(), atol=1e-14)
    (weight_grad,) = torch.autograd.grad(reg, [model[1].weight])
    assert weight_grad.abs().sum() > 0   # the regularizer reaches the weights (double backprop)


def test_cyclic_lr_and_momentum_equal_torch_s_cyclic_lr_step_by_step():
    epochs, n = 3, 7
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2,
                                                  step_size_up=epochs * n / 2,
                                                  step_size_down=epochs * n / 2)
    for epoch in range(1, epochs + 1):
        for i in range(n):
            group = opt.param_groups[0]
            assert learning_rate("cyclic", epoch, epochs, i, n, lr=0.2, warmup=0,
                                 milestones=[]) == group["lr"]
            assert cyclic_momentum(epoch, epochs, i, n) == group["momentum"]
            opt.step()
            scheduler.step()


def test_per_step_schedules_of_gradalign_and_rice():
    lr = [learning_rate("superconverge", e, 30, i, 4, lr=0.3, warmup=0, milestones=[])
          for e, i in ((1, 3), (12, 3), (30, 3))]
    assert lr == pytest.approx([0.3 / 12, 0.3, 0.0])
    rice = [learning_rate("piecewise_step", e, 200, i, 10, lr=0.1, warmup=0,
                          milestones=[100, 150]) for e, i in ((100, 8), (100, 9), (151, 0))]
    assert rice == [0.1, 0.01, 0.001]  # t = 99.9, 100.0, 150.1: their lr_max / 10, / 100


@pytest.mark.parametrize("overrides, message", [
    (["loss.method=fgsm_rs", "attack.kind=pgd"], "trains with its own fgsm step"),
    (["loss.method=trades", "attack.kind=fgsm"], "fgsm is the step of methods fgsm_rs"),
    (["loss.method=n_fgsm", "attack.norm=L2", "attack.eps=0.5"], "a Linf step"),
    (["loss.method=fgsm_rs", "attack.steps=3"], "attack.steps: 3 is not used"),
    (["loss.method=fgsm_rs", "train.lr_schedule=cosine", "train.cycle_momentum=true"],
     "only with train.lr_schedule cyclic"),
    (["loss.method=grad_align", "train.compile=true"], "no double backward"),
])
def test_fast_settings_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"awp": {"gamma": 0}}, overrides)


def test_gkl_with_n_fgsm_s_attack_keeps_gkl_s_loss_and_says_so():
    cfg = build_config({"awp": {"gamma": 0}, "train": {"co_guard": False}},
                       ["loss.method=gkl", "attack.kind=n_fgsm"])
    attack = build_attack(cfg, 1)
    assert isinstance(attack, SingleStepAttack) and cfg.train.co_guard == "off"  # YAML's off
    assert (attack.kind, attack.objective, attack.noise, attack.step_size, attack.clip,
            attack.bn_train) == ("n_fgsm", "kl", 2.0, EPS, 0.0, False)
    assert "N-FGSM's single step on kl (our extension" in attack_description(cfg)


def test_resuming_a_pgd_at_run_saved_before_rice_s_step_says_so():
    notes = []
    build_config({"loss": {"method": "pgd_at"}, "attack": {"steps": 10}}, saved=True,
                 notes=notes)
    assert any("before PGD-AT took Rice et al.'s step" in n for n in notes)
    notes = []
    build_config({"loss": {"method": "pgd_at"}, "attack": {"kind": "pgd"}}, saved=True,
                 notes=notes)
    assert notes == []


def test_restarts_keep_each_point_s_strongest_perturbation(float64):
    """Rice et al.'s restarts: per point, the restart whose final CE is largest (ties: later)."""
    torch.manual_seed(0)
    model = create_model("wrn-10-1", 10).eval()
    x, y = saturated_images("cifar10", train=True).images[:16].double() / 255, torch.arange(16) % 10
    one = PGDAttack(eps=EPS, step_size=2 / 255, steps=2, objective="ce", random_start="uniform",
                    final_loss_forward=True)
    torch.manual_seed(5)
    runs = [one(model, x, y) for _ in range(3)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(r), y, reduction="none") for r in runs])
    torch.manual_seed(5)
    ours = PGDAttack(eps=EPS, step_size=2 / 255, steps=2, objective="ce", random_start="uniform",
                     final_loss_forward=True, restarts=3)(model, x, y)
    pick = 2 - losses.flip(0).argmax(0)  # the last restart among equal maxima
    assert torch.equal(ours, torch.stack([runs[k][i] for i, k in enumerate(pick.tolist())]))
    with pytest.raises(ConfigError, match="only pgd_at's attack has"):
        build_config({}, ["loss.method=trades", "attack.restarts=2", "awp.gamma=0"])


class _TieClamp(torch.autograd.Function):
    """clamp(z, lo, hi) whose gradient is `tie` where z sits exactly on a bound: the rules other
    torch releases (or GradAlign's helper on today's torch) apply there."""

    @staticmethod
    def forward(ctx, z, lo, hi, tie):
        ctx.save_for_backward(z)
        ctx.bounds, ctx.tie = (lo, hi), tie
        return z.detach().clamp_min(lo).clamp_max(hi) if lo is not None else z.clamp_max(hi)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = (z > lo) & (z < hi)
        at_bound = (z == lo) | (z == hi)
        return grad * (inside.to(grad.dtype) + ctx.tie * at_bound.to(grad.dtype)), None, None, None


@pytest.mark.parametrize("tie", [0.0, 0.5, 1.0])
def test_grad_align_s_step_is_the_same_whatever_torch_s_clamp_does_at_a_bound(tie, monkeypatch):
    """GradAlign's FGSM from x takes its gradient at pixels that sit on 0 or 1: the step and the
    gradient it keeps are the same under every rule torch might apply there."""
    from advgkl.attacks.single_step import SingleStepAttack

    torch.manual_seed(0)
    model = create_model("small-cnn", 10).eval()
    x = torch.rand(6, 3, 16, 16)
    x[:, 0, :4] = 1.0                    # saturated pixels, exactly on the bounds
    x[:, 1, -4:] = 0.0
    y = torch.arange(6)

    def step():
        attack = SingleStepAttack(eps=EPS, step_size=1.25 * EPS, kind="fgsm", objective="ce",
                                  random_start="none", through_clamp=True)
        return attack(model, x, y), attack.start_grad

    reference = step()
    original = torch.clamp

    def swapped(z, min=None, max=None):
        if z.requires_grad:
            return _TieClamp.apply(z, min, max, tie)
        return original(z, min, max)

    monkeypatch.setattr(torch, "clamp", swapped)
    monkeypatch.setattr(torch.Tensor, "clamp", swapped)
    z = x.clone().requires_grad_(True)
    torch.clamp(z, 0, 1).sum().backward()
    assert torch.all(z.grad[x == 1] == tie)      # the swap is real: the rule at a tie is `tie`
    again = step()
    assert torch.equal(again[0], reference[0]) and torch.equal(again[1], reference[1])
    assert torch.all(reference[1][x == 1] == 0)   # no gradient at saturated pixels

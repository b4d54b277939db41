"""The training attack's invariants, its objectives, and the epoch schedules."""

import pytest
import torch
from torch import nn

from advgkl.attacks.pgd import PGDAttack, attack_schedule
from advgkl.reference import pairwise_gkl_loss


class CountingNet(nn.Module):
    """A small CNN with BatchNorm and dropout (mode-dependent) that counts its forward calls."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5),
                                  nn.Linear(32, classes))
        self.calls = 0
        self.modes = []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.training)
        return self.body(x)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = [dict(norm=n, objective=o, random_start=r) for n in ("Linf", "L2")
           for o in ("kl", "gkl", "ce", "cw") for r in ("normal", "uniform", "none")]


@pytest.mark.parametrize("kw", ATTACKS, ids=lambda kw: "-".join(kw.values()))
@pytest.mark.parametrize("train_mode", [True, False])
def test_invariants(kw, train_mode):
    torch.manual_seed(0)
    model = CountingNet().train(train_mode)
    x, y = batch()
    eps = 8 / 255 if kw["norm"] == "Linf" else 0.5
    attack = PGDAttack(eps=eps, step_size=eps / 3, steps=4, **kw)
    bn_before = [b.clone() for b in model.buffers()]
    rows = torch.softmax(torch.randn(len(y), 10), 1) if kw["objective"] == "gkl" else None
    x_adv = attack(model, x, y, prior_rows=rows)

    assert model.training == train_mode                       # mode restored
    assert model.modes == [False] * len(model.modes)          # ran in eval mode
    assert all(p.grad is None for p in model.parameters())    # parameters untouched
    assert all(torch.equal(a, b) for a, b in zip(bn_before, model.buffers()))
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if kw["norm"] == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert (size > 0).all()                                   # it moved
    # clean logits once per attack (kl only), plus one forward per step
    assert model.calls == 4 + (kw["objective"] in ("kl", "gkl"))


def test_given_clean_logits_are_reused_and_not_recomputed():
    model = CountingNet().eval()
    x, y = batch()
    with torch.no_grad():
        logits = model(x)
    model.calls = 0
    PGDAttack(eps=0.03, step_size=0.01, steps=3)(model, x, y, logits_nat=logits)
    assert model.calls == 3


def test_bn_train_option_keeps_train_mode():
    model = CountingNet().eval()
    x, y = batch()
    PGDAttack(eps=0.03, step_size=0.01, steps=2, bn_train=True)(model, x, y)
    assert model.modes == [True, True, True] and not model.training


def test_mode_restored_even_when_the_model_fails():
    class Broken(CountingNet):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        PGDAttack(eps=0.03, step_size=0.01, steps=2)(model, *batch())
    assert model.training


def cw_margin(z, y):
    true = z[torch.arange(len(y)), y]
    other = torch.stack([torch.cat([row[:k], row[k + 1:]]).max() for row, k in zip(z, y)])
    return (other - true).mean()


@pytest.mark.parametrize("objective", ["kl", "ce", "cw"])
def test_attack_increases_its_objective(objective):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x, _ = batch(32)
    y = model(x).argmax(1)
    attack = PGDAttack(eps=8 / 255, step_size=2 / 255, steps=10, objective=objective)
    x_adv = attack(model, x, y)
    x_noise = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)  # same size, random direction
    with torch.no_grad():
        clean = model(x)
        loss = {"ce": lambda z: torch.nn.functional.cross_entropy(z, y),
                "cw": lambda z: cw_margin(z, y),
                "kl": lambda z: torch.nn.functional.kl_div(
                    torch.log_softmax(z, 1), torch.softmax(clean, 1), reduction="batchmean"),
                }[objective]
        base = loss(clean)
        assert loss(model(x_adv)) - base > 2 * (loss(model(x_noise)) - base) > 0


def test_linf_pgd_matches_a_direct_implementation():
    """Linf, CE, no random start: x <- clip(proj(x + a sign(grad)))."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).double().eval()
    x, y = batch(4)
    x = x.double()
    eps, step = 0.05, 0.02
    ref = x.clone()
    for _ in range(3):
        ref.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(ref), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, ref)
        ref = torch.min(torch.max(ref.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    ours = PGDAttack(eps=eps, step_size=step, steps=3, objective="ce", random_start="none")(
        model, x, y)
    torch.testing.assert_close(ours, ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm: 'L1' is not one of Linf, L2"):
        PGDAttack(eps=0.1, step_size=0.1, steps=1, norm="L1")
    with pytest.raises(ValueError, match="objective"):
        PGDAttack(eps=0.1, step_size=0.1, steps=1, objective="dlr")
    with pytest.raises(ValueError, match=">= 0"):
        PGDAttack(eps=-0.1, step_size=0.1, steps=1)


EPS = 8 / 255


def test_constant_schedule():
    assert attack_schedule("constant", 3, 10, eps=EPS, step_size=2 / 255, steps=10) == (
        EPS, 2 / 255, 10)


def test_linear_ramp_reaches_eps_at_the_last_epoch():
    assert attack_schedule("linear_ramp", 50, 200, eps=EPS, step_size=2 / 255, steps=7) == (
        EPS / 4, 2 / 255 / 4, 7)
    assert attack_schedule("linear_ramp", 200, 200, eps=EPS, step_size=0.1, steps=7)[0] == EPS


@pytest.mark.parametrize("epoch", [1, 50, 51, 120, 200])
def test_paper_effective_is_five_half_steps_of_a_ramped_eps(epoch):
    eps_t, step, steps = attack_schedule("paper_effective", epoch, 200, eps=EPS, step_size=1,
                                         steps=10)
    assert (eps_t, step, steps) == (EPS * epoch / 200, EPS * epoch / 200 / 2, 5)


@pytest.mark.parametrize("epochs, epoch, steps, ratio", [
    (200, 1, 2, 1.0), (200, 50, 2, 1.0), (200, 51, 3, 2 / 3), (200, 100, 3, 2 / 3),
    (200, 101, 4, 0.5), (200, 150, 4, 0.5), (200, 151, 5, 0.5), (200, 200, 5, 0.5),
    (100, 25, 2, 1.0), (100, 26, 3, 2 / 3), (100, 76, 5, 0.5),
])
def test_paper_intended_budget(epochs, epoch, steps, ratio):
    eps_t, step, n = attack_schedule("paper_intended", epoch, epochs, eps=EPS, step_size=1,
                                     steps=10)
    assert n == steps and eps_t == EPS * epoch / epochs
    assert step == pytest.approx(ratio * eps_t)


def test_schedule_errors():
    with pytest.raises(ValueError, match="schedule: 'cyclic' is not one of constant"):
        attack_schedule("cyclic", 1, 10, eps=EPS, step_size=EPS, steps=1)
    with pytest.raises(ValueError, match="epoch: 0 is outside 1..10"):
        attack_schedule("constant", 0, 10, eps=EPS, step_size=EPS, steps=1)


def saturated_batch(n=6, seed=1):
    """Images with many pixels at exactly 0 or 1, like CIFAR's."""
    x, y = batch(n, seed)
    return torch.where(x < 0.2, 0.0, torch.where(x > 0.8, 1.0, x)), y


def test_gkl_objective_ascends_the_direct_gkl_term_with_the_prior_rows():
    """Each step follows sign(d/dx_adv [alpha sCE + beta wMSE(prior rows ** gamma)]) with the
    clean logits fixed, the pairwise formula written out (float64)."""
    torch.manual_seed(0)
    model = CountingNet().double().eval()
    x, y = saturated_batch()
    x = x.double()
    rows = torch.softmax(3 * torch.randn(len(y), 10, dtype=torch.float64), 1)
    eps, step, kw = 8 / 255, 2 / 255, dict(alpha=0.7, beta=3.0, gamma=0.5)
    torch.manual_seed(1)
    ours = PGDAttack(eps=eps, step_size=step, steps=3, objective="gkl", **kw)(
        model, x, y, prior_rows=rows)

    torch.manual_seed(1)
    x_adv = x + 0.001 * torch.randn_like(x)
    with torch.no_grad():
        nat = model(x)
    for _ in range(3):
        x_adv.requires_grad_(True)
        loss = pairwise_gkl_loss(model(x_adv), nat, rows, **kw)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    assert torch.equal(ours, x_adv)
    torch.manual_seed(1)  # the wMSE term changes the path: plain KL goes elsewhere
    kl = PGDAttack(eps=eps, step_size=step, steps=3, objective="kl")(model, x, y)
    assert not torch.equal(ours, kl)


def test_gkl_objective_refuses_to_run_without_prior_rows():
    x, y = batch()
    with pytest.raises(ValueError, match="prior_rows"):
        PGDAttack(eps=0.03, step_size=0.01, steps=1, objective="gkl")(CountingNet(), x, y)


class Recording(CountingNet):
    def forward(self, x):
        if x.requires_grad:
            self.inputs = getattr(self, "inputs", []) + [x.detach().clone()]
        return super().forward(x)


@pytest.mark.parametrize("start, outside", [("normal", True), ("uniform", False)])
def test_normal_start_takes_the_first_gradient_unprojected(start, outside):
    """TRADES' and the paper's start x + 0.001 N(0, 1) is used as is for the first gradient
    (outside [0, 1] at saturated pixels); the uniform start is projected first; both end inside."""
    torch.manual_seed(0)
    model = Recording()
    x, y = saturated_batch()
    assert ((x == 0) | (x == 1)).float().mean() > 0.3
    x_adv = PGDAttack(eps=8 / 255, step_size=2 / 255, steps=2, random_start=start)(model, x, y)
    first = model.inputs[0]
    assert ((first < 0).any() and (first > 1).any()) == outside
    assert (model.inputs[1] >= 0).all() and (model.inputs[1] <= 1).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    zero_steps = PGDAttack(eps=8 / 255, step_size=2 / 255, steps=0, random_start=start)(model, x, y)
    assert zero_steps.min() >= 0 and zero_steps.max() <= 1

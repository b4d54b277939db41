"""AWP: the perturbation's direction and size, restoration, the warm-up, and a direction that
float32 keeps at the end of every shipped schedule."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advgkl.config import load_config
from advgkl.methods.awp import AWP
from advgkl.methods.objectives import Logits, build_objective
from advgkl.models import create_model
from advgkl.training.loop import learning_rate

ROOT = Path(__file__).parent.parent
AWP_CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml"))
               if p.parent.name != "studies" and load_config(p).awp.gamma > 0]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 6, 6, generator=g, dtype=torch.float64)
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = torch.randint(0, 5, (8,), generator=g)
    prior = torch.softmax(torch.randn(8, 5, generator=g, dtype=torch.float64), 1)
    return x, x_adv, y, prior


@pytest.mark.parametrize("method", ["pgd_at", "trades", "gkl"])
def test_perturbation_is_the_rescaled_ascent_direction(method):
    model = make_model()
    objective = build_objective(method)
    x, x_adv, y, prior = make_batch()
    reference = copy.deepcopy(model).train()
    loss = objective(Logits(reference(x), reference(x_adv), y, prior))["loss"]
    grads = dict(zip([n for n, _ in reference.named_parameters()],
                     torch.autograd.grad(loss, list(reference.parameters()))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    awp = AWP(model, gamma=0.01, lr=0.2)
    diff = awp.perturb(objective, x, x_adv, y, prior)

    assert set(diff) == {"0.weight", "4.weight"}  # only >= 2-dim weights
    for name, p in model.named_parameters():
        if name in diff:
            w = before[name]
            expected = grads[name] * (w.norm() / grads[name].norm())  # ascent, weight-norm sized
            torch.testing.assert_close(diff[name], expected)
            torch.testing.assert_close(p.detach(), w + 0.01 * expected)
        else:
            assert torch.equal(p.detach(), before[name])  # biases and BN untouched


def test_restore_returns_the_weights():
    model = make_model().float()
    x, x_adv, y, prior = (t.float() if t.is_floating_point() else t for t in make_batch())
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.005, lr=0.1)
    diff = awp.perturb(build_objective("gkl"), x, x_adv, y, prior)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    awp.restore(diff)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_perturbation_raises_the_training_loss():
    model = make_model()
    objective = build_objective("trades")
    x, x_adv, y, prior = make_batch()
    model.train()
    before = objective(Logits(model(x), model(x_adv), y))["loss"].item()
    AWP(model, gamma=0.01, lr=0.1).perturb(objective, x, x_adv, y, prior)
    assert objective(Logits(model(x), model(x_adv), y))["loss"].item() > before


def test_model_gradients_and_buffers_untouched():
    model = make_model()
    buffers = [b.clone() for b in model.buffers()]
    AWP(model, gamma=0.01, lr=0.1).perturb(build_objective("gkl"), *make_batch())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_warmup():
    awp = AWP(make_model(), gamma=0.005, warmup_epochs=10)
    assert [awp.active(e) for e in (1, 9, 10, 11)] == [False, False, True, True]
    assert not AWP(make_model(), gamma=0.0, warmup_epochs=0).active(5)


def _directions(cfg, lr, dtype):
    """AWP's per-layer direction for a WRN-16-2 and one batch with saturated pixels, in `dtype`,
    with the proxy stepping at `lr`."""
    classes = 100 if cfg.data.dataset == "cifar100" else 10
    torch.manual_seed(0)
    model = create_model("wrn-16-2", classes).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g, dtype=torch.float64)
    x[x < 0.15], x[x > 0.85] = 0.0, 1.0
    x_adv = (x + 8 / 255 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = torch.arange(16) % classes
    rows = torch.softmax(torch.randn(16, classes, generator=g, dtype=torch.float64), 1)
    objective = build_objective(cfg.loss.method, cfg.loss.settings, dataset=cfg.data.dataset)
    awp = AWP(model, gamma=cfg.awp.gamma, warmup_epochs=cfg.awp.warmup_epochs, lr=lr)
    return awp.perturb(objective, x.to(dtype), x_adv.to(dtype), y, rows.to(dtype))


def _cosines(a, b):
    return {k: F.cosine_similarity(a[k].double().flatten(), b[k].double().flatten(), 0).item()
            for k in b}


@pytest.mark.parametrize("path", AWP_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_float32_direction_at_the_last_epoch_of_each_shipped_awp_config(path):
    """The trainer's AWP (proxy step at the base lr, as the authors' proxy optimizer) gives the
    float64 direction in float32 to a per-layer cosine >= 0.9999; a proxy step at the schedule's
    last-epoch lr (~1e-5, what the trainer did before) loses it to rounding."""
    cfg = load_config(path)
    t = cfg.train
    last_lr = learning_rate(t.lr_schedule, t.epochs, t.epochs, 99, 100, lr=t.lr,
                            warmup=t.lr_warmup_epochs, milestones=t.lr_milestones,
                            first=t.lr_first_epochs)
    reference = _directions(cfg, t.lr, torch.float64)
    ours = _cosines(_directions(cfg, t.lr, torch.float32), reference)
    assert min(ours.values()) >= 0.9999, ours
    scheduled = _cosines(_directions(cfg, last_lr, torch.float32), reference)
    assert last_lr < 1e-4 and min(scheduled.values()) < 0.99, scheduled

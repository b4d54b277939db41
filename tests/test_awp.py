"""AWP: the perturbation's direction and size, restoration, and the warm-up."""

import copy

import pytest
import torch
from torch import nn

from advgkl.awp import AWP
from advgkl.losses import build_objective


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
    objective = build_objective(method, gamma=0.5)
    x, x_adv, y, prior = make_batch()
    reference = copy.deepcopy(model).train()
    loss = objective(reference(x), reference(x_adv), y, prior)["loss"]
    grads = dict(zip([n for n, _ in reference.named_parameters()],
                     torch.autograd.grad(loss, list(reference.parameters()))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    awp = AWP(model, gamma=0.01)
    diff = awp.perturb(objective, x, x_adv, y, prior, lr=0.2)

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
    awp = AWP(model, gamma=0.005)
    diff = awp.perturb(build_objective("gkl"), x, x_adv, y, prior, lr=0.1)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    awp.restore(diff)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_perturbation_raises_the_training_loss():
    model = make_model()
    objective = build_objective("trades", beta=6.0)
    x, x_adv, y, prior = make_batch()
    model.train()
    before = objective(model(x), model(x_adv), y)["loss"].item()
    AWP(model, gamma=0.01).perturb(objective, x, x_adv, y, prior, lr=0.1)
    assert objective(model(x), model(x_adv), y)["loss"].item() > before


def test_model_gradients_and_buffers_untouched():
    model = make_model()
    buffers = [b.clone() for b in model.buffers()]
    AWP(model, gamma=0.01).perturb(build_objective("gkl"), *make_batch(), lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_warmup():
    awp = AWP(make_model(), gamma=0.005, warmup_epochs=10)
    assert [awp.active(e) for e in (1, 9, 10, 11)] == [False, False, True, True]
    assert not AWP(make_model(), gamma=0.0, warmup_epochs=0).active(5)

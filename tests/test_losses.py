"""The objectives equal direct implementations of their definitions (float64, values and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from advgkl.losses import (build_objective, cross_entropy, gkl_loss, ikl_loss, lbgat_guidance,
                           mart_loss, soft_cross_entropy, trades_kl)
from advgkl.reference import pairwise_gkl_loss as pairwise_gkl


def random_inputs(batch, classes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    adv = (3 * torch.randn(batch, classes, generator=g, dtype=dtype)).requires_grad_()
    nat = (3 * torch.randn(batch, classes, generator=g, dtype=dtype)).requires_grad_()
    prior = torch.softmax(2 * torch.randn(batch, classes, generator=g, dtype=dtype), dim=1)
    return adv, nat, prior


def value_and_grads(fn, adv, nat):
    loss = fn(adv, nat)
    g_adv, g_nat = torch.autograd.grad(loss, [adv, nat])
    return loss.detach(), g_adv, g_nat


@pytest.mark.parametrize("classes", [2, 10, 100, 1000])
@pytest.mark.parametrize("gamma", [0.2, 1.0])
def test_gkl_equals_the_pairwise_definition(classes, gamma):
    adv, nat, prior = random_inputs(6, classes, seed=classes)
    kw = dict(alpha=4.0, beta=20.0, gamma=gamma, temperature=4.0)
    ours = value_and_grads(lambda a, n: gkl_loss(a, n, prior, **kw), adv, nat)
    ref = value_and_grads(lambda a, n: pairwise_gkl(a, n, prior, **kw), adv, nat)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-12)
    assert ours[2].abs().sum() > 0  # the wMSE sends gradients into the clean logits too


def test_ikl_is_gkl_with_gamma_1_and_temperature_1():
    adv, nat, prior = random_inputs(5, 10)
    expected = gkl_loss(adv, nat, prior, alpha=3.0, beta=7.0, gamma=1.0, temperature=1.0)
    assert torch.equal(ikl_loss(adv, nat, prior, alpha=3.0, beta=7.0), expected)


def test_decoupling_theorem():
    """For w = s_m s_m^T: dKL(s_m||s_n)/do_m = d wMSE(o_m, stopgrad o_n)/do_m and
    dKL/do_n = d sCE(stopgrad s_m, s_n)/do_n."""
    o_m, o_n, _ = random_inputs(7, 10, seed=3)
    s_m = torch.softmax(o_m, dim=1)
    kl = (s_m * (torch.log_softmax(o_m, 1) - torch.log_softmax(o_n, 1))).sum()
    kl_gm, kl_gn = torch.autograd.grad(kl, [o_m, o_n])

    w = (s_m[:, :, None] * s_m[:, None, :]).detach()
    d_m = o_m[:, :, None] - o_m[:, None, :]
    d_n = (o_n[:, :, None] - o_n[:, None, :]).detach()
    wmse = 0.25 * (w * (d_m - d_n) ** 2).sum()
    (wmse_gm,) = torch.autograd.grad(wmse, [o_m])
    sce = -(s_m.detach() * torch.log_softmax(o_n, 1)).sum()
    (sce_gn,) = torch.autograd.grad(sce, [o_n])

    torch.testing.assert_close(kl_gm, wmse_gm, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl_gn, sce_gn, rtol=1e-9, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_gkl_never_builds_a_b_c_c_tensor():
    batch, classes = 16, 500
    adv, nat, prior = random_inputs(batch, classes, dtype=torch.float32)
    with LargestTensor() as mode:
        loss = gkl_loss(adv, nat, prior, gamma=0.5, temperature=2.0)
        loss.backward()
    assert mode.largest <= batch * classes  # a pairwise tensor would be 500x larger


def test_soft_cross_entropy_matches_definition_and_has_kl_gradient():
    adv, nat, _ = random_inputs(4, 6)
    p = torch.softmax(nat.detach() / 2, 1)
    direct = -(p * torch.log_softmax(adv / 2, 1)).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(adv, nat, 2.0), direct)
    kl = F.kl_div(torch.log_softmax(adv / 2, 1), p, reduction="batchmean")
    torch.testing.assert_close(torch.autograd.grad(soft_cross_entropy(adv, nat, 2.0), adv)[0],
                               torch.autograd.grad(kl, adv)[0])


def test_trades_kl_matches_torch_kl_div_with_gradients_into_both():
    adv, nat, _ = random_inputs(5, 10)
    direct = F.kl_div(torch.log_softmax(adv, 1), torch.softmax(nat, 1), reduction="batchmean")
    ours = value_and_grads(trades_kl, adv, nat)
    ref = value_and_grads(lambda a, n: F.kl_div(torch.log_softmax(a, 1), torch.softmax(n, 1),
                                                reduction="batchmean"), adv, nat)
    torch.testing.assert_close(ours[0], direct.detach())
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)
    assert ours[2].abs().sum() > 0


def test_bf16_logits_are_computed_in_float32():
    adv, nat, prior = random_inputs(4, 10, dtype=torch.float32)
    loss = gkl_loss(adv.bfloat16(), nat.bfloat16(), prior)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("method", ["pgd_at", "trades", "ikl", "gkl"])
def test_objective_terms(method):
    adv, nat, prior = random_inputs(6, 10)
    y = torch.arange(6) % 10
    obj = build_objective(method, alpha=2.0, beta=6.0, gamma=0.4, temperature=3.0)
    out = obj(nat, adv, y, prior)
    assert set(out) == {"loss", "ce", "robust"}
    robust = {"pgd_at": cross_entropy(adv, y),
              "trades": 6.0 * trades_kl(adv, nat),
              "ikl": ikl_loss(adv, nat, prior, alpha=2.0, beta=6.0),
              "gkl": gkl_loss(adv, nat, prior, alpha=2.0, beta=6.0, gamma=0.4, temperature=3.0)}
    torch.testing.assert_close(out["robust"], robust[method])
    torch.testing.assert_close(out["ce"], F.cross_entropy(nat, y))
    expected = robust[method] if method == "pgd_at" else F.cross_entropy(nat, y) + robust[method]
    torch.testing.assert_close(out["loss"], expected)
    assert obj.needs_prior == (method in ("ikl", "gkl"))


def test_unknown_method():
    with pytest.raises(ValueError, match="method: 'kl' is not one of pgd_at, trades, ikl, gkl, "
                                         "mart, lbgat"):
        build_objective("kl")


@pytest.mark.parametrize("make, message", [
    (lambda a, n, p: (a, n[:, :5], p), "logits_nat: shape"),
    (lambda a, n, p: (a[:3], n, p), "logits_nat: shape"),
    (lambda a, n, p: (a[0], n[0], p[0]), "logits_adv: expected shape \\(B, C\\)"),
    (lambda a, n, p: (a[:, :1], n[:, :1], p[:, :1]), "needs at least 2 classes, got C = 1"),
    (lambda a, n, p: (a, n, p[:, :5]), "prior_rows: expected shape"),
    (lambda a, n, p: (a, n, None), "prior_rows: expected shape"),
    (lambda a, n, p: (a, n, p.index_fill(1, torch.tensor([2]), float("nan"))), "prior_rows: entries"),
    (lambda a, n, p: (a, n, p.index_fill(1, torch.tensor([2]), float("inf"))), "prior_rows: entries"),
    (lambda a, n, p: (a, n, -p), "prior_rows: entries"),
    (lambda a, n, p: (a, n, torch.zeros_like(p)), "not all zero"),
])
def test_bad_input_names_the_argument(make, message):
    adv, nat, prior = random_inputs(4, 10)
    with pytest.raises(ValueError, match=message):
        gkl_loss(*make(adv, nat, prior))


def test_non_contiguous_logits():
    adv, nat, prior = random_inputs(10, 6)
    adv_t = adv.detach().t().contiguous().t().requires_grad_()  # same values, column-major
    torch.testing.assert_close(gkl_loss(adv_t, nat, prior, temperature=2.0),
                               gkl_loss(adv, nat, prior, temperature=2.0))


def mart_by_its_formula(adv, nat, y, beta, smoothing=0.0):
    """MART's loss written out per sample: BCE(p', y) + beta * KL(p || p') * (1 - p_y)."""
    total = 0.0
    classes = adv.shape[1]
    for b in range(len(y)):
        p_adv, p_nat = torch.softmax(adv[b], 0), torch.softmax(nat[b], 0)
        target = torch.full((classes,), smoothing / classes, dtype=adv.dtype)
        target[y[b]] += 1 - smoothing
        ce = -(target * torch.log(p_adv)).sum()
        wrong = torch.cat([p_adv[:y[b]], p_adv[y[b] + 1:]])
        bce = ce - torch.log(1 - wrong.max())
        kl = (p_nat * (torch.log(p_nat) - torch.log(p_adv))).sum()
        total = total + bce + beta * kl * (1 - p_nat[y[b]])
    return total / len(y)


@pytest.mark.parametrize("classes, smoothing", [(2, 0.0), (10, 0.0), (10, 0.1), (100, 0.0)])
def test_mart_equals_its_formula_with_gradients(classes, smoothing):
    adv, nat, _ = random_inputs(7, classes, seed=classes)
    y = torch.arange(7) % classes
    ours = value_and_grads(lambda a, n: mart_loss(a, n, y, beta=6.0, label_smoothing=smoothing),
                           adv, nat)
    direct = value_and_grads(lambda a, n: mart_by_its_formula(a, n, y, 6.0, smoothing), adv, nat)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mart_stays_finite_when_the_runner_up_is_certain():
    adv = torch.tensor([[0.0, 60.0, -5.0]], dtype=torch.float64, requires_grad=True)
    nat = torch.zeros(1, 3, dtype=torch.float64)
    loss = mart_loss(adv, nat, torch.tensor([0]), beta=6.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(adv.grad).all()


def test_lbgat_guidance_equals_its_formula_with_gradients():
    adv, nat, _ = random_inputs(5, 10, seed=3)
    guide = (3 * torch.randn(5, 10, dtype=torch.float64)).requires_grad_()
    y = torch.arange(5)

    def direct(a, n, g):  # MSE over all logits + beta * mean_b KL(p_nat_b || p_adv_b)
        mse = ((a - g) ** 2).sum() / a.numel()
        p_nat = torch.softmax(n, 1)
        kl = (p_nat * (torch.log(p_nat) - torch.log_softmax(a, 1))).sum(1).mean()
        return mse + 6.0 * kl

    results = []
    for fn in (lambda a, n, g: lbgat_guidance(a, n, g, beta=6.0), direct):
        value = fn(adv, nat, guide)
        results.append((value, torch.autograd.grad(value, [adv, nat, guide])))
    (ours, ours_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(ours_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    out = build_objective("lbgat", beta=6.0, label_smoothing=0.1)(nat, adv, y, None, guide)
    torch.testing.assert_close(out["ce"], F.cross_entropy(guide, y, label_smoothing=0.1))
    torch.testing.assert_close(out["loss"], out["ce"] + lbgat_guidance(adv, nat, guide, beta=6.0))
    with pytest.raises(ValueError, match="logits_guide"):
        build_objective("lbgat")(nat, adv, y)


@pytest.mark.parametrize("method", ["pgd_at", "trades", "ikl", "gkl", "mart"])
def test_label_smoothing_enters_the_cross_entropy_each_method_trains_on(method):
    adv, nat, prior = random_inputs(6, 10, seed=5)
    y = torch.arange(6)
    plain, smooth = (build_objective(method, beta=6.0, label_smoothing=s)(nat, adv, y, prior)
                     for s in (0.0, 0.1))
    on = adv if method in ("pgd_at", "mart") else nat
    shift = (F.cross_entropy(on, y, label_smoothing=0.1) - F.cross_entropy(on, y))
    torch.testing.assert_close(smooth["loss"] - plain["loss"], shift)

"""The objectives equal direct implementations of their definitions (float64, values and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LargestTensor

from advgkl.config.methods import METHODS
from advgkl.losses.functional import (cross_entropy, gkl_loss, ikl_loss, lbgat_guidance, mart_loss,
                                      soft_cross_entropy, trades_kl)
from advgkl.methods.objectives import Logits, build_objective
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


def settings(method, **values):
    return METHODS[method].settings(**{k: v for k, v in values.items()
                                       if k in METHODS[method].settings.__dataclass_fields__})


@pytest.mark.parametrize("method", ["pgd_at", "trades", "ikl", "gkl"])
def test_objective_terms(method):
    adv, nat, prior = random_inputs(6, 10)
    y = torch.arange(6) % 10
    obj = build_objective(method, settings(method, alpha=2.0, beta=6.0, gamma=0.4,
                                           temperature=3.0))
    out = obj(Logits(nat, adv, y, prior))
    assert set(out) == {"loss", "ce", "robust"}
    robust = {"pgd_at": cross_entropy(adv, y),
              "trades": 6.0 * trades_kl(adv, nat),
              "ikl": ikl_loss(adv, nat, prior, alpha=2.0, beta=6.0),
              "gkl": gkl_loss(adv, nat, prior, alpha=2.0, beta=6.0, gamma=0.4, temperature=3.0)}
    torch.testing.assert_close(out["robust"], robust[method])
    torch.testing.assert_close(out["ce"], F.cross_entropy(nat, y))
    expected = robust[method] if method == "pgd_at" else F.cross_entropy(nat, y) + robust[method]
    torch.testing.assert_close(out["loss"], expected)
    assert (obj.prior is not None) == (method in ("ikl", "gkl"))


def test_unknown_method_and_foreign_settings():
    with pytest.raises(ValueError, match="method: 'kl' is not one of pgd_at, trades, mart"):
        build_objective("kl")
    with pytest.raises(ValueError, match="settings: GklSettings are not mart's"):
        build_objective("mart", METHODS["gkl"].settings())


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
    ours = value_and_grads(lambda a, n: mart_loss(a, n, y, beta=6.0, label_smoothing=smoothing,
                                                  form="exact"), adv, nat)
    direct = value_and_grads(lambda a, n: mart_by_its_formula(a, n, y, 6.0, smoothing), adv, nat)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mart_exact_form_stays_finite_when_the_runner_up_is_certain():
    adv = torch.tensor([[0.0, 60.0, -5.0]], dtype=torch.float64, requires_grad=True)
    nat = torch.zeros(1, 3, dtype=torch.float64)
    loss = mart_loss(adv, nat, torch.tensor([0]), beta=6.0, form="exact")
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
    out = build_objective("lbgat", settings("lbgat", label_smoothing=0.1))(
        Logits(nat, adv, y, guide=guide))
    torch.testing.assert_close(out["ce"], F.cross_entropy(guide, y, label_smoothing=0.1))
    torch.testing.assert_close(out["loss"], out["ce"] + lbgat_guidance(adv, nat, guide, beta=6.0))
    with pytest.raises(ValueError, match="guide"):
        build_objective("lbgat")(Logits(nat, adv, y))


@pytest.mark.parametrize("method", ["pgd_at", "trades", "ikl", "gkl", "mart"])
def test_label_smoothing_enters_the_cross_entropy_each_method_trains_on(method):
    adv, nat, prior = random_inputs(6, 10, seed=5)
    y = torch.arange(6)
    plain, smooth = (build_objective(method, settings(method, beta=6.0, label_smoothing=s))(
        Logits(nat, adv, y, prior)) for s in (0.0, 0.1))
    on = adv if method in ("pgd_at", "mart") else nat
    shift = (F.cross_entropy(on, y, label_smoothing=0.1) - F.cross_entropy(on, y))
    torch.testing.assert_close(smooth["loss"] - plain["loss"], shift)


def mart_as_the_authors_wrote_it(logits_adv, logits_nat, y, beta):
    """A literal transcription of mart.py's loss (YisenWang/MART 2d83e17), after the attack."""
    kl = torch.nn.KLDivLoss(reduction="none")
    batch_size = len(logits_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12),
                                                           new_y)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def confidently_wrong_and_near_certain(classes, seed):
    """Rows of adversarial logits: random; confidently wrong (one wrong class at +25); near-certain
    right (the true class at +40); the runner-up near certain (two wrong classes close at +30)."""
    adv, nat, _ = random_inputs(8, classes, seed=seed)
    y = torch.arange(8) % classes
    with torch.no_grad():
        adv[1, (y[1] + 1) % classes] += 25
        adv[2, y[2]] += 40
        nat[2, y[2]] += 40
        adv[3, (y[3] + 1) % classes] += 30
        adv[3, (y[3] + 2) % classes] += 29.5
    return adv, nat, y


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_mart_equals_the_authors_code_values_and_gradients(classes):
    adv, nat, y = confidently_wrong_and_near_certain(classes, seed=classes)
    ours = value_and_grads(lambda a, n: mart_loss(a, n, y, beta=6.0), adv, nat)
    theirs = value_and_grads(lambda a, n: mart_as_the_authors_wrote_it(a, n, y, 6.0), adv, nat)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    out = build_objective("mart")(Logits(nat, adv, y))
    torch.testing.assert_close(out["loss"], ours[0])
    exact = value_and_grads(lambda a, n: mart_loss(a, n, y, beta=6.0, form="exact"), adv, nat)
    assert (exact[1] - ours[1]).abs().max() > 1e-3   # the constants matter where MART acts


def test_mart_authors_form_in_float32_matches_their_float32_code():
    adv, nat, y = confidently_wrong_and_near_certain(10, seed=1)
    adv, nat = adv.detach().float().requires_grad_(), nat.detach().float().requires_grad_()
    ours = value_and_grads(lambda a, n: mart_loss(a, n, y, beta=6.0), adv, nat)
    theirs = value_and_grads(lambda a, n: mart_as_the_authors_wrote_it(a, n, y, 6.0), adv, nat)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)

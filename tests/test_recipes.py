"""The published ImageNet recipes' parts compute what their authors' code computes: Singh et al.'s
APGD-2 and ARES' PGD-3 against float64 transcriptions of their code from the same input, both
recipes' per-iteration schedules at every iteration (ARES': timm's own scheduler), the EMA
against timm's ModelEmaV2, the decay groups against timm's, Mixup/CutMix's soft targets in every
method that takes them and in the attack, gradient accumulation against one big batch, and
three whole epochs of each shipped recipe (Singh et al., ARES) through the trainer's epoch loop
against their training loops (model modes, BatchNorm statistics, lr per iteration, EMA).

Transcribed from: Singh, Croce & Hein, nmndeep/revisiting-at d7166c0 autopgd_train_clean.py
(apgd_train, Linf) and main.py (get_cosine_lr, the per-iteration np.interp, train_loop,
WrappedModel.forward, create_optimizer's decay groups); ARES 2.0,
thu-ml/ares 306e35f ares/utils/adv.py (adv_generator with SoftTargetCrossEntropy, mean 0 and
std 1, where its un-normalised final forward equals the normalised one) and
robust_training/adversarial_training.py (train_one_epoch, timm's optimizer and scheduler).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_states_close
from torch import nn

from advgkl.attacks.recipes import APGDTrain, AresPGD
from advgkl.config import build_config, load_config
from advgkl.config.methods import METHODS
from advgkl.losses.functional import cross_entropy
from advgkl.methods.objectives import Logits, build_objective
from advgkl.methods.priors import ClassPrior
from advgkl.runlog import RunLog
from advgkl.training.build import build_attack
from advgkl.training.ema import WeightEMA
from advgkl.training.loop import _train_epoch
from advgkl.training.schedules import learning_rate
from advgkl.training.step import TrainStep, build_optimizer

EPS = 4 / 255
SOFT_METHODS = [m for m, spec in METHODS.items() if spec.soft_targets]


def _net(seed=0, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, classes)).double().eval()


def _batch(seed=1, n=12, classes=5, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x[:, 0, :2] = 1.0   # saturated pixels
    x[:, 1, -2:] = 0.0
    y = torch.arange(n) % classes
    if soft:  # Mixup-like targets: two classes with smoothing
        lam = 0.7
        y = (lam * F.one_hot(y, classes) + (1 - lam) * F.one_hot(y.flip(0), classes)).double()
        y = y * 0.9 + 0.1 / classes
    return x, y


def singh_apgd_train(model, x, y, eps, n_iter):
    """apgd_train(norm='Linf', use_rs=False, loss='ce'), their statements in their order."""
    x_adv = x.clone().clamp(0., 1.)
    x_best = x_adv.clone().detach()
    loss_steps = torch.zeros([n_iter, x.shape[0]])
    n_iter_2, n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    k, thr_decr, alpha = n_iter_2 + 0, .75, 2.
    step_size = alpha * eps * torch.ones([x.shape[0], 1, 1, 1], dtype=x.dtype)
    counter3 = 0
    x_adv.requires_grad_()
    loss_indiv = F.cross_entropy(model(x_adv), y, reduction='none')
    grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
    grad_best = grad.clone()
    x_adv.detach_()
    loss_best = loss_indiv.detach().clone()
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones_like(loss_best)
    x_adv_old = x_adv.clone().detach()
    for i in range(n_iter):
        x_adv = x_adv.detach()
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        x_adv_1 = x_adv + step_size * torch.sign(grad)
        x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
        x_adv_1 = torch.clamp(torch.min(torch.max(
            x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0)
        x_adv = x_adv_1 + 0.
        if i < n_iter - 1:
            x_adv.requires_grad_()
        loss_indiv = F.cross_entropy(model(x_adv), y, reduction='none')
        if i < n_iter - 1:
            grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
        x_adv.detach_()
        loss_indiv.detach_()
        y1 = loss_indiv.detach().clone()
        loss_steps[i] = y1 + 0
        ind = (y1 > loss_best).nonzero().squeeze()
        x_best[ind] = x_adv[ind].clone()
        grad_best[ind] = grad[ind].clone()
        loss_best[ind] = y1[ind] + 0
        counter3 += 1
        if counter3 == k:
            t = torch.zeros(loss_steps.shape[1])
            for counter5 in range(k):
                t += (loss_steps[i - counter5] > loss_steps[i - counter5 - 1]).float()
            fl_oscillation = (t <= k * thr_decr * torch.ones_like(t)).float()
            fl_reduce_no_impr = (1. - reduced_last_check) * (
                loss_best_last_check >= loss_best).float()
            fl_oscillation = torch.max(fl_oscillation, fl_reduce_no_impr)
            reduced_last_check = fl_oscillation.clone()
            loss_best_last_check = loss_best.clone()
            if fl_oscillation.sum() > 0:
                ind_fl_osc = (fl_oscillation > 0).nonzero().squeeze()
                step_size[ind_fl_osc] /= 2.0
                x_adv[ind_fl_osc] = x_best[ind_fl_osc].clone()
                grad[ind_fl_osc] = grad_best[ind_fl_osc].clone()
            counter3 = 0
            k = max(k - size_decr, n_iter_min)
    return x_best


def ares_adv_generator(model, images, target, eps, attack_steps, attack_lr,
                       attack_criterion="mixup"):
    """adv_generator(random_start=False, attack_criterion, use_best=True), mean 0 std 1:
    'mixup' is timm's SoftTargetCrossEntropy (a batch mean), 'regular' CrossEntropyLoss with
    reduction='none' (a loss per image)."""
    def criterion(z, t):
        if attack_criterion == "regular":
            return torch.nn.CrossEntropyLoss(reduction="none")(z, t)
        return torch.sum(-t * F.log_softmax(z, dim=-1), dim=-1).mean()

    orig_input = images.detach()
    best_loss, best_x = None, None

    def replace_best(loss, bloss, x, bx):
        if bloss is None:
            return loss.clone().detach(), x.clone().detach()
        replace = bloss < loss
        bx[replace] = x[replace].clone().detach()
        bloss[replace] = loss[replace]
        return bloss, bx

    noise = torch.rand_like(images)
    noise.uniform_(-eps, eps)
    images = torch.clamp(images + noise, 0, 1)
    for _ in range(attack_steps):
        images = images.clone().detach().requires_grad_(True)
        adv_losses = criterion(model(images), target)
        torch.mean(adv_losses).backward()
        grad = images.grad.detach()
        with torch.no_grad():
            best_loss, best_x = replace_best(adv_losses, best_loss, images, best_x)
            images = images + torch.sign(grad) * attack_lr
            diff = torch.clamp(images - orig_input, -eps, eps)
            images = torch.clamp(diff + orig_input, 0, 1)
    adv_losses = criterion(model(images), target)
    best_loss, best_x = replace_best(adv_losses, best_loss, images, best_x)
    return best_x


@pytest.mark.parametrize("steps,soft", [(2, False), (2, True), (7, True)])
def test_apgd_train_equals_singh_et_al_code(steps, soft, float64):
    model, (x, y) = _net(), _batch(soft=soft)
    x = x + 0.3 * (torch.rand_like(x) - 0.5)  # RandomErasing's noise leaves [0, 1]: as theirs
    ours = APGDTrain(eps=EPS, step_size=2 * EPS, steps=steps, objective="ce",
                     random_start="none")(model, x, y)
    theirs = singh_apgd_train(model, x, y, EPS, steps)
    assert torch.equal(ours, theirs)
    inside = x.clamp(0, 1)
    assert not torch.equal(ours, inside) and (ours - inside).abs().max() <= EPS + 1e-12


@pytest.mark.parametrize("epoch,soft", [(1, True), (3, True), (6, True), (3, False),
                                        (6, False)])
def test_ares_pgd_equals_their_code_with_the_step_ramp(epoch, soft, float64):
    from advgkl.attacks.pgd import attack_schedule

    model, (x, y) = _net(seed=2), _batch(seed=3, soft=soft)
    eps, step, steps = attack_schedule("ares_ramp", epoch, 10, eps=EPS, step_size=8 / 255 / 3,
                                       steps=3)
    assert step == 8 / 255 / 3 * min(epoch - 1, 5) / 5
    torch.manual_seed(7)
    ours = AresPGD(eps=eps, step_size=step, steps=steps, objective="ce",
                   random_start="uniform")(model, x, y)
    assert model.training is False and all(p.grad is None for p in model.parameters())
    torch.manual_seed(7)
    theirs = ares_adv_generator(model, x, y, eps, steps, step,
                                "mixup" if soft else "regular")
    assert torch.equal(ours, theirs)


def test_ares_pgd_keeps_the_best_point_per_image_with_labels(float64):
    """ARES' `regular` criterion: with hard labels each image keeps its own best point, which
    is not what keeping the best batch mean gives (steps of 2 eps make the losses oscillate)."""
    model, (x, y) = _net(seed=2), _batch(seed=3)
    torch.manual_seed(7)
    ours = AresPGD(eps=EPS, step_size=2 * EPS, steps=5, objective="ce",
                   random_start="uniform")(model, x, y)
    torch.manual_seed(7)
    theirs = ares_adv_generator(model, x, y, EPS, 5, 2 * EPS, "regular")
    torch.manual_seed(7)
    per_batch = ares_adv_generator(model, x, F.one_hot(y, 5).double(), EPS, 5, 2 * EPS)
    assert torch.equal(ours, theirs) and not torch.equal(ours, per_batch)


def singh_lrs(epoch, iters, lr, epochs, peak):
    """main.py: get_cosine_lr at epoch and epoch + 1, np.interp over the epoch's iterations."""
    def get_lr(e):
        if e <= peak:
            return np.interp([e], [0, peak], [1e-4 * lr, lr])[0]
        lr_min = 5e-6
        return lr_min + .5 * (lr - lr_min) * (1 + math.cos(math.pi * (e - peak) / (epochs - peak)))
    return np.interp(np.arange(iters), [0, iters], [get_lr(epoch), get_lr(epoch + 1)])


def test_both_recipes_lr_schedules_equal_theirs_at_every_iteration():
    from timm.scheduler import CosineLRScheduler

    epochs, iters, lr = 9, 7, 1e-3
    for e in range(epochs):
        ours = [learning_rate("warmup_cosine", e + 1, epochs, i, iters, lr=lr, warmup=3,
                              milestones=[], warmup_start=1e-4 * lr, lr_min=5e-6)
                for i in range(iters)]
        assert ours == list(singh_lrs(e, iters, lr, epochs, 3))
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    timm = CosineLRScheduler(opt, t_initial=epochs * iters, lr_min=1e-5, warmup_t=2 * iters,
                             warmup_lr_init=1e-6, t_in_epochs=False)
    for g in range(epochs * iters):
        ours = learning_rate("timm_cosine", g // iters + 1, epochs, g % iters, iters, lr=lr,
                             warmup=2, milestones=[], warmup_start=1e-6, lr_min=1e-5)
        assert ours == opt.param_groups[0]["lr"], g
        timm.step_update(num_updates=g + 1)


def test_ema_from_init_follows_timms_model_ema_v2(float64):
    from timm.utils import ModelEmaV2

    model = _net()
    ours, theirs = WeightEMA(model, tau=0.9, start_epoch=99, from_init=True), ModelEmaV2(model, 0.9)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, epoch=1)
        theirs.update(model)
    for key, value in theirs.module.state_dict().items():
        torch.testing.assert_close(ours.module.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_decay_groups_are_timms():
    from timm.optim.optim_factory import param_groups_weight_decay

    from advgkl.models import create_model

    model = create_model("timm:test_vit", 10)
    cfg = build_config({"train": {"optimizer": "adamw", "no_decay_bn_bias": True,
                                  "no_decay_list": True, "weight_decay": 0.05}})
    ours = build_optimizer(model, cfg).param_groups
    inner = model.model
    theirs = param_groups_weight_decay(inner, 0.05, inner.no_weight_decay())
    ids = {id(p) for p in theirs[0]["params"]}
    assert {id(p) for p in ours[1]["params"]} == ids and ours[1]["weight_decay"] == 0
    assert any(p is inner.pos_embed for p in ours[1]["params"])
    assert type(build_optimizer(model, cfg)) is torch.optim.AdamW


@pytest.mark.parametrize("method", SOFT_METHODS)
def test_soft_targets_reach_each_methods_label_terms(method, float64):
    """Every label term of the method is the soft-target CE: the objective on soft targets minus
    the objective on the argmax labels equals the difference of the two CEs it holds."""
    x, y = _batch(soft=True)
    g = torch.Generator().manual_seed(4)
    nat, adv = (torch.randn(len(y), 5, generator=g, dtype=torch.float64) for _ in range(2))
    prior = ClassPrior(5)
    prior.prior = torch.rand(5, 5, generator=g, dtype=torch.float64).softmax(1)
    objective = build_objective(method)
    hard = y.argmax(1)
    soft_out = objective(Logits(nat, adv, y, prior.rows(y)))
    hard_out = objective(Logits(nat, adv, hard, prior.rows(y)))
    labelled = adv if METHODS[method].clean_forward != "before" else nat
    smoothing = getattr(objective.settings, "label_smoothing", 0.0)
    expected = (-(y * F.log_softmax(labelled, 1)).sum(1).mean()
                - cross_entropy(labelled, hard, smoothing))
    torch.testing.assert_close(soft_out["loss"] - hard_out["loss"], expected, rtol=1e-10,
                               atol=1e-12)
    assert not torch.isclose(soft_out["loss"], hard_out["loss"])


def test_soft_targets_mix_the_class_prior_rows_and_its_update(float64):
    prior = ClassPrior(5)
    prior.prior = torch.rand(5, 5, dtype=torch.float64).softmax(1)
    _, y = _batch(soft=True)
    rows = prior.rows(y)
    direct = torch.stack([sum(y[b, c] * prior.prior[c] for c in range(5)) for b in range(len(y))])
    torch.testing.assert_close(rows, direct)
    logits = torch.randn(len(y), 5, dtype=torch.float64)
    prior.update(logits, y)
    sums = sum(torch.outer(y[b], logits[b].softmax(0)) for b in range(len(y)))
    torch.testing.assert_close(prior.state_dict()["sums"], sums)


@pytest.mark.parametrize("attack", ["pgd", "apgd", "ares_pgd"])
def test_soft_targets_reach_the_training_attack(attack, float64):
    """The attack's CE is the soft-target CE: the soft batch moves the point differently from
    its argmax labels, and equals the attack run on the soft CE written out."""
    from advgkl.attacks.pgd import PGDAttack

    model, (x, y) = _net(seed=5), _batch(seed=6, soft=True)
    cls = {"pgd": PGDAttack, "apgd": APGDTrain, "ares_pgd": AresPGD}[attack]
    make = lambda: cls(eps=EPS, step_size=EPS / 2, steps=3, objective="ce",  # noqa: E731
                       random_start="none" if attack == "apgd" else "uniform")
    torch.manual_seed(0)
    soft = make()(model, x, y)
    torch.manual_seed(0)
    hard = make()(model, x, y.argmax(1))
    assert not torch.equal(soft, hard)


def test_mixup_and_cutmix_reach_the_step_and_accumulation_equals_one_big_batch(float64):
    """With timm's Mixup on, the objective sees soft targets; with a batch-independent model
    (LayerNorm) and a deterministic attack (APGD from x), two accumulated micro-batches give
    the weights of one batch."""
    from advgkl.models import create_model

    base = {"loss": {"method": "singh_at"}, "awp": {"gamma": 0}, "attack": {"eps": "4/255"},
            "train": {"optimizer": "adamw", "batch_size": 8, "device": "cpu"},
            "data": {"dataset": "cifar10"}}
    x, _ = _batch(seed=8, n=8, classes=10)
    x = F.interpolate(x, size=16)
    y = torch.arange(8) % 10
    weights, seen = [], []
    for accumulate in (1, 2):
        cfg = build_config({**base, "train": {**base["train"], "accumulate": accumulate}})
        torch.manual_seed(0)
        model = create_model("timm:test_vit", 10, img_size=16).double()
        step = TrainStep(cfg, model, 10, torch.device("cpu"))
        step(x, y, attack=APGDTrain(eps=EPS, step_size=2 * EPS, steps=2, objective="ce",
                                    random_start="none"), epoch=1, lr=1e-3)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-9, atol=1e-12)
    cfg = build_config({**base, "data": {**base["data"], "mixup": 0.8, "cutmix": 1.0,
                                         "smoothing": 0.1}})
    torch.manual_seed(0)
    step = TrainStep(cfg, create_model("timm:test_vit", 10, img_size=16).double(), 10,
                     torch.device("cpu"))
    objective = step.objective
    step.objective = lambda logits: (seen.append(logits.y), objective(logits))[1]
    step(x, y, attack=APGDTrain(eps=EPS, step_size=2 * EPS, steps=2, objective="ce",
                                random_start="none"), epoch=1, lr=1e-3)
    assert seen[0].shape == (8, 10) and torch.allclose(seen[0].sum(1), torch.ones(8).double())
    assert (seen[0] > 0.5).sum() < 8 or seen[0].max() < 0.91  # mixed or at least smoothed


def singh_train_loop(model, ema, optimizer, mixup_fn, batches, lrs, eps):
    """main.py's train_loop for one epoch (float64, no AMP) with WrappedModel's forward: Mixup,
    the lr of the iteration, the attack in eval mode, the train-mode forward of its point,
    SoftTargetCrossEntropy, AdamW, ModelEmaV2 after the step."""
    model.train()
    for ix, (images, target) in enumerate(batches):
        images, target = mixup_fn(images, target)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lrs[ix]
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        z = singh_apgd_train(model, images, target, eps, 2)
        model.train()
        output = model(z)
        loss = torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).mean()
        loss.backward()
        optimizer.step()
        ema.update(model)


def _bn_net():
    """A small float64 network with BatchNorm: the model's modes matter."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double()


def _their_mixup(d):
    from timm.data import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                 switch_prob=d.mixup_switch_prob, mode="batch", label_smoothing=d.smoothing,
                 num_classes=5)


def _our_epochs(cfg, batches, tmp_path):
    """The trainer's epoch loop over `batches` for cfg.train.epochs epochs, from numpy seed 0
    (timm's Mixup draws from it) and torch seed 0; (the TrainStep, the global step)."""
    parts = TrainStep(cfg, _bn_net(), 5, torch.device("cpu"))
    log = RunLog(tmp_path, echo=False)
    np.random.seed(0)
    torch.manual_seed(0)
    step = 0
    for epoch in range(1, cfg.train.epochs + 1):  # timm's Mixup mixes in place: copies
        _, _, _, step = _train_epoch(cfg, parts, [(x.clone(), y) for x, y in batches],
                                     build_attack(cfg, epoch), epoch, step, 1.0, tmp_path, log,
                                     False)
    return parts, step


def _assert_same_training(parts, model, ema, steps):
    assert_states_close(parts.model.state_dict(), model.state_dict(), "model", bound=1e-10)
    assert_states_close(parts.ema.module.state_dict(), ema.module.state_dict(), "EMA",
                        bound=1e-10)
    ours = parts.model.state_dict()
    assert not torch.equal(ours["1.running_mean"], torch.zeros(4))
    assert ours["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == steps


def _shipped(name, *overrides):
    path = Path(__file__).parent.parent / "configs" / "imagenet" / f"{name}.yaml"
    return load_config(path, ["train.epochs=3", "train.batch_size=6", "train.device=cpu",
                              "train.ema_tau=0.5", *overrides])  # an EMA that moves


BATCHES = [_batch(seed=20 + k, n=6, classes=5) for k in range(2)]  # every class present


def test_singh_recipe_epochs_equal_their_train_loop(tmp_path, float64):
    """Three epochs of the shipped Singh et al. config through the trainer's epoch loop equal
    their train_loop: every iteration's lr, Mixup/CutMix, the model's modes (BatchNorm's running
    statistics move only in the training forward), the decay groups, AdamW, the EMA."""
    from timm.utils import ModelEmaV2

    cfg = _shipped("singh_at_convnext_t_convstem", "train.lr_warmup_epochs=1")
    t = cfg.train
    theirs = _bn_net()
    no_decay = [p for n, p in theirs.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for n, p in theirs.named_parameters() if not (p.ndim <= 1 or n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.},
                                   {"params": decay, "weight_decay": t.weight_decay}],
                                  betas=(0.9, 0.95))
    ema, mixup = ModelEmaV2(theirs, decay=t.ema_tau), _their_mixup(cfg.data)
    np.random.seed(0)
    for epoch in range(t.epochs):
        singh_train_loop(theirs, ema, optimizer, mixup, [(x.clone(), y) for x, y in BATCHES],
                         singh_lrs(epoch, len(BATCHES), t.lr, t.epochs, t.lr_warmup_epochs), EPS)
    parts, step = _our_epochs(cfg, BATCHES, tmp_path)
    assert step == 6
    _assert_same_training(parts, theirs, ema, 6)


def ares_train_one_epoch(epoch, model, batches, optimizer, scheduler, ema, mixup_fn, eps, steps,
                         attack_step):
    """adversarial_training.py's train_one_epoch (advtrain, no AMP, no clipping): Mixup, the
    ramped step, adv_generator (eval mode inside, train mode restored), the training forward,
    SoftTargetCrossEntropy, zero_grad after the forward, AdamW, ModelEmaV2, the scheduler's
    step_update after every update."""
    model.train()
    num_updates = epoch * len(batches)
    att_step = attack_step * min(epoch, 5) / 5
    for images, target in batches:
        images, target = mixup_fn(images, target)
        model.eval()
        adv = ares_adv_generator(model, images, target, eps, steps, att_step)
        model.train()
        output = model(adv)
        loss = torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)


def test_ares_recipe_epochs_equal_their_train_one_epoch(tmp_path, float64):
    """Three epochs of the shipped ARES ConvNeXt-B config (the attack step ramps from 0) through
    the trainer's epoch loop equal their train_one_epoch with timm's own optimizer, scheduler
    (per update, warm-up then cosine) and ModelEmaV2."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV2

    cfg = _shipped("ares_at_convnext_b", "train.lr_warmup_epochs=1")
    t, a = cfg.train, cfg.attack
    theirs = _bn_net()
    lr = t.lr * t.batch_size / t.lr_base_batch  # args.lr = lrb * batch_size * world / 512
    optimizer = create_optimizer_v2(theirs, opt="adamw", lr=lr, weight_decay=t.weight_decay,
                                    eps=t.adam_eps)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=t.epochs, warmup_epochs=t.lr_warmup_epochs,
        warmup_lr=t.lr_warmup_start, min_lr=t.lr_min, step_on_epochs=False,
        updates_per_epoch=len(BATCHES))
    ema, mixup = ModelEmaV2(theirs, decay=t.ema_tau), _their_mixup(cfg.data)
    np.random.seed(0)
    torch.manual_seed(0)
    for epoch in range(t.epochs):
        ares_train_one_epoch(epoch, theirs, [(x.clone(), y) for x, y in BATCHES], optimizer,
                             scheduler, ema, mixup, a.eps, a.steps, a.step_size)
    parts, step = _our_epochs(cfg, BATCHES, tmp_path)
    assert step == 6
    _assert_same_training(parts, theirs, ema, 6)

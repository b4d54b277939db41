"""Robust distillation computes what the authors' released code computes (ARD 779ade3, RSLAD
c40e04f, AdaAD 9e5c6e5, DKL c5e8ad2): each loss against a float64 transcription (values and
gradients, on random, confidently wrong and near-certain logits), each attack bit-equal from the
same noise, the model modes, and whole training steps of a tiny teacher and student on images
with saturated pixels against a transcription of each authors' loop.

The transcriptions follow the issue's description of the released scripts, written out here."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import LargestTensor, assert_states_close
from torch import nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.config import build_config
from advgkl.config.methods import METHODS
from advgkl.losses.functional import kl_divergence, rslad_kl
from advgkl.methods.objectives import Logits, build_objective
from advgkl.methods.teacher import FrozenTeacher
from advgkl.models import create_model
from advgkl.training.build import build_attack
from advgkl.training.step import TrainStep

KLDiv = nn.KLDivLoss  # the authors' criterion, with its 'mean' default


def kldiv_mean(log_q, p):
    with warnings.catch_warnings():   # PyTorch warns that 'mean' divides by B * C: we want that
        warnings.simplefilter("ignore", UserWarning)
        return KLDiv()(log_q, p)


def logits_sets(classes, seed):
    """(student, teacher, labels): random rows, a confidently wrong student, near-certain ones."""
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(8, classes, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(8, classes, generator=g, dtype=torch.float64)
    y = torch.arange(8) % classes
    s[1, (y[1] + 1) % classes] += 25                      # confidently wrong
    s[2, y[2]] += 40
    t[2, y[2]] += 40                                      # both near certain
    t[3, (y[3] + 1) % classes] += 30                      # a teacher certain of a wrong class
    return s.requires_grad_(), t, y


def grads(fn, *tensors):
    """The value and the gradient for each tensor (zero where it does not enter)."""
    value = fn(*tensors)
    found = torch.autograd.grad(value, tensors, allow_unused=True)
    return (value.detach(), *(torch.zeros_like(t) if g is None else g
                              for t, g in zip(tensors, found)))


def assert_same(ours, theirs, rtol=1e-12):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-15)


def settings(method, **values):
    return METHODS[method].settings(**values)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("classes", [10, 100])
def test_ard_loss_equals_its_code(alpha, classes):
    s, t, y = logits_sets(classes, 1)
    nat = (s.detach() + 1).requires_grad_()
    objective = build_objective("ard", settings("ard", alpha=alpha))

    def ours(adv, clean):
        return objective(Logits(clean, adv, y, teacher_nat=t))["loss"]

    def theirs(adv, clean):
        return alpha * 30.0 * 30.0 * kldiv_mean(F.log_softmax(adv / 30.0, dim=1),
                                                F.softmax(t / 30.0, dim=1)) + \
            (1.0 - alpha) * F.cross_entropy(clean, y)

    assert_same(grads(ours, s, nat), grads(theirs, s, nat))


def rslad_kl_as_written(a, b):
    return -a * b + torch.log(b + 1e-5) * b


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_rslad_loss_equals_its_code(dataset, classes):
    s, t, y = logits_sets(classes, 2)
    nat = (0.5 * s.detach()).requires_grad_()
    objective = build_objective("rslad", dataset=dataset)

    def ours(adv, clean):
        return objective(Logits(clean, adv, y, teacher_nat=t))["loss"]

    def theirs(adv, clean):
        p = F.softmax(t, dim=1)
        if dataset == "cifar100":   # its CIFAR-100 script: log(softmax), times 10
            terms = [10 * torch.mean(rslad_kl_as_written(torch.log(F.softmax(z, dim=1)), p))
                     for z in (adv, clean)]
            return 5.0 / 6.0 * terms[0] + 1.0 / 6.0 * terms[1]
        terms = [torch.mean(rslad_kl_as_written(F.log_softmax(z, dim=1), p)) for z in (adv, clean)]
        return 5 / 6.0 * terms[0] + 1 / 6.0 * terms[1]

    assert_same(grads(ours, s, nat), grads(theirs, s, nat))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_adaad_loss_equals_its_code(alpha, dataset, classes):
    s, t_adv, y = logits_sets(classes, 3)
    nat, t_nat = (s.detach() - 1).requires_grad_(), t_adv + 0.5
    objective = build_objective("adaad", settings("adaad", alpha=alpha), dataset=dataset)

    def ours(adv, clean):
        return objective(Logits(clean, adv, y, teacher_nat=t_nat, teacher_adv=t_adv))["loss"]

    def theirs(adv, clean):
        def kl(z, t):
            if dataset == "cifar100":
                return (1 / len(z)) * torch.sum(KLDiv(reduction="none")(
                    F.log_softmax(z, dim=1), F.softmax(t, dim=1)))
            return kldiv_mean(F.log_softmax(z, dim=1), F.softmax(t, dim=1))
        return alpha * kl(adv, t_adv) + (1 - alpha) * kl(clean, t_nat)

    assert_same(grads(ours, s, nat), grads(theirs, s, nat))


def dkl_loss_as_written(s, t, temperature, alpha, beta, gamma, class_prior=None, t2=1.0):
    """The GKL-KD loss of the issue's description, with (B, C, C) pair tensors."""
    classes = s.shape[1]
    delta_t = t.view(-1, classes, 1) - t.view(-1, 1, classes)
    delta_s = s.view(-1, classes, 1) - s.view(-1, 1, classes)
    with torch.no_grad():
        w = class_prior if class_prior is not None else F.softmax(t / t2, dim=1)
        w = torch.pow(w, gamma)
        p_n = w.view(-1, classes, 1) @ w.view(-1, 1, classes)
    mse = 0.25 * (torch.pow(delta_t - delta_s, 2) * p_n).sum() / p_n.sum()
    sce = -(F.softmax(t / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)).sum(1)
    return beta * mse + alpha * sce.mean()


@pytest.mark.parametrize("class_prior", [True, False])
@pytest.mark.parametrize("epoch", [1, 7, 30])
def test_gkl_kd_loss_equals_the_papers_code(class_prior, epoch):
    s, t, y = logits_sets(100, 4)
    prior = torch.softmax(torch.randn(100, 100, generator=torch.Generator().manual_seed(5),
                                      dtype=torch.float64), 1)
    kd = settings("gkl_kd", class_prior=class_prior)
    objective = build_objective("gkl_kd", kd)
    rows = prior[y] if class_prior else None

    def ours(student):
        return objective(Logits(student, student, y, rows, teacher_nat=t, epoch=epoch))["loss"]

    def theirs(student):
        loss_ce = 1.0 * F.cross_entropy(student, y)
        loss_kd = min(epoch / 20, 1.0) * dkl_loss_as_written(
            student, t, 4.0, 1.0, 16.0, 0.05, F.one_hot(y, 100).double() @ prior
            if class_prior else None, 4.0)
        return loss_ce + loss_kd

    assert_same(grads(ours, s), grads(theirs, s), rtol=1e-10)


def test_gkl_kd_never_builds_a_b_c_c_tensor():
    s = torch.randn(16, 500, requires_grad=True)
    t = torch.randn(16, 500)
    rows = torch.softmax(torch.randn(16, 500), 1)
    with LargestTensor() as mode:
        loss = build_objective("gkl_kd")(Logits(s, s, torch.arange(16), rows, teacher_nat=t))
        loss["loss"].backward()
    assert mode.largest <= 16 * 500


@pytest.mark.parametrize("method", ["rslad", "adaad"])
def test_the_gkl_divergence_is_the_kl_gradient_plus_wmse(method):
    """divergence gkl with gkl_beta 0 has the student gradient of the method's KL; its wMSE half
    is the pairwise definition over teacher / student logit gaps, scaled like the KL."""
    s, t, y = logits_sets(10, 6)
    rows = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(7),
                                     dtype=torch.float64), 1)
    logits = dict(teacher_nat=t, teacher_adv=t, prior_rows=rows)

    def loss(settings_, student):
        return build_objective(method, settings_)(Logits(student, student, y, **logits))["loss"]

    kl = grads(lambda z: loss(settings(method), z), s)
    sce_only = grads(lambda z: loss(settings(method, divergence="gkl", gkl_beta=0.0), z), s)
    torch.testing.assert_close(sce_only[1], kl[1], rtol=1e-12, atol=1e-15)
    full = grads(lambda z: loss(settings(method, divergence="gkl"), z), s)
    scale = 1 / 10    # both KLs are means over B * C on 10 classes
    direct = grads(lambda z: scale * dkl_loss_as_written(z, t, 1.0, 1.0, 5.0, 1.0, rows), s)
    assert_same(full, direct, rtol=1e-10)


def test_kl_divergence_reductions():
    s, t, _ = logits_sets(10, 8)
    torch.testing.assert_close(kl_divergence(s, t), kldiv_mean(F.log_softmax(s, 1),
                                                               F.softmax(t, 1)))
    batch = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    torch.testing.assert_close(kl_divergence(s, t, reduction="batch"), batch)
    assert rslad_kl(s, t) > 0


# ---- attacks: bit-equal to the authors' loops from the same noise, in the stated modes --------

def images(n=20, size=16, seed=0):
    """Images with about a third of the pixels at exactly 0 or 1, every class present."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    coin = torch.rand(x.shape, generator=g, dtype=torch.float64)
    x[coin < 0.15], x[coin > 0.85] = 0.0, 1.0
    return x, torch.arange(n) % 10


def nets(seed=0):
    torch.manual_seed(seed)
    student = create_model("small-cnn", 10)
    teacher = create_model("wrn-10-1", 10)
    for p in teacher.parameters():   # a teacher that is not at its initialization
        p.data.add_(0.05 * torch.randn_like(p))
    return student, FrozenTeacher(teacher)


EPS, STEP, STEPS = 16 / 255, 4 / 255, 3


def ard_attack_as_written(student, x, y):
    adv = x.detach() + torch.zeros_like(x).uniform_(-EPS, EPS)
    for _ in range(STEPS):
        adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(student(adv), y, reduction="sum")
        grad = torch.autograd.grad(loss, [adv])[0]
        adv = adv.detach() + STEP * torch.sign(grad.detach())
        adv = torch.clamp(torch.min(torch.max(adv, x - EPS), x + EPS), 0.0, 1.0)
    return adv


def kl_attack_as_written(student, x, target):
    """RSLAD's inner loss (`target` the teacher's clean logits) and AdaAD's (`target` None: the
    teacher on the current point, not detached)."""
    adv = x.detach() + 0.001 * torch.randn(x.shape)
    for _ in range(STEPS):
        adv.requires_grad_()
        with torch.enable_grad():
            t = target if not callable(target) else target(adv)
            loss = torch.sum(KLDiv(reduction="none")(F.log_softmax(student(adv), dim=1),
                                                    F.softmax(t, dim=1)))
        grad = torch.autograd.grad(loss, [adv])[0]
        adv = adv.detach() + STEP * torch.sign(grad.detach())
        adv = torch.clamp(torch.min(torch.max(adv, x - EPS), x + EPS), 0.0, 1.0)
    return adv


def modes_seen(module):
    seen = []
    module.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    return seen


@pytest.mark.parametrize("method", ["ard", "rslad", "adaad", "gkl_kd"])
def test_each_attack_is_bit_equal_to_its_code_in_its_modes(method, float64):
    student, teacher = nets()
    student.train()
    x, y = images()
    cfg = build_config({}, [f"loss.method={method}", "distill.teacher=t.pt", "awp.gamma=0",
                            f"attack.eps={EPS}", f"attack.step_size={STEP}",
                            f"attack.steps={STEPS}"])
    attack = build_attack(cfg, 1)
    with torch.no_grad():
        t_nat = teacher(x)
    theirs_student = copy.deepcopy(student)
    student_modes, teacher_modes = modes_seen(student), modes_seen(teacher.module)
    torch.manual_seed(11)
    ours = attack(student, x, y, logits_nat=t_nat if attack.objective == "teacher_kl" else None,
                  teacher=teacher if method == "adaad" else None)
    teacher_modes = list(teacher_modes)
    torch.manual_seed(11)
    if method == "ard":
        theirs = ard_attack_as_written(theirs_student.train(), x, y)
    else:
        theirs = kl_attack_as_written(theirs_student.eval(), x,
                                      teacher if method == "adaad" else t_nat)
    assert torch.equal(ours, theirs)
    assert student.training                                  # the mode is given back
    assert student_modes == [method == "ard"] * STEPS        # ARD attacks in train mode
    assert teacher_modes == ([False] * STEPS if method == "adaad" else [])
    if method == "ard":  # train-mode forwards moved the student's BN statistics, as theirs
        for a, b in zip(student.buffers(), theirs_student.buffers()):
            assert torch.equal(a, b)


def test_adaad_attack_takes_its_gradient_through_the_teacher(float64):
    student, teacher = nets()
    x, y = images()
    attack = PGDAttack(eps=EPS, step_size=STEP, steps=STEPS, objective="adaad")
    torch.manual_seed(1)
    through = attack(student, x, y, teacher=teacher)
    torch.manual_seed(1)
    detached = attack(student, x, y, teacher=lambda z: teacher(z).detach())
    assert not torch.equal(through, detached)


# ---- whole steps against the authors' loops ---------------------------------------------------

def authors_step(method, student, teacher, opt, x, y, kd, epoch=1, prior=None):
    """One training step of `method` as its authors' script runs it (optimizer given)."""
    if method == "gkl_kd":   # attack.eps 0: the paper's KD loss; the student once, train mode
        student.train()
        opt.zero_grad()
        logits = student(x)
        with torch.no_grad():
            t = teacher(x)
        rows = F.one_hot(y, 10).double() @ prior
        loss = kd.ce_weight * F.cross_entropy(logits, y) + min(epoch / kd.warmup, 1.0) * \
            dkl_loss_as_written(logits, t, kd.temperature, kd.alpha, kd.beta, kd.gamma, rows)
    elif method == "ard":
        student.train()
        opt.zero_grad()
        adv = ard_attack_as_written(student, x, y)
        outputs = student(adv)
        with torch.no_grad():
            t = teacher(x)
        basic = student(x)
        loss = kd.alpha * kd.temperature * kd.temperature * kldiv_mean(
            F.log_softmax(outputs / kd.temperature, dim=1), F.softmax(t / kd.temperature, dim=1)) \
            + (1.0 - kd.alpha) * F.cross_entropy(basic, y)
    elif method == "rslad":
        student.train()
        opt.zero_grad()
        with torch.no_grad():
            t = teacher(x)
        student.eval()
        adv = kl_attack_as_written(student, x, t)
        student.train()
        adv_logits, nat_logits = student(adv), student(x)
        p = F.softmax(t.detach(), dim=1)
        loss = 5 / 6.0 * torch.mean(rslad_kl_as_written(F.log_softmax(adv_logits, dim=1), p)) + \
            1 / 6.0 * torch.mean(rslad_kl_as_written(F.log_softmax(nat_logits, dim=1), p))
    else:   # adaad
        student.eval()
        adv = kl_attack_as_written(student, x, teacher)
        student.train()
        opt.zero_grad()
        ori, adv_out = student(x), student(adv)
        with torch.no_grad():
            t_ori, t_adv = teacher(x), teacher(adv)
        loss = kd.alpha * kldiv_mean(F.log_softmax(adv_out, dim=1), F.softmax(t_adv, dim=1)) + \
            (1 - kd.alpha) * kldiv_mean(F.log_softmax(ori, dim=1), F.softmax(t_ori, dim=1))
    loss.backward()
    opt.step()
    return t if method == "gkl_kd" else None


@pytest.mark.parametrize("method, extra", [("ard", []), ("ard", ["loss.ard.alpha=0.6"]),
                                           ("rslad", []), ("adaad", []),
                                           ("adaad", ["loss.adaad.alpha=0.5"]),
                                           ("gkl_kd", ["loss.gkl_kd.warmup=2"])])
def test_training_steps_equal_the_authors_loops(method, extra, float64):
    """Three batches of epoch 1 and three of epoch 2 (GKL-KD: its class prior of epoch 1 used in
    epoch 2, its warm-up ramp): our TrainStep against the transcription, from the same weights and
    noise; student weights and BN statistics agree to 1e-12."""
    eps = 0 if method == "gkl_kd" else EPS
    cfg = build_config({}, [f"loss.method={method}", "distill.teacher=t.pt", "awp.gamma=0",
                            f"attack.eps={eps}", f"attack.step_size={STEP}",
                            f"attack.steps={STEPS}", "train.lr=0.05", "train.device=cpu",
                            "data.dataset=digits", *extra])
    student, teacher = nets()
    theirs = copy.deepcopy(student)
    step = TrainStep(cfg, student, 10, torch.device("cpu"), note=lambda _: None, teacher=teacher)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    kd, prior = cfg.loss.settings, torch.full((10, 10), 0.1)
    for epoch in (1, 2):
        attack = build_attack(cfg, epoch)
        sums = torch.zeros(10, 10)
        for b in range(3):
            x, y = images(seed=10 * epoch + b)
            torch.manual_seed(b)
            step(x, y, attack=attack, epoch=epoch, lr=0.05)
            torch.manual_seed(b)
            t = authors_step(method, theirs, teacher, opt, x, y, kd, epoch, prior)
            if t is not None:
                sums += F.one_hot(y, 10).double().t() @ F.softmax(t / kd.prior_temperature, dim=1)
        step.prior.end_epoch()
        prior = sums / sums.sum(1, keepdim=True)
    assert_states_close(step.model.state_dict(), theirs.state_dict(), "student")
    if method == "gkl_kd":
        torch.testing.assert_close(step.prior.prior, prior, rtol=1e-14, atol=1e-16)
    assert all(p.grad is None for p in teacher.parameters())     # frozen: never a gradient
    assert not teacher.training and not teacher.module.training


@pytest.mark.parametrize("method, alpha, calls", [("ard", 1.0, 1), ("rslad", 1.0, 1),
                                                  ("gkl_kd", 1.0, 1), ("adaad", 1.0, STEPS + 1),
                                                  ("adaad", 0.5, STEPS + 2)])
def test_teacher_forwards_per_step(method, alpha, calls):
    """The teacher's clean logits are computed once per batch and serve the attack and the loss;
    AdaAD adds its attack's forwards and t(x_adv), and t(x) only when its clean term counts."""
    extra = [f"loss.adaad.alpha={alpha}"] if method == "adaad" else []
    cfg = build_config({}, [f"loss.method={method}", "distill.teacher=t.pt", "awp.gamma=0",
                            f"attack.steps={STEPS}", "data.dataset=digits", *extra])
    student, teacher = nets()
    seen = modes_seen(teacher.module)
    step = TrainStep(cfg, student, 10, torch.device("cpu"), note=lambda _: None, teacher=teacher)
    x, y = images()
    step(x.float(), y, attack=build_attack(cfg, 1), epoch=1, lr=0.1)
    assert len(seen) == calls and not any(seen)

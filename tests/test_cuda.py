"""The algorithm core on a CUDA GPU: exactness, bf16 autocast, invariants (skipped without CUDA)."""

import copy
import math

import pytest
import torch
from torch import nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.config.methods import METHODS
from advgkl.losses.functional import gkl_loss
from advgkl.methods.awp import AWP
from advgkl.methods.objectives import Logits, build_objective
from advgkl.methods.priors import ClassPrior
from advgkl.reference import pairwise_gkl_loss

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10)).to(DEVICE)


def batch(n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=g).to(DEVICE)
    return x, torch.randint(0, 10, (n,), generator=g).to(DEVICE)


@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_gkl_equals_pairwise_on_gpu_in_float64(classes):
    g = torch.Generator().manual_seed(classes)
    adv = torch.randn(8, classes, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    nat = torch.randn(8, classes, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    prior = torch.softmax(torch.randn(8, classes, generator=g, dtype=torch.float64), 1).to(DEVICE)
    kw = dict(alpha=4.0, beta=20.0, gamma=0.4, temperature=2.0)
    ours = gkl_loss(adv, nat, prior, **kw)
    ref = pairwise_gkl_loss(adv, nat, prior, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [adv, nat]), torch.autograd.grad(ref, [adv, nat])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["pgd_at", "trades", "ikl", "gkl"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_training_step(method, channels_last):
    model = small_net()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = batch()
    prior = ClassPrior(10, device=DEVICE)
    x_adv = PGDAttack(eps=8 / 255, step_size=2 / 255, steps=3)(model, x, y)
    settings = METHODS[method].settings(**({"gamma": 0.4} if method == "gkl" else {}))
    objective = build_objective(method, settings)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits_nat, logits_adv = model(x), model(x_adv)
        out = objective(Logits(logits_nat, logits_adv, y, prior.rows(y)))
    assert logits_nat.dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        fp32 = objective(Logits(model(x), model(x_adv), y, prior.rows(y)))["loss"]
    assert abs(out["loss"].item() - fp32.item()) < 0.05 * abs(fp32.item()) + 1e-2


def test_channels_last_attack_matches_contiguous():
    model = small_net().eval()
    x, y = batch()
    attack = PGDAttack(eps=8 / 255, step_size=2 / 255, steps=3, random_start="none",
                       objective="ce")
    ref = attack(model, x, y)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ours = attack(cl_model, x.contiguous(memory_format=torch.channels_last), y)
    # sign steps can flip where a gradient entry is ~0; nearly all pixels must agree
    assert (ours - ref).abs().le(1e-6).float().mean() > 0.99


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_attack_invariants_on_gpu(norm, eps):
    model = small_net().train()
    x, y = batch()
    x_adv = PGDAttack(eps=eps, step_size=eps / 4, steps=5, norm=norm)(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert x_adv.device.type == "cuda" and 0 <= x_adv.min() and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()


def test_prior_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    gpu, cpu = ClassPrior(10, temperature=4.0, device=DEVICE), ClassPrior(10, temperature=4.0)
    gpu.update(logits.to(DEVICE), y.to(DEVICE))
    cpu.update(logits, y)
    gpu.end_epoch()
    cpu.end_epoch()
    torch.testing.assert_close(gpu.prior.cpu(), cpu.prior)


def test_awp_restores_on_gpu():
    model = small_net()
    x, y = batch()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, gamma=0.005, lr=0.2)
    diff = awp.perturb(build_objective("gkl"), x, x, y, ClassPrior(10, device=DEVICE).rows(y))
    awp.restore(diff)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_one_training_epoch_on_the_gpu(tmp_path):
    from pathlib import Path

    from advgkl.checkpoint import load_checkpoint
    from advgkl.config import load_config
    from advgkl.training.loop import train

    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    cfg = load_config(demo, ["train.device=cuda", "train.epochs=2", "train.ema_start_epoch=1",
                             "awp.gamma=0.005", "awp.warmup_epochs=1"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert metrics["clean_acc"] > 0.5
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())  # loads anywhere


@pytest.mark.parametrize("options", [
    ["train.precision=bf16", "train.attack_precision=bf16", "train.channels_last=true"],
    ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
])
def test_bf16_channels_last_compile_training_on_the_gpu(tmp_path, options):
    from pathlib import Path

    from advgkl.checkpoint import load_checkpoint
    from advgkl.config import load_config
    from advgkl.models.loading import model_from_checkpoint
    from advgkl.training.loop import train

    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    cfg = load_config(demo, ["train.device=cuda", "train.epochs=3", *options])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert metrics["clean_acc"] > 0.5 and "ignored" not in (tmp_path / "run" / "train.log").read_text()
    model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))  # plain keys, no _orig_mod


def test_device_crop_flip_on_the_gpu_gives_uniform_valid_crops():
    from scipy.stats import chisquare
    from test_data import crop_flip_outcomes, fake_split, outcome_counts

    from advgkl.data.tensors import random_crop_flip

    img = fake_split(1).images[0]
    torch.manual_seed(0)
    out = random_crop_flip(img.to(DEVICE).expand(16_200, -1, -1, -1))
    assert out.device.type == "cuda" and out.dtype == torch.uint8
    counts = outcome_counts(out.cpu(), crop_flip_outcomes(img))
    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_generated_data_with_device_augmentation_on_the_gpu(tmp_path):
    from pathlib import Path

    import numpy as np

    from advgkl.config import load_config
    from advgkl.training.loop import train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "g.npz", image=rng.integers(0, 256, (2000, 16, 16, 3), dtype=np.uint8),
             label=rng.integers(0, 10, 2000))
    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    cfg = load_config(demo, ["train.device=cuda", "train.epochs=2", "data.augment=basic",
                             "data.device_augment=true", f"data.generated={tmp_path / 'g.npz'}",
                             "data.generated_fraction=0.5", "data.epoch_samples=2048",
                             "train.precision=bf16", "train.channels_last=true"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert metrics["epoch"] == 2 and np.isfinite(metrics["loss"])


def test_gkl_attack_objective_and_epoch_average_on_the_gpu(tmp_path):
    """The CIFAR-100 recipe's attack (sCE + prior-weighted wMSE) in bf16 autocast, with the
    epoch average, trains on CUDA and leaves an avg.pt that evaluates."""
    from pathlib import Path

    from advgkl.checkpoint import load_checkpoint
    from advgkl.config import load_config
    from advgkl.models.loading import model_from_checkpoint
    from advgkl.training.loop import train

    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    cfg = load_config(demo, ["train.device=cuda", "train.epochs=2", "attack.objective=gkl",
                             "train.attack_precision=bf16", "train.epoch_avg_tau=0.9"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    assert metrics["clean_acc"] > 0.5 and metrics["eval_weights"] == "avg"
    model_from_checkpoint(load_checkpoint(tmp_path / "run" / "avg.pt"))


@pytest.mark.parametrize("method", ["ard", "rslad", "adaad", "gkl_kd"])
def test_distillation_on_the_gpu_in_bf16_channels_last(tmp_path, method):
    """A teacher on the GPU beside the student: same autocast and memory format, frozen; the
    student trains and its checkpoint loads on the CPU."""
    from pathlib import Path

    from advgkl.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
    from advgkl.config import load_config
    from advgkl.models import create_model
    from advgkl.training.loop import train

    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, model_checkpoint(create_model("wrn-10-1", 10).state_dict(),
                                              arch="wrn-10-1", num_classes=10))
    demo = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"
    cfg = load_config(demo, ["train.device=cuda", "train.epochs=2", f"loss.method={method}",
                             f"distill.teacher={teacher}", "train.precision=bf16",
                             "train.attack_precision=bf16", "train.channels_last=true"])
    metrics = train(cfg, tmp_path / "run", echo=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert math.isfinite(metrics["loss"]) and "ignored" not in log
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["teacher"]["arch"] == "wrn-10-1" and all(
        t.device.type == "cpu" for t in ckpt["model"].values())


@pytest.mark.parametrize("variant", [["loss.method=fgsm_rs", "loss.start=zero"],
                                     ["loss.method=fgsm_rs"], ["loss.method=n_fgsm"],
                                     ["loss.method=grad_align"],
                                     ["loss.method=gkl", "attack.kind=n_fgsm"]])
def test_fast_methods_train_on_the_gpu(variant):
    """The trainer's step of each fast method (double backprop included) on CUDA: a finite
    loss; without random draws (FGSM from x) the CPU's first loss for the same weights."""
    from advgkl.config import build_config
    from advgkl.training.build import build_attack
    from advgkl.training.step import TrainStep

    cfg = build_config({}, [*variant, "awp.gamma=0", "train.ema_start_epoch=1000"])
    x, y = batch()
    losses = {}
    for device in ("cpu", DEVICE):
        step = TrainStep(cfg, small_net().cpu(), 10, torch.device(device), note=lambda _: None)
        step.model.train()
        losses[device] = step(x.to(device), y.to(device), attack=build_attack(cfg, 1), epoch=1,
                              lr=0.1)["loss"]
    assert math.isfinite(losses[DEVICE])
    if "loss.start=zero" in variant:
        assert losses[DEVICE] == pytest.approx(losses["cpu"], rel=1e-3)

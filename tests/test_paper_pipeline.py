"""The paper configs compute what the authors' pipeline computed: our trainer (attack, AWP,
objective, SGD, class prior, weight EMA, epoch average) against a literal transcription of their
loop, in float64, over 4 epochs, on images with saturated pixels and every class in each epoch.

The transcription follows the issue's description of the published scripts and the papers (TRADES'
attack, AWP's per-layer rescaled ascent step with the proxy optimizer at the base lr, GKL's loss
written pairwise), not anyone's code.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_states_close

import advgkl.data.train_data as train_data
import advgkl.training.loop as train_mod
from advgkl.checkpoint import load_checkpoint
from advgkl.config import load_config
from advgkl.data.tensors import NUM_CLASSES, Split, train_dataset
from advgkl.distributed import DistInfo
from advgkl.models import create_model
from advgkl.reference import pairwise_gkl_loss
from advgkl.training.average import average_run

ROOT = Path(__file__).parent.parent
N_IMAGES, SIZE = 200, 16
OVERRIDES = ["model.arch=wrn-10-1", "train.epochs=4", "train.batch_size=100", "data.augment=none",
             "data.num_workers=0", "train.device=cpu", "train.ema_start_epoch=2",
             "train.ema_tau=0.9", "awp.warmup_epochs=2", "train.save_every=1"]


def saturated_images(dataset, *, train, root="data", download=False):
    """Random images of which about a third of the pixels are exactly 0 or 1, two per class
    (CIFAR-100: every class in every epoch)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (N_IMAGES, 3, SIZE, SIZE), generator=g)
    coin = torch.rand(images.shape, generator=g)
    images[coin < 0.15] = 0
    images[coin > 0.85] = 255
    return Split(images.to(torch.uint8), torch.arange(N_IMAGES) % NUM_CLASSES[dataset])


def pairwise_objective(model, x, x_adv, y, rows, loss_cfg):
    """CE(clean) + beta * wMSE + alpha * sCE, the pairwise (B, C, C) form; also the clean logits."""
    logits_adv, logits_nat = model(x_adv), model(x)
    robust = pairwise_gkl_loss(logits_adv, logits_nat, rows, alpha=loss_cfg.alpha,
                               beta=loss_cfg.beta, gamma=loss_cfg.gamma, temperature=1.0)
    return F.cross_entropy(logits_nat, y) + robust, logits_nat


def authors_run(cfg, batches, num_classes):
    """The authors' training loop, then their epoch-averaging step, transcribed literally."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.arch, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9,
                                weight_decay=5e-4)
    proxy = copy.deepcopy(model)
    proxy_optimizer = torch.optim.SGD(proxy.parameters(), lr=cfg.train.lr)  # base lr, kept
    ema = copy.deepcopy(model)
    prior = torch.ones(num_classes, num_classes) / num_classes
    average = None
    epochs, cifar100 = cfg.train.epochs, num_classes == 100
    for epoch in range(1, epochs + 1):
        lr = cfg.train.lr * 0.5 * (1 + math.cos(epoch / (epochs + 1) * math.pi))
        eps = 8 / 255 * epoch / epochs
        step_size = eps / 2
        sums = torch.zeros(num_classes, num_classes)
        for x, y in batches(epoch):
            # Inner maximization: TRADES' start, the first gradient before any projection.
            model.eval()
            x_adv = x.detach() + 0.001 * torch.randn(x.shape)
            for _ in range(5):
                x_adv.requires_grad_()
                with torch.enable_grad():
                    out_adv, out_nat = model(x_adv), model(x)
                    if cifar100:  # sCE + prior-weighted wMSE, alpha = beta = gamma = 1
                        loss = pairwise_gkl_loss(out_adv, out_nat.detach(), prior[y], alpha=1.0,
                                                 beta=1.0, gamma=1.0)
                    else:         # KL
                        loss = torch.nn.KLDivLoss(reduction="sum")(
                            F.log_softmax(out_adv, dim=1), F.softmax(out_nat, dim=1))
                grad = torch.autograd.grad(loss, [x_adv])[0]
                x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
                x_adv = torch.clamp(x_adv, 0.0, 1.0)
            model.train()
            rows = prior[y]
            # AWP: one ascent step of a proxy, rescaled per layer to the layer's weight norm.
            diff = {}
            if epoch >= cfg.awp.warmup_epochs:
                proxy.load_state_dict(model.state_dict())
                proxy.train()
                proxy_loss, _ = pairwise_objective(proxy, x, x_adv, y, rows, cfg.loss.gkl)
                proxy_optimizer.zero_grad()
                (-proxy_loss).backward()
                proxy_optimizer.step()
                proxy_params = dict(proxy.named_parameters())
                with torch.no_grad():
                    for name, w in model.named_parameters():
                        if w.dim() > 1:
                            d = proxy_params[name] - w
                            diff[name] = d * w.norm() / (d.norm() + 1e-20)
                            w += cfg.awp.gamma * diff[name]
            loss, logits_nat = pairwise_objective(model, x, x_adv, y, rows, cfg.loss.gkl)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, w in model.named_parameters():
                    if name in diff:
                        w -= cfg.awp.gamma * diff[name]
                probs = F.softmax(logits_nat.detach() / cfg.loss.gkl.prior_temperature, dim=1)
                for b in range(len(y)):
                    sums[y[b]] += probs[b]
                state = model.state_dict()
                for key, value in ema.state_dict().items():
                    if epoch == cfg.train.ema_start_epoch or not value.is_floating_point():
                        value.copy_(state[key])
                    elif epoch > cfg.train.ema_start_epoch:
                        tau = cfg.train.ema_tau
                        value.copy_(tau * value + (1 - tau) * state[key])
        prior = sums / sums.sum(dim=1, keepdim=True)
        # The averaging step over the saved per-epoch checkpoints (tau 0.9 from epoch 1).
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch == 1:
            average = state
        else:
            average = {k: (1 - 0.9) * state[k] + 0.9 * average[k] for k in state}
    return model.state_dict(), ema.state_dict(), prior, average


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cifar10/gkl_wrn34_10.yaml",
                                    "cifar100/gkl_wrn34_10_gamma04.yaml"])
def test_trainer_equals_a_transcription_of_the_authors_pipeline(config, tmp_path, monkeypatch,
                                                                 float64):
    monkeypatch.setattr(train_data, "load_split", saturated_images)
    cfg = load_config(ROOT / "configs" / config, OVERRIDES)
    num_classes = NUM_CLASSES[cfg.data.dataset]
    assert cfg.attack.objective == ("gkl" if num_classes == 100 else "kl")
    assert cfg.eval.check == "none" and cfg.train.epoch_avg_tau == 0.9

    train_mod.train(cfg, tmp_path / "run", echo=False)

    split = saturated_images(cfg.data.dataset, train=True)
    assert ((split.images == 0) | (split.images == 255)).float().mean() > 0.3
    dataset = train_dataset(split, augment="none", two_view=False)

    def batches(epoch):  # the same images in the same order as the trainer drew them
        yield from train_data.epoch_loader(cfg, dataset, N_IMAGES, DistInfo(), epoch, False)

    model, ema, prior, average = authors_run(cfg, batches, num_classes)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch_avg"]["epochs"] == [1, 2, 3, 4]
    assert_states_close(last["model"], model, "weights")
    assert_states_close(last["ema"]["model"], ema, "EMA")
    assert_states_close(last["epoch_avg"]["model"], average, "epoch average")
    assert_states_close({"prior": last["prior"]["prior"]}, {"prior": prior}, "class prior")
    # avg.pt holds the same average, and so does the post-hoc average of the epoch files.
    assert all(torch.equal(v, last["epoch_avg"]["model"][k])
               for k, v in load_checkpoint(tmp_path / "run" / "avg.pt")["model"].items())
    posthoc = average_run(tmp_path / "run", tau=0.9, start=1, end=4)["model"]
    assert all(torch.equal(v, last["epoch_avg"]["model"][k]) for k, v in posthoc.items())

"""Benchmark: images/s of one full GKL-AT training step, ours vs a paper-style reference.

    python scripts/bench_step.py [--model wrn-16-4] [--batch-size 64] [--steps 5] [--no-awp]
        [--device cpu|cuda] [--variants reference,fp32,bf16,bf16-cl,bf16-cl-compile]
        [--repeats 10] [--warmup 3] [--loss-curve N] [--json out.json]

A step: PGD attack with K steps (KL objective, Linf 8/255, step 2/255), clean and adversarial
forward, GKL objective (alpha 4, beta 20, gamma 1), backward, SGD step, class-prior update, AWP
(gamma 0.005, on unless --no-awp) and the weight-EMA update.
- reference: written here in the paper code's style: the clean logits recomputed at every attack
  step, the pairwise (B, C, C) loss (`advgkl.reference`), fp32, contiguous memory format.
- ours: `advgkl.training.step.TrainStep`, the trainer's own step, built from the paper's CIFAR-10 config;
  fp32, bf16 (training and attack under bf16 autocast), -cl channels_last, -compile torch.compile.
Every variant starts from the same initial weights and runs the same batch with the same seed on
the same device; after --warmup steps each, the variants take turns for --repeats rounds; median
seconds per step with min-max. Peak GPU memory is the allocator's peak during a timed step
(all variants' models stay allocated).
--loss-curve N trains N steps from the same weights on a learnable synthetic stream: fp32, fp32
with another attack seed, fp32 on another draw of the data (a run's usual noise), and bf16; it
reports each curve's mean distance to the fp32 curve; bf16 passes if it is no farther than the
other data draw.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgkl.attacks.pgd import PGDAttack
from advgkl.config import load_config
from advgkl.methods.priors import ClassPrior
from advgkl.models import create_model
from advgkl.reference import pairwise_gkl_loss
from advgkl.training.build import build_attack
from advgkl.training.step import TrainStep

CONFIG = Path(__file__).parent.parent / "configs" / "cifar10" / "gkl_wrn34_10.yaml"
EPS, STEP_SIZE, LR = 8 / 255, 2 / 255, 0.1
ALPHA, BETA, GAMMA = 4.0, 20.0, 1.0
VARIANTS = {  # name -> config overrides for our step (None: the reference)
    "reference": None,
    "fp32": [],
    "bf16": ["train.precision=bf16", "train.attack_precision=bf16"],
    "bf16-cl": ["train.precision=bf16", "train.attack_precision=bf16", "train.channels_last=true"],
    "bf16-cl-compile": ["train.precision=bf16", "train.attack_precision=bf16",
                        "train.channels_last=true", "train.compile=true"],
}


class ReferenceStep:
    """The paper code's step (TRADES-style attack, AWP proxy, pairwise GKL), fp32."""

    def __init__(self, model: nn.Module, device: torch.device, steps: int, awp: bool) -> None:
        self.model, self.steps, self.awp = model.to(device), steps, awp
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9,
                                         weight_decay=5e-4)
        self.proxy = copy.deepcopy(model)
        self.proxy_optim = torch.optim.SGD(self.proxy.parameters(), lr=0.01)
        self.prior = ClassPrior(10, temperature=4.0, device=device)
        self.ema = copy.deepcopy(model)

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, rows: Tensor):
        logits_adv, logits_nat = model(x_adv), model(x)
        robust = pairwise_gkl_loss(logits_adv, logits_nat, rows, alpha=ALPHA, beta=BETA,
                                   gamma=GAMMA, temperature=1.0)
        return F.cross_entropy(logits_nat, y) + robust, logits_nat

    def __call__(self, x: Tensor, y: Tensor) -> float:
        model = self.model
        model.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(self.steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x), dim=1), reduction="sum")
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + STEP_SIZE * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
        model.train()
        rows = self.prior.rows(y)
        diff = {}
        if self.awp:
            self.proxy.load_state_dict(model.state_dict())
            self.proxy.train()
            self.proxy_optim.param_groups[0]["lr"] = LR
            self.proxy_optim.zero_grad()
            (-self.loss(self.proxy, x, x_adv, y, rows)[0]).backward()
            self.proxy_optim.step()
            proxy = dict(self.proxy.named_parameters())
            with torch.no_grad():
                for name, w in model.named_parameters():
                    if w.dim() > 1:
                        d = proxy[name] - w
                        diff[name] = d * (w.norm() / (d.norm() + 1e-20))
                        w.add_(0.005 * diff[name])
        loss, logits_nat = self.loss(model, x, x_adv, y, rows)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for name, w in model.named_parameters():
                if name in diff:
                    w.sub_(0.005 * diff[name])
            self.prior.update(logits_nat.detach(), y)
            for e, w in zip(self.ema.state_dict().values(), model.state_dict().values()):
                e.copy_(0.999 * e + 0.001 * w) if e.is_floating_point() else e.copy_(w)
        return loss.item()


def build(variant: str, init: nn.Module, args: argparse.Namespace, device: torch.device):
    """A callable step(x, y) -> loss for `variant`, on a copy of `init`."""
    model = copy.deepcopy(init)
    if VARIANTS[variant] is None:
        return ReferenceStep(model, device, args.steps, not args.no_awp)
    overrides = [f"model.arch={args.model}", f"train.batch_size={args.batch_size}",
                 f"awp.gamma={0 if args.no_awp else 0.005}", "awp.warmup_epochs=1",
                 "train.ema_start_epoch=0", "train.ema_tau=0.999", *VARIANTS[variant]]
    step = TrainStep(load_config(CONFIG, overrides), model, 10, device, note=lambda _: None)
    step.model.train()
    attack = PGDAttack(eps=EPS, step_size=STEP_SIZE, steps=args.steps, objective="kl")
    return lambda x, y: step(x, y, attack=attack, epoch=2, lr=LR)["loss"]


def cifar_batch(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A fixed CIFAR-sized batch of random images and labels (seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    return x, torch.randint(0, 10, (n,), generator=g).to(device)


def trainer_step(cfg, model: nn.Module, device: torch.device, teacher: nn.Module | None = None):
    """The trainer's own step for `cfg` (epoch 1's attack, lr 0.1) on a copy of `model`, as a
    callable step(x, y) -> loss."""
    step = TrainStep(cfg, copy.deepcopy(model), 10, device, note=lambda _: None, teacher=teacher)
    step.model.train()
    attack = build_attack(cfg, 1)
    return lambda x, y: step(x, y, attack=attack, epoch=1, lr=0.1)["loss"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(variants: list[str], init: nn.Module, x: Tensor, y: Tensor,
                  args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each variant's step built from `init` (same seed), then timed by `time_steps`."""
    steps = {}
    for variant in variants:
        torch.manual_seed(0)
        steps[variant] = build(variant, init, args, device)
    return time_steps(steps, x, y, args.repeats, args.warmup, device)


def time_steps(steps: dict, x: Tensor, y: Tensor, repeats: int, warmup: int,
               device: torch.device) -> list[dict]:
    """Warm each step(x, y) up, then time them in turns (one call each per round), so drift of a
    shared machine's speed hits all alike; median, min and max seconds, images/s, peak GPU
    memory."""
    rows = {}
    for variant, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step(x, y)
        sync(device)
        rows[variant] = {"variant": variant, "warmup_s": time.perf_counter() - start, "times": []}
    for _ in range(repeats):
        for variant, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(x, y)
            sync(device)
            row = rows[variant]
            row["times"].append(time.perf_counter() - start)
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for row in rows.values():
        times = row.pop("times")
        row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                   images_per_s=len(y) / statistics.median(times))
    return list(rows.values())


def synthetic_stream(n: int, batch: int, device: torch.device, seed: int, size: int = 32):
    """n batches of a learnable task: each class a fixed pattern (the same for every seed) plus
    noise; `seed` draws the labels and the noise."""
    patterns = torch.rand(10, 3, size, size, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = (0.5 * patterns[y] + 0.5 * torch.rand(batch, 3, size, size, generator=g)).clamp(0, 1)
        yield x.to(device), y.to(device)


def loss_curve(init: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Per-step losses of short runs from the same weights: fp32; fp32 with another attack seed
    (the smallest noise); fp32 on another draw of the data (a run's usual noise); bf16."""
    curves = {}
    for name, variant, seed, data in (("fp32", "fp32", 0, 0), ("fp32-attack-seed", "fp32", 1, 0),
                                      ("fp32-other-data", "fp32", 0, 1), ("bf16", "bf16", 0, 0)):
        torch.manual_seed(seed)
        step = build(variant, init, args, device)
        curves[name] = [step(x, y) for x, y in synthetic_stream(args.loss_curve, args.batch_size,
                                                                device, data)]
    base = curves["fp32"]
    diff = {name: statistics.fmean(abs(a - b) for a, b in zip(base, curve))
            for name, curve in curves.items() if name != "fp32"}
    return {"steps": args.loss_curve, "curves": curves, "mean_abs_diff_vs_fp32": diff,
            "first_loss": base[0], "last_loss": base[-1],
            "within_noise": diff["bf16"] <= diff["fp32-other-data"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wrn-16-4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="attack steps K")
    parser.add_argument("--no-awp", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="reference,fp32",
                        help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-curve", type=int, default=0, metavar="N")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    torch.manual_seed(0)
    init = create_model(args.model, 10)
    x, y = cifar_batch(args.batch_size, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch_size}, K={args.steps}, AWP "
          f"{'off' if args.no_awp else 'on'}, {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = time_variants(variants, init, x, y, args, device)
    for r in rows:
        print(f"{r['variant']:>16}: {r['images_per_s']:8.1f} img/s  median "
              f"{1000 * r['median_s']:8.1f} ms (min {1000 * r['min_s']:.1f}, "
              f"max {1000 * r['max_s']:.1f})"
              + (f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""), flush=True)
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    if ref:
        for r in rows:
            r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
        print("speed-up vs reference: " + ", ".join(
            f"{r['variant']} {r['speedup_vs_reference']:.2f}x" for r in rows))
    result = {"model": args.model, "batch_size": args.batch_size, "attack_steps": args.steps,
              "awp": not args.no_awp, "device": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.loss_curve:
        result["loss_curve"] = curve = loss_curve(init, args, device)
        print(f"loss curve over {curve['steps']} steps, fp32 {curve['first_loss']:.3f} -> "
              f"{curve['last_loss']:.3f}; mean |loss - fp32 loss|: " + ", ".join(
                  f"{k} {v:.4f}" for k, v in curve["mean_abs_diff_vs_fp32"].items())
              + f"; bf16 within a run's noise: {curve['within_noise']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: each fast method's training step time as a ratio to PGD-AT's, on the same model.

    python scripts/bench_fast.py [--model preact-resnet-18] [--batch-size 32] [--steps 10]
        [--device cpu|cuda] [--repeats 5] [--warmup 2] [--json out.json]

Every variant is the trainer's own step (`advgkl.training.step.TrainStep` with the attack `build_attack`
makes), fp32, from the same initial weights, on the same batch (CIFAR-sized, Linf 8/255), with
each method's published settings: PGD-AT (K steps of 2/255, Rice et al.'s form), GKL (K steps),
FGSM-RS, N-FGSM, GradAlign (its double backprop) and GKL with N-FGSM's attack. Timed in turns
after --warmup steps each (`bench_step.time_steps`); median seconds with min-max; the ratio is
median / PGD-AT's median (1/ratio: how many fast steps one PGD-AT step buys).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_step import cifar_batch, time_steps, trainer_step

from advgkl.config import build_config
from advgkl.machine import describe_machine
from advgkl.models import create_model

VARIANTS = {"pgd_at": ["loss.method=pgd_at"],
            "gkl": ["loss.method=gkl"],
            "fgsm_rs": ["loss.method=fgsm_rs"],
            "n_fgsm": ["loss.method=n_fgsm"],
            "grad_align": ["loss.method=grad_align"],
            "gkl_n_fgsm": ["loss.method=gkl", "attack.kind=n_fgsm"]}
PGD = ("pgd_at", "gkl")


def build(variant: str, model: torch.nn.Module, args: argparse.Namespace,
          device: torch.device):
    steps = [f"attack.steps={args.steps}"] if variant in PGD else []
    cfg = build_config({}, [*VARIANTS[variant], *steps, "awp.gamma=0",
                            "train.ema_start_epoch=1000"])
    return trainer_step(cfg, model, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preact-resnet-18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps K of PGD-AT and GKL")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = create_model(args.model, 10)
    x, y = cifar_batch(args.batch_size, device)
    machine = describe_machine(device)
    print(f"{args.model}, batch {args.batch_size}, PGD K={args.steps}, {machine}")
    steps = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        steps[variant] = build(variant, model, args, device)
    rows = time_steps(steps, x, y, args.repeats, args.warmup, device)
    base = next(r for r in rows if r["variant"] == "pgd_at")["median_s"]
    for r in rows:
        r["ratio_to_pgd_at"] = r["median_s"] / base
        print(f"{r['variant']:>12}: median {1000 * r['median_s']:8.1f} ms (min "
              f"{1000 * r['min_s']:.1f}, max {1000 * r['max_s']:.1f}), "
              f"{r['ratio_to_pgd_at']:.2f} x PGD-AT's step", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "batch_size": args.batch_size, "attack_steps": args.steps,
             "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

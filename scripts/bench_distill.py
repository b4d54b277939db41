"""Benchmark: one distillation step of each method against the same student's TRADES step and one
teacher forward.

    python scripts/bench_distill.py [--student resnet-18] [--teacher wrn-16-4] [--batch-size 32]
        [--steps 3] [--device cpu|cuda] [--repeats 5] [--warmup 1] [--precision fp32|bf16]
        [--json out.json]

Every variant is the trainer's own step (`advgkl.training.step.TrainStep`, CIFAR-10 shapes, the same
student weights, batch and attack of K steps): trades (the student alone), ard, rslad,
rslad-gkl (RSLAD with GKL's terms), gkl-kd, adaad; and teacher-forward, one forward of the frozen
teacher on the batch without gradients. The bound of the issue: ARD, RSLAD (both divergences) and
GKL-KD cost at most trades + teacher-forward + 5 %; AdaAD runs the teacher forward AND backward in
each attack step (inherent to its attack), so its cost is reported, not bounded. Steps take turns
(`bench_step.time_steps`); median seconds with min-max.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_step import cifar_batch, time_steps, trainer_step

from advgkl.config import build_config
from advgkl.methods.teacher import FrozenTeacher
from advgkl.models import create_model

VARIANTS = {"trades": ["loss.method=trades"],
            "ard": ["loss.method=ard"],
            "rslad": ["loss.method=rslad"],
            "rslad-gkl": ["loss.method=rslad", "loss.divergence=gkl"],
            "gkl-kd": ["loss.method=gkl_kd"],
            "adaad": ["loss.method=adaad"]}
BOUNDED = ("ard", "rslad", "rslad-gkl", "gkl-kd")


def build(variant: str, student: torch.nn.Module, teacher: FrozenTeacher,
          args: argparse.Namespace, device: torch.device):
    teacher_args = [] if variant == "trades" else ["distill.teacher=bench"]
    precision = [f"train.precision={args.precision}", f"train.attack_precision={args.precision}"]
    cfg = build_config({}, [*VARIANTS[variant], *teacher_args, *precision, "awp.gamma=0",
                            f"attack.steps={args.steps}", "train.ema_start_epoch=1000"])
    return trainer_step(cfg, student, device, None if variant == "trades" else teacher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="resnet-18")
    parser.add_argument("--teacher", default="wrn-16-4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="attack steps K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    student = create_model(args.student, 10)
    teacher = FrozenTeacher(create_model(args.teacher, 10)).to(device)
    x, y = cifar_batch(args.batch_size, device)
    amp = torch.autocast(device.type, torch.bfloat16,
                         enabled=args.precision == "bf16" and device.type == "cuda")

    def teacher_forward(x, y):
        with torch.no_grad(), amp:
            return teacher(x)

    steps = {"teacher-forward": teacher_forward}
    for variant in VARIANTS:
        torch.manual_seed(0)
        steps[variant] = build(variant, student, teacher, args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, "
          f"K={args.steps}, {args.precision}, {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = {r["variant"]: r for r in time_steps(steps, x, y, args.repeats, args.warmup, device)}
    bound = rows["trades"]["median_s"] + rows["teacher-forward"]["median_s"]
    for variant, r in rows.items():
        r["vs_trades_plus_teacher"] = r["median_s"] / bound
        verdict = ""
        if variant in BOUNDED:
            r["within_bound"] = r["median_s"] <= 1.05 * bound
            verdict = f"  {'within' if r['within_bound'] else 'OVER'} trades + teacher + 5 %"
        print(f"{variant:>16}: median {1000 * r['median_s']:8.1f} ms (min "
              f"{1000 * r['min_s']:.1f}, max {1000 * r['max_s']:.1f}); "
              f"{r['vs_trades_plus_teacher']:.2f}x trades + teacher forward{verdict}", flush=True)
    result = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size,
              "attack_steps": args.steps, "precision": args.precision, "device": name,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": list(rows.values())}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Project standard AutoAttack's wall-clock for 10,000 points from per-point attack costs.

Each of the four standard attacks (pyautoattack's, through `advgkl.evaluation.autoattack.evaluate_autoattack`)
is timed on the same N points of a model with random weights, with the model's own predictions as
labels and a tiny eps: no point can be broken, so every attack spends its full budget on every
point (APGD-CE's iterations, APGD-T's and FAB-T's 9 target classes, Square's 5,000 queries) —
the cost of a point that stays robust. The projection weighs the costs by a real model's profile:
every clean-correct point meets APGD-CE, the points robust after APGD-CE meet APGD-T, the points
robust after APGD-T meet FAB-T and Square:

    T(10k) = 10,000 * (clean * t_apgd-ce + r1 * t_apgd-t + r2 * (t_fab-t + t_square))

with (clean, r1, r2) = (0.85, 0.60, 0.57) by default (the paper's CIFAR-10 WRN-34-10 row: 85.3 %
clean, 57.1 % AutoAttack; 60 % after APGD-CE is our assumption). Points that are broken stop
early inside an attack, so this is an upper bound for the attacks that break some points.

    python scripts/bench_aa.py --model wrn-10-1 --n 16 --variants plain,channels_last,bf16
    python scripts/bench_aa.py --model wrn-34-10 --n 256 --batch-size 256 \\
        --variants plain,channels_last,compile,bf16 --json aa.json          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from advgkl.evaluation.autoattack import VERSIONS, evaluate_autoattack
from advgkl.evaluation.speed import speed_up
from advgkl.models import create_model

VARIANTS = {"plain": {}, "channels_last": {"channels_last": True},
            "compile": {"channels_last": True, "compile": True},
            "bf16": {"channels_last": True, "precision": "bf16"}}


def time_attacks(model, x, y, device, batch_size, precision) -> dict[str, float]:
    """Seconds per point of each standard attack at its full budget."""
    costs = {}
    for attack in VERSIONS["standard"]:
        start = time.perf_counter()
        result = evaluate_autoattack(model, x, y, eps=1e-6, version="custom", attacks=[attack],
                                     batch_size=batch_size, device=device, progress=False,
                                     precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert all(result.robust_flags), "a point was broken: the timing would be too short"
        costs[attack] = (time.perf_counter() - start) / len(y)
    return costs


def project(costs: dict[str, float], clean: float, r1: float, r2: float, n: int = 10_000) -> float:
    return n * (clean * costs["apgd-ce"] + r1 * costs["apgd-t"]
                + r2 * (costs["fab-t"] + costs["square"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wrn-10-1")
    parser.add_argument("--n", type=int, default=16, help="points timed")
    parser.add_argument("--batch-size", type=int, default=None, help="default: --n")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="plain,channels_last,bf16")
    parser.add_argument("--profile", default="0.85,0.60,0.57",
                        help="clean, robust after APGD-CE, robust after APGD-T")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    clean, r1, r2 = (float(v) for v in args.profile.split(","))
    torch.manual_seed(0)
    base = create_model(args.model, 10).to(device).eval()
    x = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        y = base(x).argmax(1)  # every point "correct": each attack runs on all of them
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, {args.n} points, batch {args.batch_size or args.n}, {name}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; profile clean {clean}, "
          f"after APGD-CE {r1}, after APGD-T {r2}")
    rows = []
    for variant in args.variants.split(","):
        options = dict(VARIANTS[variant])
        precision = options.pop("precision", "fp32")
        model, _ = speed_up(base, device, cudnn_benchmark=device.type == "cuda",
                            note=lambda _: None, **options)
        if options.get("compile"):  # compile outside the timing: one untimed pass first
            time_attacks(model, x, y, device, args.batch_size or args.n, precision)
        costs = time_attacks(model, x, y, device, args.batch_size or args.n, precision)
        hours = project(costs, clean, r1, r2) / 3600
        rows.append({"variant": variant, "precision": precision,
                     "ms_per_point": {k: 1000 * v for k, v in costs.items()},
                     "projected_hours_10k": hours})
        print(f"{variant:>14}: " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in costs.items())
              + f" ms/point -> {hours:.2f} h for 10,000 points"
              + (" (NON-STANDARD screening)" if precision == "bf16" else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "n": args.n, "device": name,
                                               "profile": [clean, r1, r2], "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()

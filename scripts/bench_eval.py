"""Benchmark: AutoAttack through advgkl vs a direct pyautoattack call, and sharded evaluation.

    python scripts/bench_eval.py [--checkpoint CKPT] [--n-examples 360] [--eps 32/255]
        [--batch-size 90] [--repeats 3] [--skip-sharding] [--json out.json]
    python scripts/bench_eval.py --apgd-model wrn-34-10 [--apgd-points 512] [--device cuda]

1. Overhead: `advgkl.evaluation.autoattack.evaluate_autoattack` vs `pyautoattack.AutoAttack(...)
   .run_standard_evaluation` on the same model, points, eps, batch size and seed (standard
   version), taking turns --repeats times; wall-clock ratio of the medians and of the fastest
   runs (a shared machine only ever adds time), and whether the robust flags are identical.
2. Sharding: `advgkl eval` in one process vs `torchrun --nproc_per_node=2 -m advgkl eval`, each
   process with one thread (OMP_NUM_THREADS=1); whole-command wall-clock and the speed-up, and
   both robust accuracies (shards batch the points differently, so AutoAttack's seeded random
   starts differ and a few borderline points can flip).
3. --apgd-model NAME (for a GPU): APGD-CE alone on --apgd-points random CIFAR-sized points with
   the model's own predictions as labels (so every point is attacked), fixed seed, fp32, one
   batch; points/s through advgkl and through a direct pyautoattack call.
Without --checkpoint it first trains the digits demo config for 5 epochs (about 20 s on 2 cores)
so that AutoAttack has a partly robust model to work on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from advgkl.checkpoint import load_checkpoint
from advgkl.config import load_config, parse_number
from advgkl.data.tensors import load_split, to_unit_float
from advgkl.evaluation.autoattack import evaluate_autoattack
from advgkl.models.loading import model_from_checkpoint
from advgkl.training.loop import train

DEMO = Path(__file__).parent.parent / "configs" / "demo" / "digits_gkl.yaml"


def demo_checkpoint(folder: Path) -> Path:
    cfg = load_config(DEMO, ["train.epochs=5", "data.num_workers=0"])
    train(cfg, folder / "demo", echo=False)
    return folder / "demo" / "last.pt"


def overhead(ckpt: Path, args: argparse.Namespace, eps: float) -> dict:
    import pyautoattack

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    test = load_split("digits", train=False)
    x, y = to_unit_float(test.images[:args.n_examples]), test.labels[:args.n_examples]

    def ours():
        return evaluate_autoattack(model, x, y, eps=eps, batch_size=args.batch_size, seed=0,
                                   device="cpu", progress=False).robust_flags

    def direct():
        adversary = pyautoattack.AutoAttack(model, eps=eps, norm="Linf", seed=0, device="cpu",
                                            version="standard")
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
        return (y_adv == y).tolist()

    times: dict[str, list[float]] = {"ours": [], "direct": []}
    flags = {}
    for _ in range(args.repeats):
        for name, fn in (("direct", direct), ("ours", ours)):
            start = time.perf_counter()
            flags[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_examples": len(y), "batch_size": args.batch_size, "eps": args.eps,
            "seconds": times, "median_ours_s": med["ours"], "median_direct_s": med["direct"],
            "overhead": med["ours"] / med["direct"] - 1,
            "overhead_of_fastest": min(times["ours"]) / min(times["direct"]) - 1,
            "robust_acc": sum(flags["ours"]) / len(y),
            "identical_flags": flags["ours"] == flags["direct"]}


def sharding(ckpt: Path, args: argparse.Namespace, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["eval", str(ckpt), "--n-examples", str(args.n_examples), "--eps", args.eps,
              "--batch-size", str(args.batch_size)]
    runs = {"1 process": [sys.executable, "-m", "advgkl"],
            "2 processes": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "-m", "advgkl"]}
    seconds, flags = {}, {}
    for name, launcher in runs.items():
        out = folder / name.replace(" ", "-")
        start = time.perf_counter()
        done = subprocess.run([*launcher, *common, "--out", str(out)], capture_output=True,
                              text=True, env=env)
        seconds[name] = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        record = json.loads(next((out / "digits" / "Linf").glob("*.detailed.json")).read_text())
        flags[name] = record["result"]["robust_flags"]
        print(f"  {name}: {seconds[name]:.1f} s", flush=True)
    one, two = flags["1 process"], flags["2 processes"]
    return {"seconds": seconds, "speedup": seconds["1 process"] / seconds["2 processes"],
            "robust_acc": {k: sum(v) / len(v) for k, v in flags.items()},
            "differing_flags": sum(a != b for a, b in zip(one, two)), "threads_per_process": 1}


def apgd_timing(args: argparse.Namespace, eps: float) -> dict:
    import pyautoattack

    from advgkl.models import create_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.apgd_model, 10).to(device).eval()
    x = torch.rand(args.apgd_points, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x.to(device)).argmax(1).cpu()
    seconds = {}
    for name in ("direct", "ours", "direct", "ours"):  # the first of each warms up
        start = time.perf_counter()
        if name == "ours":
            flags = evaluate_autoattack(model, x, y, eps=eps, version="custom",
                                        attacks=["apgd-ce"], batch_size=args.apgd_points,
                                        seed=0, device=device, progress=False).robust_flags
        else:
            adversary = pyautoattack.AutoAttack(model, attacks=["apgd-ce"], eps=eps, norm="Linf",
                                                seed=0, device=device, version="custom")
            adversary.run_standard_evaluation(x, y, batch_size=args.apgd_points)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"model": args.apgd_model, "points": args.apgd_points, "eps": args.eps, "device": gpu,
            "seconds": seconds,
            "points_per_s": {k: args.apgd_points / v for k, v in seconds.items()},
            "robust_after": sum(flags) / len(flags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a digits checkpoint (default: train the demo)")
    parser.add_argument("--n-examples", type=int, default=360)
    parser.add_argument("--eps", help="default 32/255 on digits, 8/255 with --apgd-model")
    parser.add_argument("--batch-size", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sharding", action="store_true")
    parser.add_argument("--apgd-model", help="only time APGD-CE on this model, e.g. wrn-34-10")
    parser.add_argument("--apgd-points", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.eps = args.eps or ("8/255" if args.apgd_model else "32/255")
    eps = parse_number("--eps", args.eps)
    if args.apgd_model:
        r = apgd_timing(args, eps)
        print(f"APGD-CE, {r['model']}, {r['points']} points, {r['device']}: ours "
              f"{r['points_per_s']['ours']:.1f} points/s ({r['seconds']['ours']:.2f} s), direct "
              f"{r['points_per_s']['direct']:.1f} points/s ({r['seconds']['direct']:.2f} s); "
              f"robust after: {100 * r['robust_after']:.1f} %")
        if args.json:
            Path(args.json).write_text(json.dumps({"apgd": r}, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else demo_checkpoint(folder)
        print(f"AutoAttack standard, {args.n_examples} digits, eps {args.eps}, batch "
              f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        result = {"overhead": overhead(ckpt, args, eps)}
        o = result["overhead"]
        print(f"overhead: ours {o['median_ours_s']:.1f} s vs direct {o['median_direct_s']:.1f} s "
              f"({100 * o['overhead']:+.1f} % by medians, {100 * o['overhead_of_fastest']:+.1f} % "
              f"by fastest runs), robust {100 * o['robust_acc']:.2f} %, "
              f"identical flags: {o['identical_flags']}", flush=True)
        if not args.skip_sharding:
            result["sharding"] = s = sharding(ckpt, args, folder)
            print(f"sharding: 1 process {s['seconds']['1 process']:.1f} s, 2 processes "
                  f"{s['seconds']['2 processes']:.1f} s, speed-up {s['speedup']:.2f}x; robust "
                  + ", ".join(f"{k} {100 * v:.2f} %" for k, v in s["robust_acc"].items())
                  + f" ({s['differing_flags']} points differ: AutoAttack's random starts "
                  "depend on how points are batched)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

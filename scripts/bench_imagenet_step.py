"""Benchmark: the ImageNet recipe step (Singh et al.'s ConvNeXt-T-ConvStem, APGD-2, Mixup/CutMix,
AdamW, EMA) against a clean training step of the same model and batch, as a ratio, plus img/s.

    python scripts/bench_imagenet_step.py [--arch convstem-convnext-t] [--batch-size 80]
        [--image-size 224] [--device cpu|cuda] [--bf16] [--channels-last] [--compile]
        [--repeats 5] [--warmup 2] [--json out.json]

Both steps are `advgkl.training.step.TrainStep` built from configs/imagenet/singh_at_convnext_t_convstem
.yaml; the clean one with attack.eps=0 (one forward/backward). Same weights, same batch of random
images; median seconds per step after --warmup steps, the two alternating for --repeats rounds.
The FLOP estimate of the recipe headers predicts a ratio of about 10 / 3 (APGD-2: 3 forwards and
2 input backwards before the training forward/backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from advgkl.config import load_config
from advgkl.models import create_model
from advgkl.training.build import build_attack
from advgkl.training.step import TrainStep

CONFIG = (Path(__file__).parent.parent / "configs" / "imagenet"
          / "singh_at_convnext_t_convstem.yaml")


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    flags = [f"train.batch_size={args.batch_size}", "model.init=", f"model.arch={args.arch}",
             f"train.device={args.device}", f"data.image_size={args.image_size}",
             f"train.precision={'bf16' if args.bf16 else 'fp32'}",
             f"train.attack_precision={'bf16' if args.bf16 else 'fp32'}",
             f"train.channels_last={str(args.channels_last).lower()}",
             f"train.compile={str(args.compile).lower()}"]
    steps, weights = {}, None
    for name, extra in (("recipe", []), ("clean", ["attack.eps=0"])):
        cfg = load_config(CONFIG, flags + extra)
        torch.manual_seed(0)
        model = create_model(cfg.model.arch, 1000)
        if weights is None:
            weights = model.state_dict()
        model.load_state_dict(weights)
        steps[name] = (TrainStep(cfg, model, 1000, device, note=lambda _: None),
                       build_attack(cfg, 30))
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def run(name: str) -> float:
        step, attack = steps[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y, attack=attack, epoch=30, lr=1e-3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        run("recipe"), run("clean")
    times = {"recipe": [], "clean": []}
    for _ in range(args.repeats):
        for name in times:
            times[name].append(run(name))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "bf16": args.bf16, "channels_last": args.channels_last, "compile": args.compile,
            "seconds": median, "img_s": {k: args.batch_size / v for k, v in median.items()},
            "ratio": median["recipe"] / median["clean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="convstem-convnext-t")
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = measure(args)
    print(f"{result['arch']} batch {args.batch_size} at {args.image_size} px on "
          f"{result['device']}: recipe step {result['seconds']['recipe']:.3f} s "
          f"({result['img_s']['recipe']:.1f} img/s), clean step "
          f"{result['seconds']['clean']:.3f} s ({result['img_s']['clean']:.1f} img/s), "
          f"ratio {result['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

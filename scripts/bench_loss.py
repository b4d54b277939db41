"""Benchmark: gkl_loss (O(B·C)) vs the direct pairwise (B, C, C) formulation, forward + backward.

    python scripts/bench_loss.py [--device cpu|cuda] [--repeats 200] [--json out.json]

Reports the median time (and min-max spread) over repeats after a warm-up, and the peak memory of
one forward + backward: on CUDA from the allocator; on CPU the peak of the bytes held by tensors
the operations create (counted as they are created and freed, views excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from advgkl.losses.functional import gkl_loss
from advgkl.reference import pairwise_gkl_loss

SHAPES = ((128, 10), (256, 100), (256, 1000))
IMPLS = {"ours": gkl_loss, "pairwise": pairwise_gkl_loss}


def inputs(batch: int, classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(batch, classes, generator=g).to(device).requires_grad_()
    nat = torch.randn(batch, classes, generator=g).to(device).requires_grad_()
    prior = torch.softmax(torch.randn(batch, classes, generator=g), 1).to(device)
    return adv, nat, prior


def step(impl: str, adv, nat, prior) -> None:
    loss = IMPLS[impl](adv, nat, prior, alpha=4.0, beta=20.0, gamma=1.0, temperature=1.0)
    loss.backward()
    adv.grad = nat.grad = None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_impl(impl: str, batch: int, classes: int, device: str, repeats: int,
              budget_s: float = 20.0) -> list[float]:
    """Seconds per step: `repeats` timed steps after a warm-up, fewer (at least 3) past `budget_s`."""
    tensors = inputs(batch, classes, device)
    for _ in range(5):  # warm-up
        step(impl, *tensors)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        sync(device)
        start = time.perf_counter()
        step(impl, *tensors)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created by operations while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
        return out


def peak_memory_mib(impl: str, batch: int, classes: int, device: str) -> float:
    tensors = inputs(batch, classes, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(impl, *tensors)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as tracker:
        step(impl, *tensors)
    return tracker.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rows = []
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'B':>5} {'C':>5} | {'ours ms':>9} {'pairwise ms':>12} {'speed-up':>9} | "
          f"{'ours MiB':>9} {'pairwise MiB':>13} {'ratio':>7}")
    for batch, classes in SHAPES:
        row = {"batch": batch, "classes": classes}
        for impl in IMPLS:
            times = time_impl(impl, batch, classes, args.device, args.repeats)
            row[impl] = {"median_ms": 1e3 * statistics.median(times),
                         "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
                         "peak_mib": peak_memory_mib(impl, batch, classes, args.device)}
        ours, ref = row["ours"], row["pairwise"]
        row["speedup"] = ref["median_ms"] / ours["median_ms"]
        row["memory_ratio"] = ref["peak_mib"] / max(ours["peak_mib"], 1e-3)
        rows.append(row)
        print(f"{batch:>5} {classes:>5} | {ours['median_ms']:>9.3f} {ref['median_ms']:>12.3f} "
              f"{row['speedup']:>8.1f}x | {ours['peak_mib']:>9.2f} {ref['peak_mib']:>13.2f} "
              f"{row['memory_ratio']:>6.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()

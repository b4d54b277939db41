"""torch.distributed set-up for torchrun: NCCL on GPUs, gloo on CPUs; rank 0 writes."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialized the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[DistInfo, str]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns the info and the device name
    (`cuda:<local rank>` for auto/cuda under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), device_name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    return info, (f"cuda:{local_rank}" if cuda else ("cpu" if device_name == "auto" else device_name))


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def assert_ranks_agree(fingerprint: torch.Tensor, info: DistInfo, what: str) -> None:
    """Raise when the ranks hold different values (compared through a small fingerprint)."""
    if info.world == 1:
        return
    low, high = fingerprint.double().clone(), fingerprint.double().clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"ranks diverged: {what} differ between processes")


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (what torch.save writes and loads with weights_only: tensors,
    containers, numbers, strings), in rank order, on every rank."""
    if info.world == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # all_gather_object's own pickling of CPU tensors fails to load
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), one broadcast per
    dtype: what DDP does before each forward with gradients, here for the forwards that bypass
    DDP (the attack), so that rank 0's checkpoint holds every rank's state."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for group in groups.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, 0)
        for b, part in zip(group, flat.split([b.numel() for b in group])):
            b.copy_(part.view_as(b))


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()

"""Faster evaluation without changing what AutoAttack computes: the evaluated model is wrapped for
speed only (channels_last memory format, torch.compile with dynamic shapes for AutoAttack's
shrinking batches, cuDNN's kernel search) and the batch can be sized by a short probe.
pyautoattack's code is called as always."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from advgkl.errors import UserError

_PROBE_START = 32


def speed_up(model: nn.Module, device: torch.device, *, channels_last: bool = False,
             compile: bool = False, cudnn_benchmark: bool = False,
             note: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """The model wrapped as asked, and a record of what was applied (cuDNN's benchmark is a CUDA
    option: elsewhere it is ignored with a note)."""
    if cudnn_benchmark and device.type != "cuda":
        note(f"--cudnn-benchmark is a CUDA option; ignored on {device}")
    applied = {"channels_last": channels_last, "compile": compile,
               "cudnn_benchmark": cudnn_benchmark and device.type == "cuda"}
    if applied["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=True)
    return model, applied


def _fits(model: nn.Module, sample: Tensor, batch: int, device: torch.device) -> bool:
    """One forward and input-gradient backward (as an APGD step does) of `batch` copies of
    `sample` fits in the GPU's memory."""
    try:
        x = sample[:1].expand(batch, *sample.shape[1:]).to(device).clone().requires_grad_(True)
        torch.autograd.grad(model(x).float().sum(), [x])
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def probe_batch_size(model: nn.Module, sample: Tensor, device: torch.device, *, limit: int,
                     fits: Callable[[nn.Module, Tensor, int, torch.device], bool] = _fits) -> int:
    """Half the largest power-of-two batch (32 .. `limit`) whose forward and backward fit on the
    GPU (FAB-T and Square keep more tensors alive than one APGD step); 500 or `limit` off the
    GPU, where memory is not the limit."""
    if device.type != "cuda":
        return min(limit, 500)
    batch, largest = _PROBE_START, 0
    while fits(model, sample, batch, device):
        largest, batch = batch, 2 * batch
        if largest // 2 >= limit:  # enough for every point
            break
    if not largest:
        raise UserError(f"--batch-size auto: not even {_PROBE_START} images fit on {device}; "
                        "give a smaller --batch-size")
    return max(1, min(limit, largest // 2))

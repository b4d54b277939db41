"""The machine a number came from: processor (CPU model or GPU name), threads, torch build.

Runs are bit-identical on the same machine and thread count, not across processors (another
CPU's kernels round differently), so every train.log, evaluation record and study table names it.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line: the processor that computes on `device`, the CPU threads, the torch build."""
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = _cpu_model()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"{processor}, {torch.get_num_threads()} threads, torch {torch.__version__} ({build})"

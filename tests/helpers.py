"""Small tools several test files share."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def assert_states_close(ours, theirs, what, bound=1e-12):
    """Every floating tensor of the state dict `theirs` equals `ours` to `bound`, relative to its
    largest entry (integer BatchNorm step counters are skipped: unused in eval mode)."""
    for key, value in theirs.items():
        if not ours[key].is_floating_point():
            continue
        err = (ours[key] - value).abs().max() / value.abs().max().clamp_min(1e-30)
        assert err <= bound, f"{what} {key}: relative difference {err:.3g}"




def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it at once, as a node's crash would: the tree is
    frozen (SIGSTOP) first so that nothing in it starts or writes anything more. torchrun gives
    its workers sessions of their own, out of killpg's reach."""
    frozen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
            frozen.add(p)
            todo += [c for c in _children(p) if c not in frozen]
    for p in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def kill_when(procs: subprocess.Popen | list[subprocess.Popen], ready,
              timeout: float = 120) -> None:
    """As soon as `ready()` holds (polled), SIGKILL each of `procs` (one or several: torchrun
    agents as nodes) with every process below it (kill_tree), or fail."""
    procs = procs if isinstance(procs, list) else [procs]
    deadline = time.monotonic() + timeout
    while not ready():
        assert all(p.poll() is None for p in procs), "a process ended before the moment to kill it"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.02)
    for proc in procs:
        kill_tree(proc.pid)
    for proc in procs:
        proc.wait()


def free_port() -> int:
    """A TCP port free on localhost now (for a process group of a test's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --standalone` (a free port of its own, so that tests run side by side under
    pytest-xdist) with `nproc` processes on one node, running `python -m advgkl args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "advgkl", *args]

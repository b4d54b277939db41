"""WideResNets in RobustBench's two layouts (same state-dict keys, shapes and eval outputs):

- `WideResNet`: the TRADES/AWP pre-activation WRN with ReLU and no input normalization, as
  `robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth, widen_factor, sub_block1=False)`.
- `DMWideResNet`: DeepMind's WRN (SiLU by default, mean/std normalization inside, "SAME" padding
  for strided convs), as `robustbench...dm_wide_resnet.DMWideResNet`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _blocks_per_group(depth: int) -> int:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth: {depth} is not 6n + 4 with n >= 1 (e.g. 10, 16, 28, 34, 70)")
    return (depth - 4) // 6


def _global_avg_pool(out: Tensor) -> Tensor:
    # The kernel spans the whole map: identical to RobustBench's avg_pool2d(out, 8) on 32x32
    # inputs, and still defined for other input sizes.
    return F.avg_pool2d(out, tuple(out.shape[-2:])).flatten(1)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (None if self.equal_in_out
                             else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        if not self.equal_in_out:  # the shortcut starts from the activated input
            x = act
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """TRADES-style WRN-depth-width for 3-channel images in [0, 1]."""

    def __init__(self, depth: int = 34, width: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        n = _blocks_per_group(depth)
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():  # TRADES' initialization
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(_global_avg_pool(self.relu(self.bn1(out))))


class _Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 activation: type[nn.Module]) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: {stride} is not 1 or 2")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
                         if self.has_shortcut else None)
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)  # TensorFlow's "SAME"

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        if self.has_shortcut:
            x = act
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(F.pad(act, self._pad)))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int,
                 activation: type[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                   activation) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """DeepMind's WRN-depth-width; normalizes [0, 1] inputs with `mean`/`std` (not in the state dict)."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10,
                 activation: type[nn.Module] = nn.SiLU, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        n = _blocks_per_group(depth)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, channels[0], channels[1], 1, activation),
            _BlockGroup(n, channels[1], channels[2], 2, activation),
            _BlockGroup(n, channels[2], channels[3], 2, activation))
        self.batchnorm = nn.BatchNorm2d(channels[3])
        self.relu = activation()
        self.logits = nn.Linear(channels[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        return self.logits(_global_avg_pool(self.relu(self.batchnorm(out))))

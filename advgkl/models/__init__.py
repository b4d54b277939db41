"""Model registry: `create_model(name, num_classes, **kwargs)` and `list_models()`.

Every model takes images in [0, 1]; any normalization lives inside it.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

from advgkl.models.imagenet import CONVSTEM, TIMM_PREFIX, create_timm
from advgkl.models.resnet import MobileNetV2, PreActResNet18, ResNet18, SmallCNN
from advgkl.models.wide_resnet import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                       DMWideResNet, WideResNet)

WRN_PATTERN = re.compile(r"wrn-(\d+)-(\d+)(-swish)?")
_LISTED_WRNS = ("wrn-10-1", "wrn-16-4", "wrn-28-10", "wrn-34-10", "wrn-34-20", "wrn-70-16",
                "wrn-10-1-swish", "wrn-28-10-swish", "wrn-70-16-swish")
_FIXED: dict[str, Callable[..., nn.Module]] = {
    "preact-resnet-18": PreActResNet18,
    "resnet-18": ResNet18,
    "resnet-18-lbgat": lambda num_classes: ResNet18(num_classes, strides=(1, 1, 2, 2)),
    "mobilenet-v2": MobileNetV2,
    "small-cnn": SmallCNN,
}


def list_models() -> list[str]:
    """Registered names; any wrn-<6n+4>-<width>[-swish] and any timm:<timm model> is accepted
    too."""
    return sorted((*_LISTED_WRNS, *_FIXED, *CONVSTEM))


def dm_normalization(num_classes: int) -> dict[str, Any]:
    """RobustBench's constants: CIFAR-100's for 100 classes, CIFAR-10's otherwise."""
    if num_classes == 100:
        return {"mean": CIFAR100_MEAN, "std": CIFAR100_STD}
    return {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with `num_classes` outputs."""
    if num_classes < 2:
        raise ValueError(f"num_classes: {num_classes} must be >= 2")
    match = WRN_PATTERN.fullmatch(name)
    try:
        if match:
            depth, width = int(match.group(1)), int(match.group(2))
            if match.group(3):
                kw = {**dm_normalization(num_classes), **kwargs}
                return DMWideResNet(depth, width, num_classes, **kw)
            return WideResNet(depth, width, num_classes, **kwargs)
        if name in _FIXED:
            return _FIXED[name](num_classes=num_classes, **kwargs)
        if name in CONVSTEM:
            return CONVSTEM[name].build(num_classes, **kwargs)
        if name.startswith(TIMM_PREFIX):
            return create_timm(name[len(TIMM_PREFIX):], num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{name}: bad keyword arguments {sorted(kwargs)} ({exc})") from None
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())} "
                     "(or any wrn-<6n+4>-<width>[-swish], or timm:<name> for any timm model)")

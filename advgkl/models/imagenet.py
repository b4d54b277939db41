"""ImageNet-scale models: any timm architecture (`timm:<name>`) and RobustBench's ConvStem
variants (`convstem-convnext-t|s|b|l`, `convstem-vit-s|b`, Singh, Croce & Hein 2023).

Their state-dict keys equal those of RobustBench's own modules, so zoo weights load strictly:
a normalised model is `Sequential(normalize=ImageNormalizer, model=<timm model>)` as in
RobustBench's `normalize_model`; the ConvStem models replace the timm stem (ConvNeXt) or patch
projection (ViT) by a stack of 3x3 stride-2 convolutions with channels-first LayerNorm and GELU.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"


def import_timm():
    """timm, without the deprecation notices its import raises under this torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import timm
    return timm


class ImageNormalizer(nn.Module):
    """(x - mean) / std per channel, with mean and std as (1, 3, 1, 1) buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def normalized(model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Sequential:
    """`model` behind the normalisation, named as RobustBench names it (normalize, model)."""
    return nn.Sequential(OrderedDict(normalize=ImageNormalizer(mean, std), model=model))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map (biased variance, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(1, keepdim=True)
        scaled = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * scaled + self.bias[:, None, None]


def _conv_stack(widths: list[int], strides: list[int], head: int | None = None) -> nn.Sequential:
    """3x3 convolutions from 3 channels through `widths`, each followed by LayerNorm and GELU,
    then an optional 1x1 convolution to `head` channels."""
    layers: list[nn.Module] = []
    channels = 3
    for width, stride in zip(widths, strides):
        layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1),
                   ChannelLayerNorm(width), nn.GELU()]
        channels = width
    if head is not None:
        layers.append(nn.Conv2d(channels, head, 1))
    return nn.Sequential(*layers)


class ConvStem(nn.Module):
    """The convolutional stem, held as `.stem` (RobustBench's key layout)."""

    def __init__(self, stem: nn.Sequential) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, x: Tensor) -> Tensor:
        return self.stem(x)


def _convnext(size: str, num_classes: int) -> nn.Module:
    timm = import_timm()
    if size == "b":  # RobustBench builds ConvNeXt-B through timm's _create_convnext
        model = timm.models.convnext._create_convnext(
            "convnext_base.fb_in1k", pretrained=False, depths=[3, 3, 27, 3],
            dims=[128, 256, 512, 1024], num_classes=num_classes)
    else:
        name = {"t": "convnext_tiny", "s": "convnext_small", "l": "convnext_large"}[size]
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if size in ("t", "s"):   # two stride-2 convolutions, 48 -> 96 (ConvBlock1)
        model.stem = ConvStem(_conv_stack([48, 96], [2, 2]))
    else:   # base 64 (B) or 96 (L): w, 1.5 w, 2 w with strides 2, 2, 1 (ConvBlock3)
        w = 64 if size == "b" else 96
        model.stem = ConvStem(_conv_stack([w, int(w * 1.5), 2 * w], [2, 2, 1]))
    return model


def _vit(size: str, num_classes: int) -> nn.Module:
    timm = import_timm()
    name = {"s": "deit_small_patch16_224", "b": "vit_base_patch16_224"}[size]
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    width = model.embed_dim   # four stride-2 convolutions 48 -> 384, then 1x1 to the width
    model.patch_embed.proj = ConvStem(_conv_stack([48, 96, 192, 384], [2, 2, 2, 2], width))
    return normalized(model) if size == "s" else model   # only ViT-S is normalised there


class ConvStemModel(NamedTuple):
    display: str                        # RobustBench's architecture text
    robustbench: str                    # its get_convstem_models name (model-zoo constructor)
    build: Callable[[int], nn.Module]   # num_classes -> model


CONVSTEM = {
    "convstem-convnext-t": ConvStemModel("ConvNeXt-T + ConvStem", "convnext_t_cvst",
                                         partial(_convnext, "t")),
    "convstem-convnext-s": ConvStemModel("ConvNeXt-S + ConvStem", "convnext_s_cvst",
                                         partial(_convnext, "s")),
    "convstem-convnext-b": ConvStemModel("ConvNeXt-B + ConvStem", "convnext_b_cvst",
                                         partial(_convnext, "b")),
    "convstem-convnext-l": ConvStemModel("ConvNeXt-L + ConvStem", "convnext_l_cvst",
                                         partial(_convnext, "l")),
    "convstem-vit-s": ConvStemModel("ViT-S + ConvStem", "vit_s_cvst", partial(_vit, "s")),
    "convstem-vit-b": ConvStemModel("ViT-B + ConvStem", "vit_b_cvst", partial(_vit, "b")),
}


def create_timm(name: str, num_classes: int, normalize: bool = True, **kwargs: Any) -> nn.Module:
    """timm's `name` with random weights (nothing is downloaded), ImageNet's mean and std inside
    unless `normalize` is False; `kwargs` go to timm (e.g. img_size, drop_path_rate)."""
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ValueError(f"timm has no model {name!r}" + (f"; e.g. {', '.join(close)}"
                                                           if close else ""))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return normalized(model) if normalize else model


def display_name(arch: str) -> str:
    """RobustBench's architecture text for ImageNet models."""
    if arch in CONVSTEM:
        return CONVSTEM[arch].display
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch

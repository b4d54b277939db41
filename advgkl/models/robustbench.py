"""The RobustBench architecture class each of our registered models corresponds to."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from advgkl.checkpoint import CheckpointError
from advgkl.compat import import_robustbench
from advgkl.models import WRN_PATTERN, dm_normalization
from advgkl.models.imagenet import CONVSTEM, IMAGENET_MEAN, IMAGENET_STD, TIMM_PREFIX, import_timm
from advgkl.models.loading import model_from_checkpoint


def _imagenet_constructor(arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> str | None:
    """RobustBench's ImageNet zoo forms (model_zoo/imagenet.py, where mu and sigma are
    ImageNet's mean and std); None when `arch` is not an ImageNet model."""
    if arch in CONVSTEM or arch.startswith(TIMM_PREFIX):
        if num_classes != 1000:
            raise ValueError(f"{arch} with {num_classes} classes: RobustBench's ImageNet board "
                             "takes 1000-class models")
        if set(kwargs) - {"normalize"}:
            raise ValueError(f"{arch}: timm keyword arguments {sorted(kwargs)} have no place in "
                             "RobustBench's constructor")
    if arch in CONVSTEM:
        return f"get_convstem_models('{CONVSTEM[arch].robustbench}')"
    if arch.startswith(TIMM_PREFIX):
        inner = f"timm.create_model('{arch[len(TIMM_PREFIX):]}', pretrained=False)"
        return f"normalize_model({inner}, mu, sigma)" if kwargs.get("normalize", True) else inner
    return None


def robustbench_constructor(arch: str, num_classes: int,
                            kwargs: Mapping[str, Any] | None = None) -> str:
    """The model-zoo constructor call, as source text (for RobustBench's model_zoo/<dataset>.py)."""
    imagenet = _imagenet_constructor(arch, num_classes, kwargs or {})
    if imagenet is not None:
        return imagenet
    match = WRN_PATTERN.fullmatch(arch)
    if not match:
        raise ValueError(f"{arch}: no RobustBench architecture corresponds to it; use a "
                         "wrn-<depth>-<width>[-swish] model (CIFAR), or a timm: or convstem- "
                         "model (ImageNet) for a submission")
    depth, width = int(match.group(1)), int(match.group(2))
    if match.group(3):
        prefix = "CIFAR100" if num_classes == 100 else "CIFAR10"
        return (f"DMWideResNet(num_classes={num_classes}, depth={depth}, width={width}, "
                f"activation_fn=nn.SiLU, mean={prefix}_MEAN, std={prefix}_STD)")
    return (f"WideResNet(depth={depth}, widen_factor={width}, num_classes={num_classes}, "
            f"sub_block1=False)")


def robustbench_model(arch: str, num_classes: int,
                      kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """RobustBench's own module for `arch` (built by its code), to verify exported weights."""
    source = robustbench_constructor(arch, num_classes, kwargs)
    import_robustbench()
    from robustbench.model_zoo.architectures.convstem_models import get_convstem_models
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    norm = dm_normalization(num_classes)
    prefix = "CIFAR100" if num_classes == 100 else "CIFAR10"
    namespace = {"DMWideResNet": DMWideResNet, "WideResNet": WideResNet, "nn": nn,
                 f"{prefix}_MEAN": norm["mean"], f"{prefix}_STD": norm["std"],
                 "get_convstem_models": get_convstem_models, "normalize_model": normalize_model,
                 "timm": import_timm(), "mu": IMAGENET_MEAN, "sigma": IMAGENET_STD}
    return eval(source, namespace)  # our own constructor text, never user input


def export_for_robustbench(ckpt: Mapping[str, Any], *, weights: str = "model",
                           image_size: int = 32) -> dict[str, Tensor]:
    """The checkpoint's `weights` as a plain state dict, verified by loading it into RobustBench's
    class for the architecture with strict=True and checking that both give the same outputs
    on `image_size` images."""
    import torch

    ours = model_from_checkpoint(ckpt, weights=weights).eval()
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    try:
        theirs = robustbench_model(ckpt["arch"], ckpt["num_classes"],
                                   ckpt.get("arch_kwargs")).eval()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5):
            raise CheckpointError(f"{ckpt['arch']}: RobustBench's class gives other outputs for "
                                  "these weights; the export would not reproduce the model")
    return state

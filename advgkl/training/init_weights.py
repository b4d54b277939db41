"""`model.init`: a run's initial weights from a local file or a RobustBench zoo entry, loaded
strictly into the configured architecture before any run folder exists.

Accepted: an advgkl checkpoint (the weights `advgkl eval` would score), a safetensors file, a
timm / PyTorch state dict (.pth, .pt, .bin; wrappers such as {"state_dict": ...} and `module.`
prefixes are removed), or `robustbench:<dataset>/<threat>/<name>` (RobustBench's own loader, from
MODEL_DIR/<dataset>/<threat>/<name>.pt). A timm file holds the bare network; it is loaded into the
network behind our normalisation. Hubs are not reachable offline: put the file there first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from advgkl.checkpoint import (checkpoint_weights, clean_foreign_state_dict, default_weights,
                               load_checkpoint, load_weights, sha256_file)
from advgkl.errors import UserError, first_line
from advgkl.models.zoo import ZOO_PREFIX, load_zoo_model, parse_zoo


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"model.init: {path} not found (hubs are not reached from here: "
                        "download the weights file and give its path)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"model.init: {path}: not a readable safetensors file "
                            f"({first_line(exc)})") from None
    ckpt = load_checkpoint(path)
    if {"arch", "num_classes", "model"} <= set(ckpt):   # an advgkl checkpoint
        return dict(checkpoint_weights(ckpt, default_weights(ckpt)))
    return clean_foreign_state_dict(ckpt)


def _zoo_state(spec: str, model_dir: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    dataset, threat, name = parse_zoo(spec, key="model.init")
    module, info = load_zoo_model(name, dataset=dataset, threat=threat, model_dir=model_dir)
    return clean_foreign_state_dict(module.state_dict()), info


def _targets(model: nn.Module) -> list[nn.Module]:
    """Where a state dict may fit: the model, or the network behind its normalisation."""
    inner = getattr(model, "model", None)
    return [model] + ([inner] if hasattr(model, "normalize") and isinstance(inner, nn.Module)
                      else [])


def load_state_strictly(model: nn.Module, state: Mapping[str, Tensor], *, what: str) -> None:
    """Load `state` with strict=True into `model` or its inner network, whichever has exactly
    its keys; else one line naming the keys or shapes that differ."""
    for target in _targets(model):
        if set(target.state_dict()) == set(state):
            load_weights(target, state, what=what)
            return
    load_weights(model, state, what=what)   # raises with the missing and unexpected keys


def load_init(model: nn.Module, spec: str, *, arch: str, model_dir: str) -> dict[str, Any]:
    """Load `spec`'s weights into `model` (built as `arch`); returns its source and sha256."""
    if spec.startswith(ZOO_PREFIX):
        state, info = _zoo_state(spec, model_dir)
        source, sha = spec, info["weights_sha256"]
    else:
        path = Path(spec)
        state, source, sha = _read_state(path), str(path.resolve()), sha256_file(path)
    load_state_strictly(model, state, what=f"model.init {spec} (into {arch})")
    return {"source": source, "sha256": sha}

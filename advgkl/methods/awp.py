"""Adversarial weight perturbation (Wu et al. 2020), as the paper's runs use it with TRADES/GKL."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from advgkl.methods.terms import Logits

_EPS = 1e-20

ObjectiveFn = Callable[[Logits], "dict[str, Tensor]"]


class AWP:
    """Perturbs a model's weights towards higher training loss before each training step.

    `perturb(...)` copies the model into a proxy, takes one SGD step on the proxy that ascends the
    objective's "loss", rescales each weight's (>= 2-dim parameters) change to that weight's norm
    and adds `gamma` times it to the model; `restore(diff)` subtracts it again after the optimizer
    step. Active from epoch `warmup_epochs` on (epochs count from 1), when gamma > 0. Under
    torch.distributed the proxy's gradients are averaged over the ranks, so all perturb alike.

    The proxy's step uses `lr`, the run's base learning rate, for the whole run, as the authors'
    proxy optimizer does: the direction does not depend on it in exact arithmetic, but in float32
    a scheduled lr of ~1e-5 (the last epochs of a cosine schedule) makes w + lr * g round back to
    w, and the rescaled change loses its direction.
    """

    def __init__(self, model: nn.Module, *, gamma: float = 0.005, warmup_epochs: int = 10,
                 lr: float = 0.1) -> None:
        if gamma < 0 or warmup_epochs < 0 or lr <= 0:
            raise ValueError("gamma and warmup_epochs must be >= 0, lr > 0")
        self.model, self.gamma, self.warmup_epochs = model, gamma, warmup_epochs
        self.proxy = copy.deepcopy(model)
        self._proxy_sgd = torch.optim.SGD(self.proxy.parameters(), lr=lr)

    def active(self, epoch: int) -> bool:
        return self.gamma > 0 and epoch >= self.warmup_epochs

    def _weights(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in module.named_parameters() if p.dim() >= 2}

    def perturb(self, objective: ObjectiveFn, x_nat: Tensor, x_adv: Tensor, y: Tensor,
                prior_rows: Tensor | None) -> dict[str, Tensor]:
        """Perturb the model in place; returns the per-weight direction to pass to `restore`."""
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        nat = self.proxy(x_nat)
        out = objective(Logits(nat=nat, adv=self.proxy(x_adv), y=y, prior_rows=prior_rows))
        self._proxy_sgd.zero_grad(set_to_none=True)
        (-out["loss"]).backward()
        if dist.is_available() and dist.is_initialized():  # one perturbation for all ranks
            for p in self.proxy.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(dist.get_world_size())
        self._proxy_sgd.step()
        model_weights = self._weights(self.model)
        diff = {}
        with torch.no_grad():
            for name, proxy_w in self._weights(self.proxy).items():
                w = model_weights[name]
                change = proxy_w - w
                diff[name] = change * (w.norm() / (change.norm() + _EPS))
            self._add(diff, self.gamma)
        return diff

    def restore(self, diff: dict[str, Tensor]) -> None:
        """Undo `perturb` (after the optimizer step)."""
        with torch.no_grad():
            self._add(diff, -self.gamma)

    def _add(self, diff: dict[str, Tensor], coeff: float) -> None:
        for name, w in self._weights(self.model).items():
            w.add_(diff[name], alpha=coeff)

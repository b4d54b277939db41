"""Direct, slow implementations of the definitions, for tests and benchmarks only.

They follow the formulas literally (and the paper code's style), so the fast versions in
`advgkl.losses.functional` can be checked and timed against them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_gkl_loss(logits_adv: Tensor, logits_nat: Tensor, prior_rows: Tensor, *,
                      alpha: float = 4.0, beta: float = 20.0, gamma: float = 1.0,
                      temperature: float = 1.0) -> Tensor:
    """(B, C), (B, C), (B, C) -> scalar: DESIGN.md's GKL formula with explicit (B, C, C) tensors."""
    w = prior_rows.detach() ** gamma
    pair_w = w[:, :, None] * w[:, None, :]
    delta_nat = logits_nat[:, :, None] - logits_nat[:, None, :]
    delta_adv = logits_adv[:, :, None] - logits_adv[:, None, :]
    wmse = 0.25 * (pair_w * (delta_nat - delta_adv) ** 2).sum() / pair_w.sum()
    p_nat = torch.softmax(logits_nat.detach() / temperature, dim=1)
    sce = -(p_nat * torch.log_softmax(logits_adv / temperature, dim=1)).sum(1).mean()
    return beta * wmse + alpha * sce

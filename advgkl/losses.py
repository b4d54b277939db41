"""Training objectives: GKL / IKL (decoupled KL), TRADES' KL, PGD-AT's cross-entropy, MART and
LBGAT.

All losses compute in at least float32 (bf16 logits are upcast) and in O(B·C) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("pgd_at", "trades", "ikl", "gkl", "mart", "lbgat")


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_logits(logits_adv: Tensor, logits_nat: Tensor) -> None:
    if logits_adv.dim() != 2:
        raise ValueError(f"logits_adv: expected shape (B, C), got {tuple(logits_adv.shape)}")
    if logits_nat.shape != logits_adv.shape:
        raise ValueError(f"logits_nat: shape {tuple(logits_nat.shape)} differs from logits_adv's "
                         f"{tuple(logits_adv.shape)}")
    if logits_adv.shape[1] < 2:
        raise ValueError(f"logits_adv: needs at least 2 classes, got C = {logits_adv.shape[1]}")


def _check_prior_rows(prior_rows: Tensor, shape: torch.Size) -> None:
    if prior_rows is None or prior_rows.shape != shape:
        got = None if prior_rows is None else tuple(prior_rows.shape)
        raise ValueError(f"prior_rows: expected shape {tuple(shape)} (one prior row per sample), "
                         f"got {got}")
    low, high = torch.aminmax(prior_rows)  # NaN propagates into both
    if not bool((low >= 0) & (high > 0) & (high < float("inf"))):  # one device sync
        raise ValueError("prior_rows: entries must be finite and non-negative, not all zero")


def soft_cross_entropy(logits_adv: Tensor, logits_nat: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, C), (B, C) -> scalar: batch mean of -softmax(nat/T).detach() . log_softmax(adv/T).

    Its gradient w.r.t. logits_adv is that of KL(softmax(nat/T) || softmax(adv/T)).
    """
    target = F.softmax(_upcast(logits_nat.detach()) / temperature, dim=1)
    return -(target * F.log_softmax(_upcast(logits_adv) / temperature, dim=1)).sum(1).mean()


class _GKLTerm(torch.autograd.Function):
    """beta * wMSE + alpha * sCE in O(B·C), with closed-form gradients computed in the forward.

    wMSE = 0.25 sum_b sum_jk w_bj w_bk (d_bj - d_bk)^2 / W with d = nat - adv and
    W = sum_b sum_jk w_bj w_bk = sum_b S0_b^2, S0_b = sum_j w_bj. By the identity
    sum_jk w_j w_k (d_j - d_k)^2 = 2 S0 sum_j w_j (d_j - dbar)^2, dbar = sum_j w_j d_j / S0,
    wMSE = 0.5 sum_b S0_b sum_j w_bj (d_bj - dbar_b)^2 / W and
    d wMSE / d d_bj = S0_b w_bj (d_bj - dbar_b) / W (the dbar term drops out: its weights sum to 0).
    sCE = -mean_b sum_j p_bj log q_bj, p = softmax(nat / T) (constant), q = softmax(adv / T), so
    d sCE / d adv = (q - p) / (T B).
    """

    @staticmethod
    def forward(ctx, logits_adv: Tensor, logits_nat: Tensor, w: Tensor, alpha: float, beta: float,
                temperature: float) -> Tensor:
        adv, nat = _upcast(logits_adv), _upcast(logits_nat)
        batch = adv.shape[0]
        d = nat - adv
        s0 = w.sum(1, keepdim=True)
        total = torch.dot(s0.reshape(-1), s0.reshape(-1))
        centred = d.sub_((w * d).sum(1, keepdim=True) / s0.clamp_min(torch.finfo(w.dtype).tiny))
        grad_nat = w * centred * (s0 * (beta / total))           # beta * d wMSE / d nat
        robust = 0.5 * torch.dot(grad_nat.reshape(-1), centred.reshape(-1))  # beta * wMSE
        if temperature != 1.0:
            adv, nat = adv / temperature, nat / temperature
        log_q = F.log_softmax(adv, dim=1)
        p = F.softmax(nat, dim=1)
        robust = robust - (alpha / batch) * torch.dot(p.reshape(-1), log_q.reshape(-1))
        grad_adv = log_q.exp_().sub_(p).mul_(alpha / (temperature * batch)).sub_(grad_nat)
        ctx.save_for_backward(grad_adv, grad_nat)
        ctx.dtypes = (logits_adv.dtype, logits_nat.dtype)
        return robust

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_adv, grad_nat = ctx.saved_tensors
        return ((grad_out * grad_adv).to(ctx.dtypes[0]), (grad_out * grad_nat).to(ctx.dtypes[1]),
                None, None, None, None)


def gkl_loss(logits_adv: Tensor, logits_nat: Tensor, prior_rows: Tensor, *, alpha: float = 4.0,
             beta: float = 20.0, gamma: float = 1.0, temperature: float = 1.0) -> Tensor:
    """(B, C), (B, C), (B, C) -> scalar: the GKL robust term beta * wMSE + alpha * sCE.

    wMSE: 0.25 * sum_b sum_jk w_bj w_bk ((nat_bj - nat_bk) - (adv_bj - adv_bk))^2 / sum of the
    pair weights, with w = prior_rows ** gamma (each sample's true-class prior row, no gradient);
    gradients reach both logits. sCE: the soft-label cross-entropy of adv against the detached
    clean softmax, both at `temperature`. O(B·C) time and memory, forward and backward.
    """
    _check_logits(logits_adv, logits_nat)
    _check_prior_rows(prior_rows, logits_adv.shape)
    weights = _upcast(prior_rows.detach())
    if gamma != 1.0:
        weights = weights ** gamma
    return _GKLTerm.apply(logits_adv, logits_nat, weights, alpha, beta, temperature)


def ikl_loss(logits_adv: Tensor, logits_nat: Tensor, prior_rows: Tensor, *, alpha: float = 4.0,
             beta: float = 20.0) -> Tensor:
    """(B, C), (B, C), (B, C) -> scalar: IKL (the NeurIPS version), GKL with gamma = 1, T = 1."""
    return gkl_loss(logits_adv, logits_nat, prior_rows, alpha=alpha, beta=beta, gamma=1.0,
                    temperature=1.0)


def trades_kl(logits_adv: Tensor, logits_nat: Tensor) -> Tensor:
    """(B, C), (B, C) -> scalar: batch mean of KL(softmax(nat) || softmax(adv)), gradients into both."""
    _check_logits(logits_adv, logits_nat)
    log_p_nat = F.log_softmax(_upcast(logits_nat), dim=1)
    log_p_adv = F.log_softmax(_upcast(logits_adv), dim=1)
    return (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1).mean()


def cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """(B, C), (B,) -> scalar: mean cross-entropy, optionally against labels smoothed by
    `label_smoothing` (the true class gets 1 - s + s / C, the others s / C)."""
    return F.cross_entropy(_upcast(logits), y, label_smoothing=label_smoothing)


def mart_loss(logits_adv: Tensor, logits_nat: Tensor, y: Tensor, *, beta: float = 6.0,
              label_smoothing: float = 0.0) -> Tensor:
    """(B, C), (B, C), (B,) -> scalar: MART (Wang et al., ICLR 2020), batch mean of
    BCE(p_adv, y) + beta * KL(p_nat || p_adv) * (1 - p_nat[y]), where the boosted CE is
    -log p_adv[y] - log(1 - max_{k != y} p_adv[k]); no gradient is stopped. log(1 - p_k) is
    computed as logsumexp over the classes other than k minus logsumexp over all, so it stays
    finite when p_k is near 1. `label_smoothing` applies to the -log p_adv[y] part."""
    _check_logits(logits_adv, logits_nat)
    adv, nat = _upcast(logits_adv), _upcast(logits_nat)
    runner_up = adv.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
    without_runner_up = adv.scatter(1, runner_up[:, None], float("-inf"))
    log_not_runner_up = torch.logsumexp(without_runner_up, 1) - torch.logsumexp(adv, 1)
    boosted_ce = cross_entropy(adv, y, label_smoothing) - log_not_runner_up.mean()
    log_p_nat = F.log_softmax(nat, dim=1)
    kl = (log_p_nat.exp() * (log_p_nat - F.log_softmax(adv, dim=1))).sum(1)
    weight = 1 - log_p_nat.gather(1, y[:, None]).squeeze(1).exp()
    return boosted_ce + beta * (kl * weight).mean()


def lbgat_guidance(logits_adv: Tensor, logits_nat: Tensor, logits_guide: Tensor, *,
                   beta: float = 6.0) -> Tensor:
    """(B, C) x 3 -> scalar: LBGAT's robust terms (Cui et al., ICCV 2021): the mean squared
    difference between the robust model's adversarial logits and the natural model's clean
    logits (`logits_guide`, which it trains too), plus beta * TRADES' KL(robust clean || robust
    adversarial); gradients reach all three."""
    _check_logits(logits_adv, logits_guide)
    mse = F.mse_loss(_upcast(logits_adv), _upcast(logits_guide))
    return mse + beta * trades_kl(logits_adv, logits_nat)


@dataclass(frozen=True)
class Objective:
    """The training objective of `method`; call it to get {"loss", "ce", "robust"}.

    pgd_at: loss = CE(adv); mart: loss = MART's (both with ce = clean CE, logged only);
    trades: CE(nat) + beta * KL; ikl / gkl: CE(nat) + the robust term; lbgat: CE of the natural
    model's clean logits (`logits_guide`) + its guidance terms. `label_smoothing` applies to the
    cross-entropy against the labels that each method trains on. The trainer backpropagates
    "loss" and logs the rest.
    """

    method: str = "gkl"
    alpha: float = 4.0
    beta: float = 20.0
    gamma: float = 1.0
    temperature: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")

    @property
    def needs_prior(self) -> bool:
        return self.method in ("ikl", "gkl")

    @property
    def needs_guide(self) -> bool:
        """LBGAT: the objective takes a second (natural) model's clean logits."""
        return self.method == "lbgat"

    def robust_term(self, logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
                    prior_rows: Tensor | None, logits_guide: Tensor | None = None) -> Tensor:
        if self.method == "pgd_at":
            return cross_entropy(logits_adv, y, self.label_smoothing)
        if self.method == "mart":
            return mart_loss(logits_adv, logits_nat, y, beta=self.beta,
                             label_smoothing=self.label_smoothing)
        if self.method == "lbgat":
            if logits_guide is None:
                raise ValueError("logits_guide: method lbgat needs the natural model's logits")
            return lbgat_guidance(logits_adv, logits_nat, logits_guide, beta=self.beta)
        if self.method == "trades":
            return self.beta * trades_kl(logits_adv, logits_nat)
        if self.method == "ikl":
            return ikl_loss(logits_adv, logits_nat, prior_rows, alpha=self.alpha, beta=self.beta)
        return gkl_loss(logits_adv, logits_nat, prior_rows, alpha=self.alpha, beta=self.beta,
                        gamma=self.gamma, temperature=self.temperature)

    def __call__(self, logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
                 prior_rows: Tensor | None = None,
                 logits_guide: Tensor | None = None) -> dict[str, Tensor]:
        _check_logits(logits_adv, logits_nat)
        robust = self.robust_term(logits_nat, logits_adv, y, prior_rows, logits_guide)
        if self.method in ("pgd_at", "mart"):
            ce = cross_entropy(logits_nat.detach(), y)
            return {"loss": robust, "ce": ce, "robust": robust}
        clean = logits_guide if self.method == "lbgat" else logits_nat
        ce = cross_entropy(clean, y, self.label_smoothing)
        return {"loss": ce + robust, "ce": ce, "robust": robust}


def build_objective(method: str, *, alpha: float = 4.0, beta: float = 20.0, gamma: float = 1.0,
                    temperature: float = 1.0, label_smoothing: float = 0.0) -> Objective:
    """The objective callable `(logits_nat, logits_adv, y, prior_rows, logits_guide=None) ->
    dict(loss, ce, robust)`."""
    return Objective(method=method, alpha=alpha, beta=beta, gamma=gamma, temperature=temperature,
                     label_smoothing=label_smoothing)


def combine_views(basic: dict[str, Tensor], augmented: dict[str, Tensor],
                  aug_weight: float) -> dict[str, Tensor]:
    """One objective dict for a batch of two equal-sized views (basic, augmented), as in the
    paper's AutoAugment runs: the clean terms averaged over both views (CE over the whole batch),
    robust = robust(basic) + aug_weight * robust(augmented)."""
    robust = basic["robust"] + aug_weight * augmented["robust"]
    clean_part = ((basic["loss"] - basic["robust"]) + (augmented["loss"] - augmented["robust"])) / 2
    return {"loss": clean_part + robust, "ce": (basic["ce"] + augmented["ce"]) / 2,
            "robust": robust}

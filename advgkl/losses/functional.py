"""The losses as pure functions: GKL / IKL (decoupled KL), TRADES' KL, PGD-AT's cross-entropy, MART,
LBGAT, and the distillation divergences of ARD, RSLAD and AdaAD (GKL-KD is `gkl_loss` with the
teacher's logits in the clean slot). `advgkl.methods.objectives` assembles them per method.

All losses compute in at least float32 (bf16 logits are upcast) and in O(B·C) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


MART_FORMS = ("authors", "exact")


def mart_loss(logits_adv: Tensor, logits_nat: Tensor, y: Tensor, *, beta: float = 6.0,
              label_smoothing: float = 0.0, form: str = "authors") -> Tensor:
    """(B, C), (B, C), (B,) -> scalar: MART (Wang et al., ICLR 2020), batch mean of
    BCE(p_adv, y) + beta * KL(p_nat || p_adv) * (1 - p_nat[y]), where the boosted CE is
    -log p_adv[y] - log(1 - p_adv[k]) for k the most likely class other than y; no gradient is
    stopped. form "authors" computes their code's expression: log(1.0001 - p_adv[k] + 1e-12),
    log(p_adv + 1e-12) inside the KL, weight 1.0000001 - p_nat[y], k from argsort of p_adv.
    form "exact" computes log(1 - p_k) as logsumexp over the classes other than k minus
    logsumexp over all (finite when p_k is near 1), the KL from log-softmax, weight 1 - p_nat[y].
    `label_smoothing` applies to the -log p_adv[y] part."""
    _check_logits(logits_adv, logits_nat)
    if form not in MART_FORMS:
        raise ValueError(f"form: {form!r} is not one of {', '.join(MART_FORMS)}")
    adv, nat = _upcast(logits_adv), _upcast(logits_nat)
    if form == "exact":
        runner_up = adv.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
        without_runner_up = adv.scatter(1, runner_up[:, None], float("-inf"))
        log_not_runner_up = torch.logsumexp(without_runner_up, 1) - torch.logsumexp(adv, 1)
        log_p_nat = F.log_softmax(nat, dim=1)
        kl = (log_p_nat.exp() * (log_p_nat - F.log_softmax(adv, dim=1))).sum(1)
        weight = 1 - log_p_nat.gather(1, y[:, None]).squeeze(1).exp()
        ce = cross_entropy(adv, y, label_smoothing)
        return ce - log_not_runner_up.mean() + beta * (kl * weight).mean()
    # Their operations in their order: float32 gradients then match theirs bit for bit.
    p_adv = F.softmax(adv, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = cross_entropy(adv, y, label_smoothing) + F.nll_loss(
        torch.log(1.0001 - p_adv + 1e-12), runner_up)
    p_nat = F.softmax(nat, dim=1)
    weight = 1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
    return boosted + float(beta) * ((1.0 / len(y)) * (kl * weight).sum())


def lbgat_guidance(logits_adv: Tensor, logits_nat: Tensor, logits_guide: Tensor, *,
                   beta: float = 6.0) -> Tensor:
    """(B, C) x 3 -> scalar: LBGAT's robust terms (Cui et al., ICCV 2021): the mean squared
    difference between the robust model's adversarial logits and the natural model's clean
    logits (`logits_guide`, which it trains too), plus beta * TRADES' KL(robust clean || robust
    adversarial); gradients reach all three."""
    _check_logits(logits_adv, logits_guide)
    mse = F.mse_loss(_upcast(logits_adv), _upcast(logits_guide))
    return mse + beta * trades_kl(logits_adv, logits_nat)


def kl_divergence(student: Tensor, teacher: Tensor, *, temperature: float = 1.0,
                  reduction: str = "elements") -> Tensor:
    """(B, C), (B, C) -> scalar: KL(softmax(teacher / T) || softmax(student / T)) as PyTorch's
    KLDivLoss computes it from log_softmax(student / T) (ARD's and AdaAD's form), summed over the
    classes and samples, then divided by B * C ("elements", KLDivLoss's default 'mean') or
    multiplied by 1 / B ("batch", AdaAD's CIFAR-100 form); the teacher is a constant."""
    _check_logits(student, teacher)
    log_q = F.log_softmax(_upcast(student) / temperature, dim=1)
    p = F.softmax(_upcast(teacher.detach()) / temperature, dim=1)
    if reduction == "batch":
        return (1 / len(student)) * F.kl_div(log_q, p, reduction="sum")
    return F.kl_div(log_q, p, reduction="none").mean()  # 'mean' itself, without its warning


def rslad_kl(student: Tensor, teacher: Tensor, *, cifar100: bool = False) -> Tensor:
    """(B, C), (B, C) -> scalar: RSLAD's KL term as its code writes it, the mean over all B * C
    entries of p (log(p + 1e-5) - log q), p = softmax(teacher) a constant, log q the student's
    log_softmax; its CIFAR-100 script takes log q = log(softmax(student)) and multiplies by 10."""
    _check_logits(student, teacher)
    s = _upcast(student)
    p = F.softmax(_upcast(teacher.detach()), dim=1)
    log_q = torch.log(F.softmax(s, dim=1)) if cifar100 else F.log_softmax(s, dim=1)
    mean = torch.mean(-log_q * p + torch.log(p + 1e-5) * p)
    return 10 * mean if cifar100 else mean


def combine_views(basic: dict[str, Tensor], augmented: dict[str, Tensor],
                  aug_weight: float) -> dict[str, Tensor]:
    """One objective dict for a batch of two equal-sized views (basic, augmented), as in the
    paper's AutoAugment runs: the clean terms averaged over both views (CE over the whole batch),
    robust = robust(basic) + aug_weight * robust(augmented)."""
    robust = basic["robust"] + aug_weight * augmented["robust"]
    clean_part = ((basic["loss"] - basic["robust"]) + (augmented["loss"] - augmented["robust"])) / 2
    return {"loss": clean_part + robust, "ce": (basic["ce"] + augmented["ce"]) / 2,
            "robust": robust}

"""The losses as pure functions, shared by the attacks (inner maximization) and the methods'
objectives (outer minimization): GKL / IKL in O(B·C), TRADES' KL, cross-entropy, MART, LBGAT and
the distillation divergences. `advgkl.methods` assembles them into each method's objective."""

from advgkl.losses.functional import (MART_FORMS, combine_views, cross_entropy, gkl_loss, ikl_loss,
                                      kl_divergence, lbgat_guidance, mart_loss, rslad_kl,
                                      soft_cross_entropy, trades_kl)

__all__ = ["MART_FORMS", "combine_views", "cross_entropy", "gkl_loss", "ikl_loss", "kl_divergence",
           "lbgat_guidance", "mart_loss", "rslad_kl", "soft_cross_entropy", "trades_kl"]

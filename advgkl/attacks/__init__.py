"""The training attacks (inner maximization), each a callable `attack(model, x, y, ...) -> x_adv`
that runs the model in its method's mode and restores it, takes gradients w.r.t. the input only
and keeps x_adv in [0, 1] and in the eps ball: PGD under Linf / L2 with each method's objective
and its per-epoch schedules (`pgd`), the single-step attacks and GradAlign's regularizer
(`single_step`), and the ImageNet recipes' APGD and ARES PGD (`recipes`)."""

from advgkl.attacks.pgd import SCHEDULES, PGDAttack, attack_schedule
from advgkl.attacks.recipes import APGDTrain, AresPGD
from advgkl.attacks.single_step import SingleStepAttack, build_single_step, gradient_alignment

__all__ = ["APGDTrain", "AresPGD", "PGDAttack", "SCHEDULES", "SingleStepAttack", "attack_schedule",
           "build_single_step", "gradient_alignment"]

"""The training methods: each method's objective (`objectives`: the adversarial-training terms;
`distill`: the distillation terms; both on the `Logits` of `terms`), the class prior GKL/IKL
keep (`priors`), adversarial weight perturbation (`awp`) and a distillation run's frozen teacher
(`teacher`). What travels with a method besides its terms (its settings with their published
values, its attack objective and start, its model modes) is registered in `advgkl.config.methods`
(`METHODS`), re-exported here."""

from advgkl.config.methods import DISTILLATION, METHOD_NAMES, METHODS, describe
from advgkl.methods.awp import AWP
from advgkl.methods.objectives import Objective, build_objective, two_view_terms
from advgkl.methods.priors import ClassPrior
from advgkl.methods.teacher import FrozenTeacher, Teacher, load_teacher
from advgkl.methods.terms import Logits

__all__ = ["AWP", "ClassPrior", "DISTILLATION", "FrozenTeacher", "Logits", "METHODS",
           "METHOD_NAMES", "Objective", "Teacher", "build_objective", "describe", "load_teacher",
           "two_view_terms"]

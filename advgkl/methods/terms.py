"""What a training step hands a method's objective (`Logits`), and the shape of a method's terms
function: (the objective's settings and data set, the logits) -> {"loss", "ce", "robust", ...}.
The adversarial-training terms (`advgkl.methods.objectives`) and the distillation ones
(`advgkl.methods.distill`) both take it, so neither imports the other's module."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Protocol

from torch import Tensor


@dataclass
class Logits:
    """What one training step hands its objective, each (B, C) but y (B,)."""

    nat: Tensor                        # the trained model on the clean batch
    adv: Tensor                        # ... on the adversarial batch
    y: Tensor
    prior_rows: Tensor | None = None   # the class prior's row of each label
    guide: Tensor | None = None        # LBGAT: the natural model on the clean batch
    teacher_nat: Tensor | None = None  # distillation: the teacher on the clean batch
    teacher_adv: Tensor | None = None  # AdaAD: the teacher on the adversarial batch
    input_reg: Tensor | None = None    # GradAlign: 1 - mean cos of the two input gradients
    epoch: int = 1

    def part(self, rows: slice) -> "Logits":
        """The same step restricted to the samples `rows` (one view of a two-view batch)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


class Setup(Protocol):
    """What a terms function reads of its objective: the method's settings and the data set."""

    settings: Any
    dataset: str


Terms = Callable[[Setup, Logits], "dict[str, Tensor]"]

"""Training: the plain loop read top to bottom (`loop.train`), what a run is built from its config
(`build`: device, model, each epoch's attack), one step (`step.TrainStep`), checkpoint state and
resume (`state`), the catastrophic-overfitting guard (`co_guard`), the weight EMA and the epoch
average (`ema`), learning-rate schedules (`schedules`), initial weights (`init_weights`) and the
offline epoch average of saved epochs (`average`)."""

from advgkl.training.average import average_run
from advgkl.training.build import build_attack
from advgkl.training.co_guard import COGuard
from advgkl.training.ema import EpochAverage, WeightEMA
from advgkl.training.init_weights import load_init
from advgkl.training.loop import train
from advgkl.training.step import TrainStep

__all__ = ["COGuard", "EpochAverage", "TrainStep", "WeightEMA", "average_run", "build_attack",
           "load_init", "train"]

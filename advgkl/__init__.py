"""advgkl: adversarial training with the GKL/IKL loss and RobustBench-grade evaluation."""

__version__ = "0.1.0"

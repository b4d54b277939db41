"""Evaluation: standard AutoAttack through pyautoattack, resumable and sharded (`autoattack`),
the NON-STANDARD quick PGD / CW checks (`quick`), the `advgkl eval` job (`job`) and what its
records say of the checkpoint (`subject`), the sanity battery (`sanity`), speed options
(`speed`), RobustBench's Linf / L2 board: model_info and the detailed record (`leaderboard`),
its common-corruptions boards (`corruptions`, `corruption_job`, `corruption_records`), and the
submission bundle of either (`export`)."""

from advgkl.evaluation.autoattack import EvalResult, evaluate_autoattack, merge_results
from advgkl.evaluation.export import export_submission
from advgkl.evaluation.job import EvalJob, run_eval_job
from advgkl.evaluation.leaderboard import model_info
from advgkl.evaluation.quick import correct_under, evaluate_pgd

__all__ = ["EvalJob", "EvalResult", "correct_under", "evaluate_autoattack", "evaluate_pgd",
           "export_submission", "merge_results", "model_info", "run_eval_job"]

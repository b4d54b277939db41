"""Evaluation: standard AutoAttack through pyautoattack, resumable and sharded (`autoattack`),
the NON-STANDARD quick PGD / CW checks (`quick`), the `advgkl eval` job (`job`) and what its
records say of the checkpoint (`subject`), the sanity battery (`sanity`), speed options
(`speed`), and RobustBench's Linf / L2 board: model_info, the detailed record and the submission
bundle (`leaderboard`)."""

from advgkl.evaluation.autoattack import EvalResult, evaluate_autoattack, merge_results
from advgkl.evaluation.job import EvalJob, run_eval_job
from advgkl.evaluation.leaderboard import export_submission, model_info
from advgkl.evaluation.quick import correct_under, evaluate_pgd

__all__ = ["EvalJob", "EvalResult", "correct_under", "evaluate_autoattack", "evaluate_pgd",
           "export_submission", "merge_results", "model_info", "run_eval_job"]

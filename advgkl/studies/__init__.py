"""Studies: rows x seeds of ordinary runs at one budget, trained and evaluated in parallel or
by a scheduler (`study`), then one table and plots (`report`)."""

from advgkl.studies.report import write_report
from advgkl.studies.study import Study, load_study, run_study

__all__ = ["Study", "load_study", "run_study", "write_report"]

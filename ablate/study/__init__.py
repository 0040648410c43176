"""Optuna hyperparameter studies over the harness's runs (``ablate study``).

The same job function is the objective, the same database is the storage (Optuna's tables next
to ours; ``optuna-dashboard <URL>`` reads it as is), and every trial is an ordinary run that
``ablate table --study NAME`` shows.

``config``  the study file: base, search space, objectives, sampler, pruner, budget; validation
``runner``  storage, the trial objective (pruning included), workers, the driver
``show``    best trial or Pareto front, importances, every trial, plots
"""
from .config import OBJECTIVE_METRICS, StudyConfig, StudyError, StudyFile, load_study_file
from .runner import StudyReport, run_study, storage_for
from .show import show

__all__ = ["OBJECTIVE_METRICS", "StudyConfig", "StudyError", "StudyFile", "StudyReport", "load_study_file",
           "run_study", "show", "storage_for"]

"""Training runs for the chapters: a step-based trainer, and a resumable runner for sweeps over methods and seeds.

* :mod:`~gradreg.experiments.training`: :func:`train_classifier`, :func:`compare_methods`, :func:`evaluate`,
  :class:`History` (mini-batch training for a fixed number of steps, in memory);
* :mod:`~gradreg.experiments.config`: :class:`RunConfig` (one run; the paper's recipe as defaults) and
  :func:`grid` (a sweep);
* :mod:`~gradreg.experiments.runner`: :func:`run` and :func:`sweep` (results on disk, checkpoints every
  epoch, exact resume, finished runs reused);
* :mod:`~gradreg.experiments.summary`: mean ± standard error over seeds, paired differences with t-intervals;
* :mod:`~gradreg.experiments.presets`: the sweeps of Chapter 5;
* ``python -m gradreg.experiments``: the same from a shell (``--help``).
"""

from gradreg.experiments.config import ALGORITHMS, HYPERPARAMETERS, RunConfig, grid
from gradreg.experiments.presets import PRESETS, preset
from gradreg.experiments.runner import RunRecord, build_model, build_optimizer, load_results, run, sweep, train_step
from gradreg.experiments.summary import PairedDifference, Row, best, format_table, paired_difference, summarize
from gradreg.experiments.training import History, compare_methods, evaluate, train_classifier

# The full-batch trainer (gradreg/experiments/full_batch.py, added by another branch) is exported here by the
# lead at merge time.

__all__ = [
    "ALGORITHMS", "HYPERPARAMETERS", "PRESETS", "History", "PairedDifference", "Row", "RunConfig", "RunRecord",
    "best", "build_model", "build_optimizer", "compare_methods", "evaluate", "format_table", "grid",
    "load_results", "paired_difference", "preset", "run", "summarize", "sweep", "train_classifier", "train_step",
]

"""Training runs for the chapters: a step-based trainer, and a resumable runner for sweeps over methods and seeds.

* ``training``: :func:`train_classifier`, :func:`compare_methods`, :func:`evaluate`, :class:`History`
  (mini-batch training for a fixed number of steps, in memory; Chapter 1);
* ``config``: :class:`RunConfig` (one run, the paper's recipe as defaults) and :func:`grid` (a sweep);
* ``runner``: :func:`run` and :func:`sweep`. A results folder holds one ``<run_id>.json`` per finished run (its
  config, seed, gradreg's version, the metrics of every epoch and the final ‖∇L‖ and sharpness) and, while a run
  is under way, its checkpoint ``<run_id>.ckpt.pt``, written at the end of every epoch. A finished run is read
  back, not retrained; an interrupted one resumes from its checkpoint, which holds the model, the optimizer
  (momentum buffers, GR's settings), the learning-rate schedule and every random-number state (torch, CUDA,
  numpy, Python, the generator of the data order and augmentation): on a CPU the resumed run is bit for bit the
  uninterrupted one. Files are written atomically and verified when read (a bad one raises
  :class:`StoredFileError`, naming it; ``run(..., retrain_corrupt=True)`` deletes and retrains it); a process
  training a run holds ``<run_id>.claim``, so several processes can share one results folder
  (``sweep(..., jobs=N)``, ``run --jobs N``);
* ``summary``: :func:`summarize` (mean ± standard error over seeds), :func:`best`, :func:`paired_difference`
  (differences paired by seed, Student's t-interval);
* ``presets``: :func:`preset`, the sweeps of Chapter 5 by name;
* ``python -m gradreg.experiments``: all of this from a shell (``python -m gradreg.experiments run --help``).
"""

from gradreg.experiments.config import ALGORITHMS, HYPERPARAMETERS, RunConfig, grid
from gradreg.experiments.full_batch import FullBatchHistory, Measurer, at_loss, full_batch_run
from gradreg.experiments.presets import PRESETS, preset
from gradreg.experiments.runner import RunRecord, build_model, build_optimizer, load_results, run, sweep, train_step
from gradreg.experiments.storage import StoredFileError
from gradreg.experiments.summary import (
    PairedDifference,
    Row,
    best,
    format_table,
    group,
    mean_se,
    paired_difference,
    summarize,
)
from gradreg.experiments.training import History, compare_methods, evaluate, train_classifier

__all__ = [
    "ALGORITHMS", "HYPERPARAMETERS", "PRESETS", "FullBatchHistory", "History", "Measurer", "PairedDifference", "Row",
    "RunConfig", "RunRecord", "StoredFileError", "at_loss", "best", "build_model", "build_optimizer",
    "compare_methods", "evaluate", "format_table", "full_batch_run", "grid", "group",
    "load_results", "mean_se", "paired_difference", "preset", "run", "summarize", "sweep", "train_classifier",
    "train_step",
]

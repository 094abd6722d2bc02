"""Re-execute chapter notebooks in place, at the fast (CI) size, so their committed outputs are current.

    .venv/bin/python scripts/execute_notebooks.py chapters/01_*.ipynb

Strict nbval then checks in CI that a fresh run reproduces these outputs. Timestamps are not recorded, so
re-running an unchanged chapter gives a clean git diff.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, timeout: int = 900) -> float:
    os.environ["GRADREG_FULL"] = "0"  # committed outputs are always the fast size
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        seconds = execute(Path(arg))
        print(f"{arg}: executed in {seconds:.1f} s")

"""pytest configuration shared by the unit tests and the chapters (nbval).

Chapter kernels started by nbval inherit this environment: ``GRADREG_CHECK_FIGURES=1`` makes ``gr.setup()`` fail
a cell whose figure has an axis without a label (see :func:`gradreg.runtime.unlabelled_axes`).
"""

import os

os.environ.setdefault("GRADREG_CHECK_FIGURES", "1")


def pytest_addoption(parser):
    """Without nbval (an sdist's tests, a minimal environment) pyproject's addopts still parse: its options are
    registered here as inert, and the chapters are not collected (the unit tests do not need them)."""
    import importlib.util

    if importlib.util.find_spec("nbval") is None or "no:nbval" in os.environ.get("PYTEST_ADDOPTS", ""):
        group = parser.getgroup("nbval (not installed)")
        group.addoption("--nbval", action="store_true", help="inert: nbval is not installed")
        group.addoption("--nbval-current-env", action="store_true", help="inert: nbval is not installed")
        group.addoption("--nbval-sanitize-with", help="inert: nbval is not installed")

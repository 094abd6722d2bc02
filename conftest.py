"""pytest configuration shared by the unit tests and the chapters (nbval).

Chapter kernels started by nbval inherit this environment: ``GRADREG_CHECK_FIGURES=1`` makes ``gr.setup()`` fail
a cell whose figure has an axis without a label (see :func:`gradreg.runtime.unlabelled_axes`).
"""

import os

os.environ.setdefault("GRADREG_CHECK_FIGURES", "1")

"""``python -m gradreg.bench``: see :mod:`gradreg.bench`."""

from gradreg.bench import main

main()

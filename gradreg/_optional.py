"""Optional dependencies: import them where they are needed, with a message that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

REPOSITORY = "https://github.com/gradreg/gradreg.git"

#: The packages each extra of pyproject.toml installs (what the error message tells a user to install).
EXTRAS = {
    "book": "scipy matplotlib tqdm mnist1d requests",
    "lightning": "lightning",
    "huggingface": "transformers accelerate",
}


def install_hint(extra: str) -> str:
    """How to install ``extra``: its packages from PyPI, or the extra from the repository (gradreg is not on PyPI)."""
    from gradreg import __version__

    return (f"pip install {EXTRAS[extra]}  (or the extra: pip install \"gradreg[{extra}] @ "
            f"git+{REPOSITORY}@v{__version__}\")")


def require(name: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``name``, or raise ImportError saying that ``purpose`` needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the optional package {name.split('.')[0]!r}, which is not installed: "
            f"{install_hint(extra)}"
        ) from exc

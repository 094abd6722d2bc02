"""Optional dependencies: import them where they are needed, with a message that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(name: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``name``, or raise ImportError saying that ``purpose`` needs ``pip install 'gradreg[extra]'``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the optional package {name.split('.')[0]!r}, which is not installed: "
            f"pip install 'gradreg[{extra}]'"
        ) from exc

"""Importing an optional dependency with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module`` or raise ``ImportError`` telling the user to ``pip install lightning_techniques[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature} needs the optional dependency {module!r}: pip install 'lightning_techniques[{extra}]' ({err})"
        ) from err

"""Module-level ``__getattr__`` (PEP 562) that imports a package's names from their submodules on first
use, so that importing the package stays light (no torch until a name that needs it is used)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """``__getattr__`` for ``package``: ``names`` maps a public name to the submodule (relative to
    ``package``) that defines it; a name found once is kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__

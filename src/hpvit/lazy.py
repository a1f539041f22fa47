"""Names of a package loaded from their modules on first use (PEP 562), so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, names: "dict[str, str]", namespace: "dict[str, Any]") -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps each public name to the (relative) module that
    defines it; a loaded name is stored in ``namespace`` (the package's globals), so it loads once."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        namespace[name] = value
        return value

    return __getattr__

"""Public names of a package that import on first use (PEP 562), so that importing the package
stays cheap: ``import ablate`` never pays for pydantic's models, ``ablate.db`` for SQLAlchemy's
ORM, ``ablate.report`` for pandas. A leaf module."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public ``names`` ({name: submodule})
    import from their submodule when first looked up (later lookups find them set)."""
    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__

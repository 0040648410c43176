"""ablate: an experiment-grid ablation harness for text-to-image generation with Mamba backbones.

A grid file becomes jobs, each job becomes rows in a database, and the database becomes the table.

The public names below import on first use (PEP 562): ``import ablate`` stays cheap, so a command
that only reads the database (``ablate table``) never pays for pydantic's models or YAML.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .compat import bare_torch_fidelity  # noqa: E402

bare_torch_fidelity()

# public name -> the submodule that defines it
_LAZY = {"ConfigError": "config", "RunSpec": "config", "run_key": "config", "Grid": "grid",
         "GridError": "grid", "load_grid": "grid", "VariantContext": "registry", "load_registry": "registry"}

__all__ = ["__version__", "ConfigError", "RunSpec", "run_key", "Grid", "GridError", "load_grid",
           "VariantContext", "load_registry"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ablate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""ablate: an experiment-grid ablation harness for text-to-image generation with Mamba backbones.

A grid file becomes jobs, each job becomes rows in a database, and the database becomes the table.

The public names below import on first use (PEP 562): ``import ablate`` stays cheap, so a command
that only reads the database (``ablate table``) never pays for pydantic's models or YAML.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .compat import bare_torch_fidelity  # noqa: E402
from .lazy import lazy_names  # noqa: E402

bare_torch_fidelity()

# public name -> the submodule that defines it
_LAZY = {"ConfigError": "config", "RunSpec": "config", "run_key": "config", "Grid": "grid",
         "GridError": "grid", "load_grid": "grid", "VariantContext": "registry", "load_registry": "registry"}

__all__ = ["__version__", "ConfigError", "RunSpec", "run_key", "Grid", "GridError", "load_grid",
           "VariantContext", "load_registry"]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

"""ablate: an experiment-grid ablation harness for text-to-image generation with Mamba backbones.

A grid file becomes jobs, each job becomes rows in a database, and the database becomes the table.
"""
__version__ = "0.1.0"

from .compat import bare_torch_fidelity  # noqa: E402

bare_torch_fidelity()

from .config import ConfigError, RunSpec, run_key  # noqa: E402
from .grid import Grid, GridError, load_grid  # noqa: E402
from .registry import VariantContext, load_registry  # noqa: E402

__all__ = ["__version__", "ConfigError", "RunSpec", "run_key", "Grid", "GridError", "load_grid",
           "VariantContext", "load_registry"]

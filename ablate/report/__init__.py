"""Tables (and later plots) regenerated from the results database alone."""
from .table import METRIC_COLUMNS, build_table, load_runs, render, write_results

__all__ = ["METRIC_COLUMNS", "build_table", "load_runs", "render", "write_results"]

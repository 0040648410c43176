"""Tables and plots regenerated from the results database alone (pandas via ablate.results).

Plots live in :mod:`ablate.report.plots` (imported on demand: matplotlib is not needed for a table).
"""
from .table import (FORMATS, METRIC_COLUMNS, build_table, display_table, load_runs, metric_column, render,
                    summarize, write_results)

__all__ = ["FORMATS", "METRIC_COLUMNS", "build_table", "display_table", "load_runs", "metric_column", "render",
           "summarize", "write_results"]

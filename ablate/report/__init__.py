"""Tables and plots regenerated from the results database alone (pandas via ablate.results).

:mod:`ablate.report.table` builds the numeric table, :mod:`ablate.report.render` turns it into
text. Plots live in :mod:`ablate.report.plots` (imported on demand: matplotlib is not needed for
a table). :func:`write_report` (:mod:`ablate.report.site`) writes the HTML report, one folder that
opens offline; :mod:`ablate.report.browser` drives headless Chromium for its tests and
benchmark. Note that ``ablate.report.render`` is the function; the module is
``sys.modules["ablate.report.render"]`` (``from ablate.report.render import ...`` works).
"""
from .table import FORMATS, METRIC_COLUMNS, build_table, load_runs, metric_column, summarize
from .render import display_table, render, write_results

__all__ = ["FORMATS", "METRIC_COLUMNS", "build_table", "display_table", "load_runs", "metric_column", "render",
           "summarize", "write_report", "write_results"]


def __getattr__(name: str):
    if name == "write_report":  # the HTML report's modules load only when a report is written
        from .site import write_report

        return write_report
    raise AttributeError(f"module 'ablate.report' has no attribute {name!r}")

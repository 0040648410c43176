"""Tables and plots regenerated from the results database alone.

:mod:`ablate.report.summary` computes the numeric table in plain Python (``ablate table`` needs
neither pandas nor numpy); :mod:`ablate.report.table` gives it as a pandas frame, and
:mod:`ablate.report.render` turns either into text. Plots live in :mod:`ablate.report.plots`
(imported on demand: matplotlib is not needed for a table). :func:`write_report`
(:mod:`ablate.report.site`) writes the HTML report, one folder that opens offline;
:mod:`ablate.report.browser` drives headless Chromium for its tests and benchmark. The pandas
names (``build_table``, ``summarize``, ``load_runs``) and ``write_report`` import on first use
(PEP 562). Note that ``ablate.report.render`` is the function; the module is
``sys.modules["ablate.report.render"]`` (``from ablate.report.render import ...`` works).
"""
from ..lazy import lazy_names
from .summary import FORMATS, METRIC_COLUMNS, metric_column
from .render import display_table, render, write_results

__all__ = ["FORMATS", "METRIC_COLUMNS", "build_table", "display_table", "load_runs", "metric_column", "render",
           "summarize", "write_report", "write_results"]

# pandas (the frames), the HTML report's modules: loaded when first used
__getattr__, __dir__ = lazy_names(__name__, {"build_table": "table", "summarize": "table", "load_runs": "table",
                                             "write_report": "site"})

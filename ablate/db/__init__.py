"""Results database: SQLAlchemy models and the harness's transactions.

The names import on first use (PEP 562): :mod:`ablate.db.read`, which reads a SQLite file
through the standard library alone, and :mod:`ablate.db.engine` do not pull in SQLAlchemy's ORM.
"""
from __future__ import annotations

from ..lazy import lazy_names

# public name -> the submodule that defines it
_LAZY = {**dict.fromkeys(["STATUSES", "Artifact", "Base", "BenchResult", "GridRun", "Metric", "Run", "StudyRun"],
                         "models"),
         **dict.fromkeys(["Database", "open_db"], "store"),
         **dict.fromkeys(["DBError", "resolve_url", "safe_url"], "engine")}

__all__ = ["STATUSES", "Artifact", "Base", "BenchResult", "GridRun", "Metric", "Run", "StudyRun", "DBError", "Database",
           "open_db", "resolve_url", "safe_url"]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

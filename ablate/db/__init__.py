"""Results database: SQLAlchemy models and the harness's transactions."""
from .models import STATUSES, Artifact, Base, BenchResult, GridRun, Metric, Run
from .store import DBError, Database, open_db, resolve_url, safe_url

__all__ = ["STATUSES", "Artifact", "Base", "BenchResult", "GridRun", "Metric", "Run", "DBError", "Database",
           "open_db", "resolve_url", "safe_url"]

"""Results database: SQLAlchemy models and the harness's transactions."""
from .models import STATUSES, Artifact, Base, BenchResult, GridRun, Metric, Run, StudyRun
from .store import DBError, Database, open_db, resolve_url, safe_url

__all__ = ["STATUSES", "Artifact", "Base", "BenchResult", "GridRun", "Metric", "Run", "StudyRun", "DBError", "Database",
           "open_db", "resolve_url", "safe_url"]

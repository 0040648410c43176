"""Schema versions: Alembic migrations shipped in the package, applied on open.

A fresh database is built by running every migration; a database at an older revision is upgraded
in place (migrations only add, never drop). A database made before migrations existed (tables
created directly from the models, no version table) is recognised by its tables, stamped with the
revision it matches, then upgraded. Concurrent openers serialise on a lock (a file lock next to a
SQLite file, an advisory lock on PostgreSQL), so sixteen jobs opening a fresh database at once
migrate it exactly once.

The version lives in ``ablate_schema_version`` (Optuna keeps its own Alembic version table in the
same database).
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator, Optional

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .engine import HEAD, VERSION_TABLE

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK = 0x61626C6174  # "ablat": the advisory lock id of schema migrations


def _config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _legacy_revision(tables: set[str]) -> Optional[str]:
    """The revision a version-less database matches, from its tables (None: an empty database)."""
    if "runs" not in tables:
        return None
    return "0002" if "bench_results" in tables else "0001"


def current_revision(conn: Connection) -> Optional[str]:
    """The schema revision of the database (legacy ones recognised), None if it has no schema."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    return _legacy_revision(tables)


@contextlib.contextmanager
def _lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the migration lock."""
    backend = engine.url.get_backend_name()
    if backend == "sqlite":
        path = Path(engine.url.database).resolve()
        with open(path.with_name(path.name + ".migrate.lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with engine.connect() as conn:
                    yield conn
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        if backend == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK})
            conn.commit()
        try:
            yield conn
        finally:
            if backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK})
                conn.commit()


def upgrade(engine: Engine) -> tuple[Optional[str], str]:
    """Bring the database to :data:`HEAD`; returns (revision before, revision after)."""
    from alembic import command

    with engine.connect() as conn:
        before = current_revision(conn)
    if before == HEAD:
        return before, HEAD
    with _lock(engine) as conn:
        before = current_revision(conn)  # another process may have migrated meanwhile
        if before == HEAD:
            return before, HEAD
        cfg = _config(conn)
        tables = set(inspect(conn).get_table_names())
        if VERSION_TABLE not in tables and before is not None:
            command.stamp(cfg, before)  # a pre-migration database: record what it is
            conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        after = current_revision(conn)
    return before, after or HEAD

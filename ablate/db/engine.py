"""Where the results database is and how to connect to it: the URL, the SQLite file's checks,
the engine factory.

SQLAlchemy is imported by the functions that need it, so a command that reads a SQLite file
through :mod:`ablate.db.read` starts without it. Transactions on SQLite begin IMMEDIATE (the write
lock up front: no deadlock-prone upgrade of a read lock mid-transaction), except on connections
marked :data:`READ_ONLY` (:meth:`ablate.db.Database.read`), whose plain read transactions in WAL
mode neither wait on running jobs' writes nor block them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

ENV_URL = "ABLATE_DB_URL"
VERSION_TABLE = "ablate_schema_version"  # the schema's Alembic revision (ablate.db.schema)
HEAD = "0004"  # the newest schema revision: what this code reads and writes
SQLITE_BUSY_MS = 60_000
READ_ONLY = "ablate_read_only"  # execution option of connections that only read
# a SQLite file URL that SQLAlchemy would neither unquote nor re-quote (ASCII letters, digits and
# _ . - ~ / + space): the standard library's sqlite3 reads it just as SQLAlchemy would
_PLAIN_SQLITE = re.compile(r"sqlite(?:\+pysqlite)?:///([A-Za-z0-9_.~/ +-]+)", re.ASCII)


class DBError(RuntimeError):
    """The database cannot be used; the message is one line and never contains a password."""


def plain_sqlite_path(url: str) -> Optional[str]:
    """The file of a plain SQLite URL (``sqlite:///results/ablate.db``), as SQLAlchemy reads it;
    None for any other URL (query options, a quoted or unusual path, another database)."""
    m = _PLAIN_SQLITE.fullmatch(url)
    return m.group(1) if m else None


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    if plain_sqlite_path(url) is not None:
        return url  # no password, and SQLAlchemy would render it unchanged
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def resolve_url(db: Optional[str], results_dir: Path) -> str:
    """``--db`` beats ``$ABLATE_DB_URL`` beats ``sqlite:///<results>/ablate.db``."""
    if db:
        return db
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    return f"sqlite:///{Path(results_dir).resolve() / 'ablate.db'}"


def check_sqlite_file(path: Optional[str], create: bool) -> None:
    """The SQLite database at ``path`` can be opened (made, with ``create``), else DBError: a
    file (not memory: jobs share it) in an existing, writable folder (WAL keeps files beside it)."""
    if not create and path and not Path(path).exists():
        raise DBError(f"--db: no database at {path}; run `ablate run GRID` first or pass --db")
    if not path or path == ":memory:":
        raise DBError("--db: an in-memory SQLite database cannot be shared by jobs; give a file path")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise DBError(f"--db: folder {parent} of SQLite database does not exist; create it or pass another --db")
    if not os.access(parent, os.W_OK):
        raise DBError(f"--db: folder {parent} is not writable; pass a writable --db location")


def unreachable(url: str, exc: BaseException) -> DBError:
    """The one-line error of a database that did not answer (``exc``: the driver's error)."""
    text = str(exc).strip()
    return DBError(f"--db: cannot reach {safe_url(url)}: {text.splitlines()[0] if text else type(exc).__name__}")


def _sqlite_pragmas(engine: Engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # let SQLAlchemy's BEGIN below be the only transaction control (pysqlite otherwise defers it)
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # writes take the write lock up front; read-only connections a plain (deferred) read transaction
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (SQLite gets WAL, a busy timeout and IMMEDIATE transactions but on
    :data:`READ_ONLY` connections)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        u = make_url(url)
    except ArgumentError:
        raise DBError(f"--db: cannot parse database URL {safe_url(url)!r} "
                      "(expected e.g. sqlite:///results/ablate.db or postgresql+psycopg://user@host/db)") from None
    if u.get_backend_name() == "sqlite":
        check_sqlite_file(u.database, create=True)
    try:
        engine = create_engine(url, future=True, pool_pre_ping=True)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise DBError(f"--db: unsupported database URL {safe_url(url)!r}: {str(exc).splitlines()[0]}") from None
    if u.get_backend_name() == "sqlite":
        _sqlite_pragmas(engine)
    return engine

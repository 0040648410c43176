"""Reading the results database without writing: plain SQL in one read transaction.

The commands that only read (``ablate table``, ``plot``, ``report``, ``status``) query through a
:class:`Reader`. Its queries share one read transaction (one snapshot of the database), which on
SQLite in WAL mode neither waits on a running job's write nor blocks it. A SQLite file named by a
plain URL is read with the standard library's sqlite3 alone, so ``ablate table`` starts without
importing SQLAlchemy; an open :class:`~ablate.db.Database` or any other URL (PostgreSQL) is read
through SQLAlchemy (:meth:`~ablate.db.Database.read`).

The SQL is written once, with ``:name`` parameters, for SQLite and PostgreSQL alike; values come
back as the driver gives them (SQLite: datetimes as ISO text, see :func:`as_datetimes`).
"""
from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from .engine import HEAD, SQLITE_BUSY_MS, VERSION_TABLE, DBError, check_sqlite_file, plain_sqlite_path, resolve_url, unreachable

if TYPE_CHECKING:
    from .store import Database

DbArg = Union["Database", "Reader", str, None]


class Reader:
    """Read-only queries on the results database, in one read transaction (see the module)."""

    url: str
    dialect: str  # "sqlite", "postgresql", ...

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        """All rows of ``sql`` as tuples. A list or tuple parameter becomes as many parameters
        (``IN (:names)`` -> ``IN (:names_0, :names_1)``; an empty one matches nothing)."""
        for name, value in list(params.items()):
            if isinstance(value, (list, tuple)):
                expanded = {f"{name}_{i}": v for i, v in enumerate(value)}
                sql = re.sub(rf"\(:{name}\)", "(" + (", ".join(f":{k}" for k in expanded) or "NULL") + ")", sql)
                del params[name]
                params.update(expanded)
        return self._execute(sql, params)

    def _execute(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        raise NotImplementedError

    def has_table(self, name: str) -> bool:
        """Whether the database has the table ``name`` (an older schema may lack one)."""
        raise NotImplementedError

    def grids(self) -> list[str]:
        """The grids the database knows, sorted."""
        return sorted({g for g, in self.rows("SELECT DISTINCT grid FROM grid_runs")})


class _SQLiteReader(Reader):
    """A SQLite file through the standard library."""

    dialect = "sqlite"

    def __init__(self, url: str, path: str):
        self.url = url
        check_sqlite_file(path, create=False)
        self._conn = sqlite3.connect(path, timeout=SQLITE_BUSY_MS / 1000, isolation_level=None)
        try:
            self._conn.execute("BEGIN")  # deferred: a read transaction from the first SELECT on
            self._conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            self._conn.close()
            raise unreachable(url, exc) from None

    def _execute(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def has_table(self, name: str) -> bool:
        return bool(self._execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n", {"n": name}))

    def close(self) -> None:
        self._conn.close()  # (ends the read transaction)


class _CoreReader(Reader):
    """An open Database through SQLAlchemy: its read-only connection (plain transactions)."""

    def __init__(self, db: Database):
        self.url, self.dialect = db.url, db.dialect
        self._conn = db.read()

    def _execute(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        from sqlalchemy import text

        result = self._conn.execute(text(sql), params)
        try:  # DB-API tuples: SQLAlchemy's per-row objects cost 3x on 100k rows
            return list(result.cursor.fetchall()) if result.returns_rows else []
        finally:
            result.close()

    def has_table(self, name: str) -> bool:
        from sqlalchemy import inspect

        return inspect(self._conn).has_table(name)

    def close(self) -> None:
        self._conn.close()


@contextmanager
def reading(db: DbArg = None, results: Optional[Path] = None) -> Iterator[Reader]:
    """A :class:`Reader` of ``db``: a Reader (used as is), a :class:`~ablate.db.Database` (its
    engine), a SQLAlchemy URL, or None for the default database (``$ABLATE_DB_URL`` or
    ``<results>/ablate.db``). Raises DBError (one line) where there is no such database."""
    if isinstance(db, Reader):
        yield db
        return
    opened = None  # a Database opened here, closed here
    if db is None or isinstance(db, str):
        if db is not None and "://" not in db:
            raise DBError(f"--db: expected a SQLAlchemy URL such as sqlite:///results/ablate.db, got {db!r}")
        url = resolve_url(db, Path(results or "results"))
        path = plain_sqlite_path(url)
        if path is not None:
            reader: Reader = _SQLiteReader(url, path)
        else:
            from .store import Database

            opened = Database(url, create=False)
            try:
                reader = _CoreReader(opened)
            except BaseException:
                opened.close()
                raise
    else:
        reader = _CoreReader(db)
    try:
        _check_schema(reader)
        yield reader
    finally:
        reader.close()
        if opened is not None:
            opened.close()


def _check_schema(reader: Reader) -> None:
    """DBError (one line) unless the database's schema is the one this code reads: reading never
    migrates (an older database is upgraded by ``ablate db upgrade`` or the next ``ablate run``)."""
    if not reader.has_table("runs"):
        return  # no results yet: the queries find nothing (and the caller says so)
    rev = reader.rows(f"SELECT version_num FROM {VERSION_TABLE}")[0][0] if reader.has_table(VERSION_TABLE) else None
    if rev == HEAD:
        return
    from .engine import safe_url

    if rev is not None and rev.isdigit() and int(rev) > int(HEAD):
        raise DBError(f"--db: {safe_url(reader.url)} has schema {rev}, newer than this ablate's {HEAD}; "
                      "upgrade ablate to read it")
    raise DBError(f"--db: {safe_url(reader.url)} has schema {rev or 'from before versioning'}, older than "
                  f"{HEAD}; run `ablate db upgrade --db {safe_url(reader.url)}` (it only adds) and try again")


def as_datetimes(values: list) -> list[Optional[datetime]]:
    """A DateTime column's values as datetimes (SQLite stores ISO text; None stays None)."""
    iso = datetime.fromisoformat
    return [iso(v) if type(v) is str else v for v in values]

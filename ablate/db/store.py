"""Engine factory and the few transactions the harness needs.

Every write is one short transaction through :meth:`Database.tx` (commit or rollback), so a
crash never leaves half a result: the final metrics, the artifacts and the ``done`` status of a
run are committed together in :meth:`Database.finish`.
"""
from __future__ import annotations

import functools
import random
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from sqlalchemy import and_, delete, func, literal, or_, select, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import schema
from .engine import (ENV_URL, READ_ONLY, SQLITE_BUSY_MS, DBError, check_sqlite_file, make_engine, resolve_url,
                     safe_url, unreachable)
from .models import Artifact, BenchResult, GridRun, Metric, Run, StudyRun, utcnow

__all__ = ["DBError", "Database", "ENV_URL", "NotOwner", "RETRIES", "SQLITE_BUSY_MS", "open_db", "resolve_url",
           "retrying", "safe_url", "server_now"]

T = TypeVar("T")


RETRIES = 8  # attempts of one write transaction that hit a lock or a concurrent insert


def _retryable(exc: BaseException) -> bool:
    """A transaction worth running again: SQLite's lock timeout, PostgreSQL's serialisation
    failure or deadlock, or a unique-key race with a concurrent writer (the retry sees its row)."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, OperationalError):
        msg = str(exc.orig or exc).lower()
        return "database is locked" in msg or "deadlock" in msg or "could not serialize" in msg
    return False


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a one-transaction method again (jittered backoff) when it lost a race; see
    :func:`_retryable`. Each method here is one transaction, so a rerun is all or nothing."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> T:
        for attempt in range(RETRIES):
            try:
                return fn(*args, **kw)
            except (OperationalError, IntegrityError) as exc:
                if attempt == RETRIES - 1 or not _retryable(exc):
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")
    return wrapper


class NotOwner(RuntimeError):
    """The run was taken by another attempt (marked lost, then claimed again): this attempt must
    stop and write nothing more. Raised by the owner-only writes."""


def server_now(dialect: str, seconds_ago: float = 0.0) -> Any:
    """The database server's clock (naive UTC, as the DateTime columns store it), optionally
    ``seconds_ago`` earlier: heartbeats and the lost cutoff never compare two machines' clocks."""
    if dialect == "sqlite":
        # six fractional digits, like SQLAlchemy's own SQLite DateTime text, so values compare as text
        mods = [f"-{seconds_ago:.3f} seconds"] if seconds_ago else []
        return func.strftime("%Y-%m-%d %H:%M:%f000", "now", *mods)
    if dialect == "postgresql":
        now = func.timezone("UTC", func.clock_timestamp())
        return now - literal(timedelta(seconds=seconds_ago)) if seconds_ago else now
    return literal(utcnow() - timedelta(seconds=seconds_ago))  # other servers: this machine's clock


class Database:
    """The results database: engine, schema, and the harness's transactions."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        u = make_url(url) if "://" in url else None
        if not create and u is not None and u.get_backend_name() == "sqlite" and u.database:
            check_sqlite_file(u.database, create=False)
        self.engine = make_engine(url)
        try:
            with self.read() as conn:
                conn.exec_driver_sql("SELECT 1")
            if create:
                schema.upgrade(self.engine)
        except OperationalError as exc:
            raise unreachable(url, exc.orig or exc) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # reads: on SQLite a plain read transaction (writes begin IMMEDIATE), which neither waits
        # on a running job's write nor blocks it
        self._reads = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({safe_url(self.url)})"

    def close(self) -> None:
        self.engine.dispose()

    def read(self) -> Connection:
        """A connection for reads only (use it as a context manager): on SQLite its transactions
        are plain read transactions, not the write transactions of :meth:`tx`."""
        return self.engine.connect().execution_options(**{READ_ONLY: True})

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction: commit on success, rollback on any exception."""
        with self._sessions() as s:
            with s.begin():
                yield s

    # -- grid registration -------------------------------------------------------------------
    @retrying
    def register(self, grid: str, cells: Iterable[tuple[str, str, int, dict, dict]]) -> dict[str, str]:
        """Insert missing runs as ``pending`` and link them to ``grid``.

        ``cells``: (key, variant, seed, resolved spec, overrides). Returns {key: status}.
        """
        from ..config import stored_config_key  # pydantic's models: not on the read-only paths

        cells = list(cells)
        out: dict[str, str] = {}
        with self.tx() as s:
            existing = {r.key: r for r in s.scalars(select(Run).where(Run.key.in_([c[0] for c in cells])))}
            links = set(s.scalars(select(GridRun.run_id).where(GridRun.grid == grid)))
            for key, variant, seed, spec, overrides in cells:
                run = existing.get(key)
                if run is None:
                    run = Run(key=key, grid=grid, variant=variant, seed=seed, spec=spec,
                              overrides=overrides, status="pending", config_key=stored_config_key(spec))
                    s.add(run)
                    s.flush()
                    existing[key] = run
                if run.id not in links:
                    s.add(GridRun(grid=grid, run_id=run.id, overrides=overrides))
                    links.add(run.id)
                out[key] = run.status
        return out

    # -- the run lifecycle -------------------------------------------------------------------
    # A claim hands its attempt a token; every write of the run's own rows (heartbeat, curves,
    # provenance, status, result) is conditioned on it, so an attempt whose run was marked lost
    # and claimed again writes nothing more: its writes match no row and raise NotOwner.

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _owned(self, key: str, token: str):
        return and_(Run.key == key, Run.attempt == token, Run.status == "running")

    @retrying
    def claim(self, key: str, job_id: Optional[str] = None,
              allow: tuple[str, ...] = ("pending", "lost", "failed", "cancelled", "pruned")) -> Optional[str]:
        """Atomically move a run from one of ``allow`` to ``running``; returns the new attempt's
        token, or None if the run was not claimable. (A ``pruned`` run, stopped early by a study,
        resumes from its checkpoint.) A run ``running`` under this very ``job_id`` is taken back
        too: Slurm restarted the job after a requeue (the killed attempt could not say so); the
        killed attempt's token is void from then on."""
        import uuid

        cond = Run.status.in_(allow)
        if job_id is not None:
            cond = or_(cond, and_(Run.status == "running", Run.job_id == job_id))
        token = uuid.uuid4().hex
        now = server_now(self.dialect)
        with self.tx() as s:
            res = s.execute(
                update(Run).where(Run.key == key, cond).values(
                    status="running", host=socket.gethostname(), job_id=job_id, started_at=now,
                    heartbeat_at=now, finished_at=None, error=None, attempts=Run.attempts + 1,
                    attempt=token))
            return token if res.rowcount == 1 else None

    def owns(self, key: str, token: str) -> bool:
        """Whether the attempt ``token`` still owns the running run ``key``."""
        with self._reads() as s:
            return s.scalar(select(Run.id).where(self._owned(key, token))) is not None

    def _check(self, s: Session, key: str, token: str) -> Run:
        run = s.scalar(select(Run).where(self._owned(key, token)))
        if run is None:
            raise NotOwner(f"run {key}: attempt {token[:8]} no longer owns it (marked lost and taken "
                           "by another attempt, or cancelled); this attempt stops without writing")
        return run

    @retrying
    def set_job_ids(self, job_ids: dict[str, str]) -> None:
        """Record the scheduler's job id of submitted, not yet started runs (so they can be cancelled)."""
        with self.tx() as s:
            for key, jid in job_ids.items():
                s.execute(update(Run).where(Run.key == key, Run.status != "running").values(job_id=jid))

    @retrying
    def cancel(self, grid: str, reason: str) -> list[tuple[str, str, Optional[str]]]:
        """Mark the grid's pending and running runs ``cancelled``; returns their (key, status
        before, job id) so the caller can stop the jobs."""
        with self.tx() as s:
            rows = s.execute(select(Run.key, Run.status, Run.job_id).join(GridRun, GridRun.run_id == Run.id)
                             .where(GridRun.grid == grid, Run.status.in_(("pending", "running")))).all()
            keys = [r[0] for r in rows]
            if keys:
                s.execute(update(Run).where(Run.key.in_(keys)).values(
                    status="cancelled", error=reason, finished_at=utcnow()))
            return [tuple(r) for r in rows]

    @retrying
    def set_provenance(self, key: str, token: str, code_rev: str, fingerprint: str) -> None:
        """The code that runs this attempt: its revision (git) and fingerprint (what decides the numbers)."""
        with self.tx() as s:
            run = self._check(s, key, token)
            run.code_rev, run.fingerprint = code_rev, fingerprint

    @retrying
    def heartbeat(self, key: str, token: str) -> bool:
        """Touch the run's heartbeat (the server's clock); False when this attempt no longer owns it."""
        with self.tx() as s:
            res = s.execute(update(Run).where(self._owned(key, token)).values(
                heartbeat_at=server_now(self.dialect)))
            return res.rowcount == 1

    @retrying
    def mark_lost(self, older_than_s: float) -> list[str]:
        """Runs ``running`` whose heartbeat is older than ``older_than_s`` by the database server's
        clock become ``lost`` (their attempt's token stays, but no longer owns a running run)."""
        cutoff = server_now(self.dialect, older_than_s)
        with self.tx() as s:
            keys = list(s.scalars(select(Run.key).where(Run.status == "running", Run.heartbeat_at < cutoff)))
            if keys:
                s.execute(update(Run).where(Run.key.in_(keys), Run.status == "running").values(
                    status="lost", error=f"heartbeat older than {older_than_s:.0f} s"))
        return keys

    @retrying
    def clear_curves(self, key: str, token: str) -> None:
        """Drop step-wise metrics of a run that starts from scratch (a previous attempt's curves)."""
        with self.tx() as s:
            run = self._check(s, key, token)
            s.execute(delete(Metric).where(Metric.run_id == run.id))

    @retrying
    def log_metrics(self, key: str, rows: Iterable[tuple[str, Optional[int], float]], token: str) -> None:
        """Write (name, step, value) rows; a row already present for (name, step) is replaced.
        Raises :class:`NotOwner` when ``token`` no longer owns the run (nothing is written), also
        for no rows: the trainer calls it before each checkpoint, as the owner check."""
        rows = list(rows)
        with self.tx() as s:
            run = self._check(s, key, token)
            if rows:
                self._put_metrics(s, run.id, rows)

    @staticmethod
    def _put_metrics(s: Session, rid: int, rows: list[tuple[str, Optional[int], float]]) -> None:
        for name, step, value in rows:
            cond = Metric.step.is_(None) if step is None else Metric.step == step
            s.execute(delete(Metric).where(Metric.run_id == rid, Metric.name == name, cond))
            s.add(Metric(run_id=rid, name=name, step=step, value=float(value)))

    @retrying
    def finish(self, key: str, final: dict[str, float], artifacts: Iterable[tuple[str, str]] = (),
               token: str = "", late: Optional[Callable[[], dict[str, float]]] = None) -> None:
        """Final metrics (step NULL), artifacts and status ``done``, in one transaction, only by
        the owning attempt (else :class:`NotOwner`, nothing written). ``late()`` is called inside
        the transaction, after the other rows are written: metrics that time the work up to the
        commit (they commit with ``done``, never after it)."""
        with self.tx() as s:
            run = self._check(s, key, token)
            self._put_metrics(s, run.id, [(k, None, v) for k, v in final.items()])
            for kind, path in artifacts:
                s.execute(delete(Artifact).where(Artifact.run_id == run.id, Artifact.kind == kind))
                s.add(Artifact(run_id=run.id, kind=kind, path=str(path)))
            if late is not None:
                s.flush()
                self._put_metrics(s, run.id, [(k, None, v) for k, v in late().items()])
            run.status, run.finished_at, run.error = "done", utcnow(), None

    @retrying
    def fail(self, key: str, error: str, token: str) -> bool:
        """The attempt ``token`` failed; False if it no longer owned the run (a run cancelled or
        taken meanwhile keeps its status)."""
        with self.tx() as s:
            res = s.execute(update(Run).where(self._owned(key, token)).values(
                status="failed", finished_at=utcnow(), error=error))
            return res.rowcount == 1

    @retrying
    def release(self, key: str, token: str, status: str, error: Optional[str] = None) -> bool:
        """The owning attempt hands its run back as ``status`` (``pending`` after a preemption,
        ``pruned``); False if it no longer owned it."""
        with self.tx() as s:
            res = s.execute(update(Run).where(self._owned(key, token)).values(status=status, error=error))
            return res.rowcount == 1

    @retrying
    def set_status(self, key: str, status: str, error: Optional[str] = None,
                   only_from: Optional[tuple[str, ...]] = None, job_id: Optional[str] = None) -> bool:
        """The launcher's verdict on a run it does not own (a job that died without a result):
        applied only while the run is in one of ``only_from`` and, with ``job_id``, still held by
        that job. Returns whether it applied."""
        with self.tx() as s:
            q = update(Run).where(Run.key == key)
            if only_from is not None:
                q = q.where(Run.status.in_(only_from))
            if job_id is not None:
                q = q.where(Run.job_id == job_id)
            return s.execute(q.values(status=status, error=error)).rowcount == 1

    @retrying
    def supersede(self, key: str, on_rename: Callable[[str], Optional[tuple[str, str]]] = lambda k: None
                  ) -> Optional[str]:
        """Keep the finished run ``key`` as history and make its cell ``pending`` again (for
        newer code to retrain): in one transaction the old run is renamed ``<key>@<id>`` with
        status ``superseded`` (metrics, curves and artifacts stay with it), and a new pending run
        takes the key, in every grid the old one was in. ``on_rename(old_key)`` runs inside the
        transaction: it moves the run's files and returns (old folder, new folder) so that the
        artifact paths follow (if it raises, nothing changes). Returns the old run's new key, or
        None if ``key`` was not a finished run."""
        with self.tx() as s:
            old = s.scalar(select(Run).where(Run.key == key, Run.status == "done"))
            if old is None:
                return None
            history = f"{key}@{old.id}"
            old.key, old.status = history, "superseded"
            s.flush()
            new = Run(key=key, grid=old.grid, variant=old.variant, seed=old.seed, spec=old.spec,
                      overrides=old.overrides, status="pending", config_key=old.config_key)
            s.add(new)
            s.flush()
            for link in s.scalars(select(GridRun).where(GridRun.run_id == old.id)).all():
                s.add(GridRun(grid=link.grid, run_id=new.id, overrides=link.overrides))
            moved = on_rename(history)
            if moved is not None:  # the run's files moved: its artifacts point there
                src, dst = moved
                for art in s.scalars(select(Artifact).where(Artifact.run_id == old.id)).all():
                    if art.path.startswith(src):
                        art.path = dst + art.path[len(src):]
            return history

    def done_fingerprints(self, keys: Iterable[str]) -> dict[str, tuple[str, Optional[str]]]:
        """``{key: (variant, fingerprint)}`` of the finished runs among ``keys``."""
        keys = list(keys)
        with self._reads() as s:
            rows = s.execute(select(Run.key, Run.variant, Run.fingerprint).where(
                Run.key.in_(keys), Run.status == "done")).all()
            return {k: (v, f) for k, v, f in rows}

    # -- reads -------------------------------------------------------------------------------
    def statuses(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        with self._reads() as s:
            return dict(s.execute(select(Run.key, Run.status).where(Run.key.in_(keys))).all())

    def run(self, key: str) -> Optional[Run]:
        with self._reads() as s:
            return s.scalar(select(Run).where(Run.key == key))

    def grids(self) -> list[str]:
        with self._reads() as s:
            return sorted(set(s.scalars(select(GridRun.grid))))

    def final_metrics(self, key: str) -> dict[str, float]:
        with self._reads() as s:
            rid = s.scalar(select(Run.id).where(Run.key == key))
            return dict(s.execute(select(Metric.name, Metric.value).where(
                Metric.run_id == rid, Metric.step.is_(None))).all())

    def curve(self, key: str, name: str) -> list[tuple[int, float]]:
        with self._reads() as s:
            rid = s.scalar(select(Run.id).where(Run.key == key))
            return list(s.execute(select(Metric.step, Metric.value).where(
                Metric.run_id == rid, Metric.name == name, Metric.step.is_not(None)).order_by(Metric.step)).all())


    # -- Optuna studies (ablate.study) ----------------------------------------------------------
    @retrying
    def register_trial(self, study: str, trial: int, grid: str, key: str, variant: str, seed: int,
                       spec: dict, params: dict) -> str:
        """Insert the run of a study's trial if missing (``pending``), link it to ``grid`` (the
        study's pseudo-grid, with the trial's params as overrides) and to (``study``, ``trial``),
        in one transaction. Returns the run's status (``done``: reuse its result)."""
        from ..config import stored_config_key

        with self.tx() as s:
            run = s.scalar(select(Run).where(Run.key == key))
            if run is None:
                run = Run(key=key, grid=grid, variant=variant, seed=seed, spec=spec, overrides=params,
                          status="pending", config_key=stored_config_key(spec))
                s.add(run)
                s.flush()
            if s.scalar(select(GridRun.id).where(GridRun.grid == grid, GridRun.run_id == run.id)) is None:
                s.add(GridRun(grid=grid, run_id=run.id, overrides=params))
            link = s.scalar(select(StudyRun).where(StudyRun.study == study, StudyRun.trial == trial))
            if link is None:
                s.add(StudyRun(study=study, trial=trial, run_id=run.id))
            else:  # a study deleted and made again under its name numbers its trials afresh
                link.run_id = run.id
            return run.status

    @retrying
    def forget_study(self, study: str) -> int:
        """Drop the trial links of ``study`` (a new Optuna study reuses the name); the runs stay."""
        with self.tx() as s:
            return s.execute(delete(StudyRun).where(StudyRun.study == study)).rowcount

    def studies(self) -> list[str]:
        """Names of the studies with at least one trial linked to a run."""
        with self._reads() as s:
            return sorted(set(s.scalars(select(StudyRun.study))))

    def study_runs(self, study: str) -> dict[int, tuple[str, str]]:
        """``{trial number: (run key, run status)}`` of ``study``."""
        with self._reads() as s:
            rows = s.execute(select(StudyRun.trial, Run.key, Run.status).join(Run, Run.id == StudyRun.run_id)
                             .where(StudyRun.study == study)).all()
            return {t: (k, st) for t, k, st in rows}

    # -- benchmarks ---------------------------------------------------------------------------
    @retrying
    def record_bench(self, suite: str, rows: Iterable[dict[str, Any]], device: Optional[str] = None,
                     code_rev: Optional[str] = None) -> str:
        """Store one benchmark table (all rows in one transaction); returns its session id."""
        import uuid

        session = uuid.uuid4().hex
        host = socket.gethostname()
        with self.tx() as s:
            s.add_all(BenchResult(suite=suite, session=session, host=host, device=device,
                                  code_rev=code_rev, row=dict(r)) for r in rows)
        return session

    def bench_results(self, suite: str, session: Optional[str] = None) -> list[BenchResult]:
        """The rows of ``suite``'s latest table (or of ``session``), in insertion order."""
        with self._reads() as s:
            if session is None:
                last = s.scalars(select(BenchResult.session).where(BenchResult.suite == suite)
                                 .order_by(BenchResult.id.desc()).limit(1)).first()
                if last is None:
                    return []
                session = last
            rows = s.scalars(select(BenchResult).where(BenchResult.suite == suite,
                                                       BenchResult.session == session)
                             .order_by(BenchResult.id)).all()
            s.expunge_all()
            return list(rows)


def open_db(db: Optional[str], results_dir: Path, create: bool = True) -> Database:
    """Open (and create the schema of) the database named by ``--db``/``$ABLATE_DB_URL``/default."""
    url = resolve_url(db, results_dir)
    return Database(url, create=create)

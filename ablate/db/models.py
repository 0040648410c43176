"""The results schema: one class per table, invariants as unique constraints.

``runs``      one row per cell (content key unique), its resolved spec and status
``grid_runs`` which grids contain which runs (a cell shared by two grids is trained once)
``metrics``   (run, name, step) unique; the final value of a metric has ``step = NULL``
              (a partial unique index makes (run, name) unique among final values)
``artifacts`` files a run produced (checkpoint, sample sheet, ...)
``study_runs`` which run each trial of an Optuna study is ((study, trial) unique; two trials
              with the same resolved config share one run)
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# ``pruned``: stopped early by an Optuna study's pruner (its checkpoint stays; a grid that wants
# the full result resumes it)
# ``superseded``: a finished run kept as history after `ablate run --rerun-stale` retrained its
# cell with newer code (its key carries ``@<id>``; the cell's key belongs to the new run)
STATUSES = ("pending", "running", "done", "failed", "lost", "cancelled", "pruned", "superseded")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    grid: Mapped[str] = mapped_column(String(200), index=True, nullable=False)
    variant: Mapped[str] = mapped_column(String(100), index=True, nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)
    overrides: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True, nullable=False, default="pending")
    host: Mapped[Optional[str]] = mapped_column(String(200))
    job_id: Mapped[Optional[str]] = mapped_column(String(100))
    code_rev: Mapped[Optional[str]] = mapped_column(String(64))
    # the spec's hash without the seed: runs with one config_key are seeds of one configuration
    config_key: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    # hash of the code that decides the numbers (ablate.fingerprint), set by the job that ran it;
    # NULL for runs recorded before fingerprints existed (unknown code)
    fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    # the claim token of the attempt that owns the run now: only it may write the run's rows
    attempt: Mapped[Optional[str]] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)

    metrics: Mapped[list["Metric"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    artifacts: Mapped[list["Artifact"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class GridRun(Base):
    __tablename__ = "grid_runs"
    __table_args__ = (UniqueConstraint("grid", "run_id", name="uq_grid_run"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    grid: Mapped[str] = mapped_column(String(200), index=True, nullable=False)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)
    overrides: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "name", "step", name="uq_metric_step"),
        # NULLs are distinct in UNIQUE constraints, so final values need their own index
        Index("uq_metric_final", "run_id", "name", unique=True,
              sqlite_where=text("step IS NULL"), postgresql_where=text("step IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True, nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    step: Mapped[Optional[int]] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float, nullable=False)

    run: Mapped[Run] = relationship(back_populates="metrics")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "kind", "path", name="uq_artifact"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)

    run: Mapped[Run] = relationship(back_populates="artifacts")


class BenchResult(Base):
    """One row of a benchmark table (``ablate bench <suite>``); rows of one invocation share
    ``session``. ``row`` holds the measured figures as the suite reports them."""

    __tablename__ = "bench_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suite: Mapped[str] = mapped_column(String(50), index=True, nullable=False)
    session: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    host: Mapped[Optional[str]] = mapped_column(String(200))
    device: Mapped[Optional[str]] = mapped_column(String(200))
    code_rev: Mapped[Optional[str]] = mapped_column(String(64))
    row: Mapped[dict] = mapped_column(JSON, nullable=False)


class StudyRun(Base):
    """A trial of an Optuna study (``ablate study``) and the run it trained or reused. Optuna's
    own tables hold the trial itself; the link is by study name and trial number, so it needs no
    foreign key into Optuna's schema."""

    __tablename__ = "study_runs"
    __table_args__ = (UniqueConstraint("study", "trial", name="uq_study_trial"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study: Mapped[str] = mapped_column(String(200), index=True, nullable=False)
    trial: Mapped[int] = mapped_column(Integer, nullable=False)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

"""The results database as pandas frames, in the spirit of ``mlflow.search_runs``.

``load``      one row per run: identity, status, the resolved spec flattened into dotted columns
              (``model.width``, ``model.params.scan``, ...) and the final metrics as columns
``curves``    metrics by step, long form (one row per run, name and step)
``artifacts`` the files runs produced (model, samples, sample-sheet snapshots)

Everything here reads the database only; it imports neither torch nor the variants, so
``ablate table`` starts fast. ``db`` may be a :class:`~ablate.db.Database`, a SQLAlchemy URL, or
None for the default database (``$ABLATE_DB_URL`` or ``<results>/ablate.db``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
from sqlalchemy import Text, cast, select

from .db import Artifact, Database, DBError, GridRun, Metric, Run, open_db

__all__ = ["RUN_COLUMNS", "artifacts", "curves", "flatten", "higher_is_better", "load", "run_specs"]

# the identity columns of ``load``; every other column is a spec key (dotted) or a metric
# (``config_key``: runs sharing it are seeds of one configuration; ``fingerprint``: the code
# that produced the run, None where unknown)
RUN_COLUMNS = ["run_id", "key", "config_key", "grid", "variant", "seed", "status", "error", "hyper", "host",
               "code_rev", "fingerprint", "created_at", "started_at", "finished_at"]

# direction of a metric, decided by its name: the first rule that matches wins
_LOWER = ("fid", "kid", "loss", "blank_rate", "fragment_rate", "peak_mem", "mse", "wall_s", "train_s", "s_per_image")
_HIGHER = ("align", "acc", "clip", "per_s", "throughput", "score", "precision", "recall")

DbArg = Union[Database, str, None]


def higher_is_better(metric: str) -> Optional[bool]:
    """True if a larger ``metric`` is better, False if a smaller one is, None if neither
    (``params``, ``train_steps``): such columns get no best-value mark."""
    name = metric.lower()
    if name.endswith("_real") or name.startswith("tok_"):
        return None  # ceilings and floors of the data, not results of the run
    if name.endswith("_std"):
        return None  # the spread of an estimate (kid_domain_std), not a result
    if any(p in name for p in _HIGHER):
        return True
    if any(p in name for p in _LOWER):
        return False
    return None


@contextmanager
def _opened(db: DbArg, results: Optional[Path] = None) -> Iterator[Database]:
    """``db`` as an open Database; closed afterwards only if opened here."""
    if isinstance(db, Database):
        yield db
        return
    if db is not None and "://" not in db:
        raise DBError(f"--db: expected a SQLAlchemy URL such as sqlite:///results/ablate.db, got {db!r}")
    opened = open_db(db, Path(results or "results"), create=False)
    try:
        yield opened
    finally:
        opened.close()


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"width": 96, "params": {"scan": "x"}}}`` -> ``{"model.width": 96,
    "model.params.scan": "x"}``; empty sub-dicts vanish, lists stay values."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hyper(overrides: Optional[dict]) -> str:
    """The grid's overrides of a cell but the variant (the seed is never among them), as
    ``key=value, ...`` sorted by key: the hyperparameters that differ from the grid's base."""
    import json

    items = {k: v for k, v in (overrides or {}).items() if k not in ("model.variant", "seed")}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                     for k, v in sorted(items.items()))


def _unkeyed_config_keys(conn: Any, ids: list[int]) -> dict[int, str]:
    """Configuration keys of runs stored without one (written around ``Database.register``, as
    ``ablate bench table`` does): a hash of the stored spec without its seed, taken as stored
    (validating 10,000 specs into :func:`ablate.config.config_key` would take seconds). SQLite
    and PostgreSQL drop the seed in SQL and hand back text, skipping JSON parsing in Python."""
    import hashlib
    import json

    from sqlalchemy import func

    dialect = conn.dialect.name
    if dialect == "sqlite":
        expr = func.json_remove(Run.spec, "$.seed")
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        expr = cast(cast(Run.spec, JSONB).op("-")("seed"), Text)
    else:
        expr = None
    unkeyed = Run.config_key.is_(None)  # one query for all of them, not an IN list of ids
    if expr is not None:
        pairs = _raw(conn.execute(select(Run.id, expr).where(unkeyed)))
    else:
        pairs = [(rid, json.dumps({k: v for k, v in spec.items() if k != "seed"}, sort_keys=True))
                 for rid, spec in conn.execute(select(Run.id, Run.spec).where(unkeyed))]
    wanted = set(ids)
    return {rid: "spec-" + hashlib.sha256(str(text).encode()).hexdigest()[:11] for rid, text in pairs
            if rid in wanted}


def run_specs(db: DbArg, run_ids: Sequence[int], results: Optional[Path] = None) -> dict[int, dict]:
    """``{run_id: flattened spec without the seed}`` of the given runs only (the table asks for
    one run per configuration, so it never loads every spec)."""
    ids = [int(i) for i in dict.fromkeys(run_ids)]
    out: dict[int, dict] = {}
    with _opened(db, results) as d, d.engine.connect() as conn:
        for i in range(0, len(ids), 500):  # bounded IN lists
            for rid, spec in conn.execute(select(Run.id, Run.spec).where(Run.id.in_(ids[i:i + 500]))):
                out[rid] = flatten({k: v for k, v in (spec or {}).items() if k != "seed"})
    return out


def _run_ids(grid: Optional[str], study: Optional[str]):
    """A sub-select of the run ids in ``grid`` and ``study`` (None: no filter)."""
    q = None
    if grid is not None:
        q = select(GridRun.run_id).where(GridRun.grid == grid)
    if study is not None:
        from .db import models

        link = getattr(models, "StudyRun", None)  # issue 7 links runs to Optuna studies
        if link is None or not hasattr(link, "study"):
            raise DBError(f"--study: this database records no studies, so there is no study {study!r} "
                          "(studies are written by `ablate study`)")
        sq = select(link.run_id).where(link.study == study)
        q = sq if q is None else q.where(GridRun.run_id.in_(sq))
    return q


def _check_study(d: Database, study: str) -> None:
    """A study filter must name a study this database records (one line otherwise)."""
    from sqlalchemy import inspect

    from .db import models

    link = getattr(models, "StudyRun", None)
    names = []
    if link is not None and inspect(d.engine).has_table(link.__tablename__):
        with d.engine.connect() as conn:
            names = sorted(set(conn.execute(select(link.study)).scalars()))
    if study not in names:
        known = f"known studies: {', '.join(names)}" if names else \
            "this database records no studies yet (studies are written by `ablate study`)"
        raise DBError(f"--study: no study named {study!r}; {known}")


def _raw(result: Any) -> list[tuple]:
    """All rows of a result of plain columns (ints, floats, strings: no type processing
    needed) as DBAPI tuples, skipping SQLAlchemy's per-row objects (3x faster on 200k rows)."""
    try:
        return list(result.cursor.fetchall())
    finally:
        result.close()


def _frame(rows: Sequence[Any], columns: list[str]) -> pd.DataFrame:
    """Plain tuples as a frame (SQLAlchemy rows would send pandas down a slow per-row path)."""
    if not rows:
        return pd.DataFrame({c: [] for c in columns})
    return pd.DataFrame(rows, columns=columns)


def _pivot(rows: Sequence[tuple], run_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """``(run_id, name, value)`` rows as ``{name: values in the order of run_ids}`` (NaN where a
    run lacks the metric; names sorted; runs not in ``run_ids`` ignored), in one pass: 4x faster
    than pandas pivoting a long frame of the same 200k rows."""
    at = {rid: i for i, rid in enumerate(run_ids)}
    columns: dict[str, list] = {}
    for rid, name, value in rows:
        i = at.get(rid)
        if i is None:
            continue
        column = columns.get(name)
        if column is None:
            column = columns[name] = [math.nan] * len(at)
        column[i] = value
    return {name: np.array(columns[name], dtype=float) for name in sorted(columns)}


def load(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None,
         spec: bool = True, results: Optional[Path] = None, metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per run (of ``grid`` / ``study`` when given), ordered by run id.

    Columns: :data:`RUN_COLUMNS` (``hyper``: the grid's overrides but variant and seed, as one
    string; with ``grid`` the overrides are that grid's; ``config_key``: runs that share it are
    seeds of one configuration (a run stored without one gets a hash of its stored spec without
    the seed); ``fingerprint``: the code that produced the run, None where unknown; superseded
    runs are included, with their status), then with ``spec`` the resolved spec
    flattened into dotted columns (``model.width``; lists stay values), then one column per final
    metric (NaN where a run lacks it; runs that did not finish usually have none), by name;
    ``metrics``: of these metrics only (None: all; a metric no run here has gets no column).
    A run in two grids appears once; ``grid`` is then the first grid that registered it.
    """
    import json

    with _opened(db, results) as d:
        if study is not None:
            _check_study(d, study)
        ids = _run_ids(grid, study)
        # the overrides as stored text: runs of one configuration share it, so it is parsed once
        cols = [Run.id, Run.key, Run.config_key, Run.grid, Run.variant, Run.seed, Run.status, Run.error,
                cast(Run.overrides, Text), Run.host, Run.code_rev, Run.fingerprint, Run.created_at, Run.started_at,
                Run.finished_at]
        if spec:
            cols.append(Run.spec)
        q = select(*cols).order_by(Run.id)
        mq = select(Metric.run_id, Metric.name, Metric.value).where(Metric.step.is_(None))
        if metrics is not None:
            mq = mq.where(Metric.name.in_(list(dict.fromkeys(metrics))))
        if ids is not None:
            q, mq = q.where(Run.id.in_(ids)), mq.where(Metric.run_id.in_(ids))
        with d.engine.connect() as conn:
            rows = conn.execute(q).all()
            overrides = dict(_raw(conn.execute(select(GridRun.run_id, cast(GridRun.overrides, Text)).where(
                GridRun.grid == grid)))) if grid is not None else {}
            final = _raw(conn.execute(mq))
            missing, keys = [r[0] for r in rows if r[2] is None], {}
            if missing:  # rows written around Database.register (none are, by ablate itself)
                keys = _unkeyed_config_keys(conn, missing)
    hypers: dict[Optional[str], str] = {}

    def hyper(text: Optional[str]) -> str:
        if text not in hypers:
            hypers[text] = _hyper(json.loads(text) if text is not None else None)
        return hypers[text]

    base = pd.DataFrame(
        [(r[0], r[1], r[2] if r[2] is not None else keys.get(r[0], f"spec-run{r[0]}"), grid or r[3], r[4], r[5], r[6],
          r[7].strip().splitlines()[0] if r[7] and r[7].strip() else "",
          hyper(overrides.get(r[0], r[8])), r[9], r[10], r[11], r[12], r[13], r[14]) for r in rows],
        columns=RUN_COLUMNS)
    parts = [base]
    if spec and rows:
        flat = pd.DataFrame.from_records([flatten({k: v for k, v in r[15].items() if k != "seed"})
                                          for r in rows])
        parts.append(flat.drop(columns=[c for c in flat.columns if c in RUN_COLUMNS]))
    wide = {name: v for name, v in _pivot(final, [r[0] for r in rows]).items() if name not in RUN_COLUMNS}
    if wide:
        parts.append(pd.DataFrame(wide))
    return pd.concat(parts, axis=1) if len(parts) > 1 else base


def curves(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None,
           names: Optional[Sequence[str]] = None, results: Optional[Path] = None,
           runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Metrics by step, long form: ``run_id, key, variant, seed, hyper, name, step, value``,
    sorted by run, name and step. ``names`` limits the metrics (e.g. ``["train_loss", "val_loss"]``).
    ``runs``: :func:`load`'s frame of the same ``grid`` and ``study``, when the caller has it
    (saves loading it again; a frame of another selection gives wrong identity columns)."""
    with _opened(db, results) as d:
        runs = (load(d, grid, study, spec=False) if runs is None else runs)[["run_id", "key", "variant", "seed", "hyper"]]
        ids = _run_ids(grid, study)
        q = select(Metric.run_id, Metric.name, Metric.step, Metric.value).where(Metric.step.is_not(None))
        if ids is not None:
            q = q.where(Metric.run_id.in_(ids))
        if names is not None:
            q = q.where(Metric.name.in_(list(names)))
        with d.engine.connect() as conn:
            rows = _raw(conn.execute(q))
    long = _frame(rows, ["run_id", "name", "step", "value"])
    out = runs.merge(long, on="run_id", how="inner")
    return out.sort_values(["run_id", "name", "step"], kind="stable").reset_index(drop=True)


def artifacts(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None,
              kind: Optional[str] = None, results: Optional[Path] = None,
              runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Files runs produced: ``run_id, key, variant, seed, hyper, status, kind, path``. ``runs``:
    as for :func:`curves`."""
    with _opened(db, results) as d:
        runs = (load(d, grid, study, spec=False) if runs is None else runs)[
            ["run_id", "key", "variant", "seed", "hyper", "status"]]
        q = select(Artifact.run_id, Artifact.kind, Artifact.path)
        if kind is not None:
            q = q.where(Artifact.kind == kind)
        with d.engine.connect() as conn:
            rows = conn.execute(q).all()
    arts = _frame(rows, ["run_id", "kind", "path"])
    return runs.merge(arts, on="run_id", how="inner").reset_index(drop=True)

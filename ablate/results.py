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

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .db.read import DbArg, Reader, as_datetimes, reading

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RUN_COLUMNS", "artifacts", "curves", "flatten", "higher_is_better", "load", "load_columns", "run_specs"]

# the identity columns of ``load``; every other column is a spec key (dotted) or a metric
# (``config_key``: runs sharing it are seeds of one configuration; ``fingerprint``: the code
# that produced the run, None where unknown)
RUN_COLUMNS = ["run_id", "key", "config_key", "grid", "variant", "seed", "status", "error", "hyper", "host",
               "code_rev", "fingerprint", "created_at", "started_at", "finished_at"]

# direction of a metric, decided by its name: the first rule that matches wins
_LOWER = ("fid", "kid", "loss", "blank_rate", "fragment_rate", "peak_mem", "mse", "wall_s", "train_s", "s_per_image")
_HIGHER = ("align", "acc", "clip", "per_s", "throughput", "score", "precision", "recall")

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


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"width": 96, "params": {"scan": "x"}}}`` -> ``{"model.width": 96,
    "model.params.scan": "x"}``; empty sub-dicts vanish, lists stay values."""
    out: dict[str, Any] = {}
    _flatten_into(out, spec, prefix)
    return out


def _flatten_into(out: dict[str, Any], spec: dict[str, Any], prefix: str) -> None:
    for k, v in spec.items():
        if isinstance(v, dict):
            _flatten_into(out, v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v


def _hyper(overrides: Optional[dict]) -> str:
    """The grid's overrides of a cell but the variant (the seed is never among them), as
    ``key=value, ...`` sorted by key: the hyperparameters that differ from the grid's base."""
    items = {k: v for k, v in (overrides or {}).items() if k not in ("model.variant", "seed")}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                     for k, v in sorted(items.items()))


def _json(value: Any) -> Any:
    """A JSON column's value: SQLite hands back its text, PostgreSQL's driver the parsed value."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _unkeyed_config_keys(r: Reader, ids: list[int]) -> dict[int, str]:
    """Configuration keys of runs stored without one (written around ``Database.register``, as
    ``ablate bench table`` does): a hash of the stored spec without its seed, taken as stored
    (validating 10,000 specs into :func:`ablate.config.config_key` would take seconds). SQLite
    and PostgreSQL drop the seed in SQL and hand back text, skipping JSON parsing in Python."""
    import hashlib

    if r.dialect == "sqlite":
        pairs = r.rows("SELECT id, json_remove(spec, '$.seed') FROM runs WHERE config_key IS NULL")
    elif r.dialect == "postgresql":
        pairs = r.rows("SELECT id, CAST(CAST(spec AS JSONB) - 'seed' AS TEXT) FROM runs WHERE config_key IS NULL")
    else:
        pairs = [(rid, json.dumps({k: v for k, v in _json(spec).items() if k != "seed"}, sort_keys=True))
                 for rid, spec in r.rows("SELECT id, spec FROM runs WHERE config_key IS NULL")]
    wanted = set(ids)
    return {rid: "spec-" + hashlib.sha256(str(text).encode()).hexdigest()[:11] for rid, text in pairs
            if rid in wanted}


def run_specs(db: DbArg, run_ids: Sequence[int], results: Optional[Path] = None) -> dict[int, dict]:
    """``{run_id: flattened spec without the seed}`` of the given runs only (the table asks for
    one run per configuration, so it never loads every spec)."""
    ids = [int(i) for i in dict.fromkeys(run_ids)]
    out: dict[int, dict] = {}
    with reading(db, results) as r:
        for i in range(0, len(ids), 500):  # bounded IN lists
            for rid, spec in r.rows("SELECT id, spec FROM runs WHERE id IN (:ids)", ids=ids[i:i + 500]):
                out[rid] = flatten({k: v for k, v in (_json(spec) or {}).items() if k != "seed"})
    return out


def run_ids_sql(grid: Optional[str], study: Optional[str]) -> tuple[Optional[str], dict[str, str]]:
    """A sub-select of the run ids in ``grid`` and ``study`` and its parameters (None: no filter)."""
    if study is None:
        return ("SELECT run_id FROM grid_runs WHERE grid = :grid", {"grid": grid}) if grid is not None else (None, {})
    in_study = "SELECT run_id FROM study_runs WHERE study = :study"
    if grid is None:
        return in_study, {"study": study}
    return (f"SELECT run_id FROM grid_runs WHERE grid = :grid AND run_id IN ({in_study})",
            {"grid": grid, "study": study})


def _check_study(r: Reader, study: str) -> None:
    """A study filter must name a study this database records (one line otherwise)."""
    from .db import DBError

    names = sorted({s for s, in r.rows("SELECT DISTINCT study FROM study_runs")}) if r.has_table("study_runs") else []
    if study not in names:
        known = f"known studies: {', '.join(names)}" if names else \
            "this database records no studies yet (studies are written by `ablate study`)"
        raise DBError(f"--study: no study named {study!r}; {known}")


def _pivot(rows: Sequence[tuple], run_ids: Sequence[int]) -> dict[str, list[float]]:
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
        column[i] = value if type(value) is float else float(value)
    return {name: columns[name] for name in sorted(columns)}


_RUNS_SQL = ("SELECT id, key, config_key, grid, variant, seed, status, error, CAST(overrides AS TEXT), host, "
             "code_rev, fingerprint, created_at, started_at, finished_at{spec} FROM runs{where} ORDER BY id")


def _read(r: Reader, grid: Optional[str], study: Optional[str], spec: bool,
          metrics: Optional[Sequence[str]]) -> tuple[dict[str, list], Optional[list[dict]], dict[str, list[float]]]:
    """What :func:`load` and :func:`load_columns` return, as ``({column: values} of
    RUN_COLUMNS, flat specs (with ``spec``), {metric: values})``, read in one transaction."""
    if study is not None:
        _check_study(r, study)
    ids, params = run_ids_sql(grid, study)
    where = f" WHERE id IN ({ids})" if ids else ""
    # the overrides as stored text: runs of one configuration share it, so it is parsed once
    rows = r.rows(_RUNS_SQL.format(spec=", CAST(spec AS TEXT)" if spec else "", where=where), **params)
    overrides = dict(r.rows("SELECT run_id, CAST(overrides AS TEXT) FROM grid_runs WHERE grid = :grid",
                            grid=grid)) if grid is not None else {}
    mq = "SELECT run_id, name, value FROM metrics WHERE step IS NULL"
    if metrics is not None:
        mq += " AND name IN (:names)"
        params = {**params, "names": list(dict.fromkeys(metrics))}
    final = r.rows(mq + (f" AND run_id IN ({ids})" if ids else ""), **params)
    raw = [list(c) for c in zip(*rows)] if rows else [[] for _ in range(len(RUN_COLUMNS) + spec)]
    cols = dict(zip(RUN_COLUMNS, raw))
    run_ids, cks = cols["run_id"], cols["config_key"]
    if None in cks:  # rows written around Database.register (none are, by ablate itself)
        keys = _unkeyed_config_keys(r, [rid for rid, ck in zip(run_ids, cks) if ck is None])
        cols["config_key"] = [ck if ck is not None else keys.get(rid, f"spec-run{rid}")
                              for rid, ck in zip(run_ids, cks)]
    if grid:
        cols["grid"] = [grid] * len(run_ids)
    cols["error"] = [e.strip().splitlines()[0] if e and e.strip() else "" for e in cols["error"]]
    texts = [overrides.get(rid, t) for rid, t in zip(run_ids, cols["hyper"])] if overrides else cols["hyper"]
    hypers = {t: _hyper(json.loads(t) if t is not None else None) for t in set(texts)}
    cols["hyper"] = list(map(hypers.__getitem__, texts))
    for c in ("created_at", "started_at", "finished_at"):
        cols[c] = as_datetimes(cols[c])
    specs = [flatten({k: v for k, v in _json(text).items() if k != "seed"}) for text in raw[-1]] if spec else None
    wide = {name: v for name, v in _pivot(final, run_ids).items() if name not in RUN_COLUMNS}
    return cols, specs, wide


def load_columns(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None, spec: bool = True,
                 results: Optional[Path] = None, metrics: Optional[Sequence[str]] = None) -> dict[str, list]:
    """:func:`load` without pandas: ``{column: values}`` in :func:`load`'s column order, one value
    per run (missing: None, NaN for metrics; a spec key some runs lack: None for them)."""
    with reading(db, results) as r:
        columns, specs, wide = _read(r, grid, study, spec, metrics)
    if specs:
        for key in dict.fromkeys(k for flat in specs for k in flat):
            if key not in RUN_COLUMNS:
                columns[key] = [flat.get(key) for flat in specs]
    columns.update(wide)
    return columns


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
    import numpy as np
    import pandas as pd

    with reading(db, results) as r:
        columns, specs, wide = _read(r, grid, study, spec, metrics)
    frame = pd.DataFrame(list(zip(*columns.values())), columns=RUN_COLUMNS)
    parts = [frame]
    if specs:
        flat = pd.DataFrame.from_records(specs)
        parts.append(flat.drop(columns=[c for c in flat.columns if c in RUN_COLUMNS]))
    if wide:
        parts.append(pd.DataFrame({name: np.array(v, dtype=float) for name, v in wide.items()}))
    return pd.concat(parts, axis=1) if len(parts) > 1 else frame


def _frame(rows: Sequence[Any], columns: list[str]) -> pd.DataFrame:
    """Plain tuples as a frame (SQLAlchemy rows would send pandas down a slow per-row path)."""
    import pandas as pd

    if not rows:
        return pd.DataFrame({c: [] for c in columns})
    return pd.DataFrame(rows, columns=columns)


def curves(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None,
           names: Optional[Sequence[str]] = None, results: Optional[Path] = None,
           runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Metrics by step, long form: ``run_id, key, variant, seed, hyper, name, step, value``,
    sorted by run, name and step. ``names`` limits the metrics (e.g. ``["train_loss", "val_loss"]``).
    ``runs``: :func:`load`'s frame of the same ``grid`` and ``study``, when the caller has it
    (saves loading it again; a frame of another selection gives wrong identity columns)."""
    with reading(db, results) as r:
        runs = (load(r, grid, study, spec=False) if runs is None else runs)[
            ["run_id", "key", "variant", "seed", "hyper"]]
        ids, params = run_ids_sql(grid, study)
        q = "SELECT run_id, name, step, value FROM metrics WHERE step IS NOT NULL"
        if ids is not None:
            q += f" AND run_id IN ({ids})"
        if names is not None:
            q += " AND name IN (:names)"
            params = {**params, "names": list(names)}
        rows = r.rows(q, **params)
    long = _frame(rows, ["run_id", "name", "step", "value"])
    out = runs.merge(long, on="run_id", how="inner")
    return out.sort_values(["run_id", "name", "step"], kind="stable").reset_index(drop=True)


def artifacts(db: DbArg = None, grid: Optional[str] = None, study: Optional[str] = None,
              kind: Optional[str] = None, results: Optional[Path] = None,
              runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Files runs produced: ``run_id, key, variant, seed, hyper, status, kind, path``. ``runs``:
    as for :func:`curves`."""
    with reading(db, results) as r:
        runs = (load(r, grid, study, spec=False) if runs is None else runs)[
            ["run_id", "key", "variant", "seed", "hyper", "status"]]
        q = "SELECT run_id, kind, path FROM artifacts" + (" WHERE kind = :kind" if kind is not None else "")
        rows = r.rows(q, **({"kind": kind} if kind is not None else {}))
    arts = _frame(rows, ["run_id", "kind", "path"])
    return runs.merge(arts, on="run_id", how="inner").reset_index(drop=True)

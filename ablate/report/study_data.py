"""An Optuna study as the HTML report's study page shows it: every trial (state, objective
values, parameters, the table row of its run), the optimisation history with the best value so
far per objective, fANOVA parameter importances (:func:`ablate.study.show.importances`) and the
axes of a parallel-coordinates plot (one per parameter, then one per objective).

Read from the database alone through Optuna (imported only when a study report is asked for).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..db import Database

__all__ = ["study_data"]


def _value(v: Any) -> Any:
    """A parameter value for JSON: numbers stay numbers (NaN/inf as None), the rest as text."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v
    return str(v)


def _axis(name: str, dist: Any, values: list[Any]) -> dict[str, Any]:
    """A parallel-coordinates axis for parameter ``name``: numeric (``log`` where the search is
    logarithmic) from its distribution's bounds, or categorical with its choices in order."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution) or any(isinstance(v, str) for v in values):
        choices = [str(_value(c)) for c in dist.choices] if isinstance(dist, CategoricalDistribution) else \
            sorted({str(v) for v in values})
        return {"name": name, "kind": "categorical", "choices": choices}
    nums = [v for v in values if isinstance(v, (int, float))]
    low = getattr(dist, "low", min(nums) if nums else 0.0)
    high = getattr(dist, "high", max(nums) if nums else 1.0)
    return {"name": name, "kind": "numeric", "log": bool(getattr(dist, "log", False)), "low": low, "high": high}


def study_data(db: Database, name: str, row_of_key: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """The study ``name`` (:func:`ablate.study.show.load`: a one-line StudyError when unknown)
    as ``{name, metrics, directions, counts, trials, history, importances, axes}``.

    ``trials``: ``{number, state, values (None unless complete), params, key, row}`` (``row``:
    the table row of the trial's run, from ``row_of_key`` {run key: row}); ``history``: per
    objective the complete trials' numbers, values and best value so far (by the objective's
    direction); ``importances``: per objective ``{"values": {param: importance}, "reason": why
    there are none}``."""
    from ..study.runner import counts
    from ..study.show import importances, load

    study = load(db, name)
    try:
        metrics = list(study.user_attrs.get("objectives") or
                       [f"objective{i}" for i in range(len(study.directions))])
        directions = [d.name.lower() for d in study.directions]
        links = db.study_runs(name)
        row_of_key = row_of_key or {}
        trials, all_values, dists = [], {}, {}
        for t in study.get_trials(deepcopy=False):
            key = links.get(t.number, (str(t.user_attrs.get("run_key", "")), ""))[0]
            complete = t.state.name == "COMPLETE" and t.values is not None
            trials.append({"number": t.number, "state": t.state.name,
                           "values": [_value(v) for v in t.values] if complete else None,
                           "params": {k: _value(v) for k, v in t.params.items()},
                           "key": key, "row": row_of_key.get(key)})
            for k, v in t.params.items():
                all_values.setdefault(k, []).append(v)
                dists.setdefault(k, t.distributions.get(k))
        history = []
        for i, (m, d) in enumerate(zip(metrics, directions)):
            done = [t for t in trials if t["values"] is not None and t["values"][i] is not None]
            best, bests = None, []
            for t in done:
                v = t["values"][i]
                best = v if best is None or (v < best if d == "minimize" else v > best) else best
                bests.append(best)
            history.append({"metric": m, "direction": d, "number": [t["number"] for t in done],
                            "value": [t["values"][i] for t in done], "best": bests})
        imps = {}
        for i, m in enumerate(metrics):
            got, why = importances(study, None if len(metrics) == 1 else i)
            imps[m] = {"values": {k: float(v) for k, v in got.items()}, "reason": "" if got else why}
        axes = [_axis(k, dists[k], vals) for k, vals in all_values.items()]
        return {"name": name, "metrics": metrics, "directions": directions, "counts": counts(study),
                "trials": trials, "history": history, "importances": imps, "axes": axes}
    finally:
        getattr(study._storage, "_backend", study._storage).engine.dispose()

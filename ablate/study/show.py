"""``ablate study show NAME``: the best trial (or the Pareto front), parameter importances, every
trial with its run, and Optuna's matplotlib plots, from the database alone."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, TextIO

from ..db import Database, safe_url
from .config import StudyError
from .runner import _fmt, _optuna, counts


def load(db: Database, name: str) -> Any:
    """The Optuna study ``name`` in ``db`` (one-line :class:`StudyError` when there is none)."""
    from sqlalchemy import inspect

    optuna = _optuna()
    if not inspect(db.engine).has_table("studies"):
        raise StudyError(f"no study named {name!r} in {safe_url(db.url)}: it holds no Optuna studies yet "
                         "(`ablate study FILE` makes one)")
    storage = optuna.storages.RDBStorage(db.url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        storage.engine.dispose()
        raise StudyError(f"no study named {name!r} in {safe_url(db.url)}; "
                         f"known studies: {', '.join(names) or '(none)'}")
    return optuna.load_study(study_name=name, storage=storage)


def importances(study: Any, target_index: Optional[int] = None) -> tuple[dict[str, float], str]:
    """fANOVA importances of the parameters (for objective ``target_index`` of a multi-objective
    study); ``({}, reason)`` when they cannot be computed (too few trials, one distinct value)."""
    optuna = _optuna()
    S = optuna.trial.TrialState
    done = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 complete trials (has {len(done)})"
    kw: dict[str, Any] = {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}
    if target_index is not None:
        kw["target"] = lambda t: t.values[target_index]
    try:
        return optuna.importance.get_param_importances(study, **kw), ""
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _trial_rows(trials: list, metrics: list[str], params: list[str], runs: dict[int, tuple[str, str]]) -> list[str]:
    head = ["#", "state", *metrics, *params, "run", "status"]
    rows = [head]
    for t in trials:
        vals = [_fmt(v) for v in t.values] if t.values else ["-"] * len(metrics)
        if t.state.name == "PRUNED" and t.last_step is not None:
            vals = [f"(step {t.last_step})"] + vals[1:]
        key, status = runs.get(t.number, (str(t.user_attrs.get("run_key", "-")), "-"))
        rows.append([str(t.number), t.state.name, *vals, *[_fmt(t.params.get(p, "-")) for p in params],
                     key[:12], status])
    return _table(rows)


def show(db: Database, name: str, plots_dir: Optional[Path] = None, out: Optional[TextIO] = None) -> dict:
    """Print the study's summary to ``out``; write plots under ``plots_dir`` when given.
    Returns ``{"best": [trial numbers], "importances": {...}, "plots": [paths]}``."""
    import sys

    optuna = _optuna()
    out = out or sys.stdout
    study = load(db, name)
    metrics = list(study.user_attrs.get("objectives") or [f"objective{i}" for i in range(len(study.directions))])
    dirs = [d.name.lower() for d in study.directions]
    c = counts(study)
    ua = study.user_attrs
    budget = ua.get("budget")
    p = print_to(out)
    p(f"study {name}  ({safe_url(db.url)})")
    p(f"objectives: {', '.join(f'{m} ({d})' for m, d in zip(metrics, dirs))}   sampler: {ua.get('sampler', '?')}   "
      f"pruner: {ua.get('pruner', '?')}")
    p(f"trials: {c['COMPLETE'] + c['PRUNED']} finished of budget {budget if budget is not None else '?'} "
      f"({c['COMPLETE']} complete, {c['PRUNED']} pruned), {c['FAIL']} failed, {c['RUNNING']} running, "
      f"{c['WAITING']} waiting")
    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    runs = db.study_runs(name)
    result: dict[str, Any] = {"best": [], "importances": {}, "plots": []}
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    p("")
    if not complete:
        p("best trial: none yet (no complete trial)")
    elif len(metrics) == 1:
        best = study.best_trial
        result["best"] = [best.number]
        key = runs.get(best.number, (str(best.user_attrs.get("run_key", "?")), ""))[0]
        p(f"best trial: #{best.number}  {metrics[0]} = {_fmt(best.value)}  (run {key[:12]})")
        for k, v in best.params.items():
            p(f"  {k:28s} {_fmt(v)}")
        extra = {k: v for k, v in (best.user_attrs.get("metrics") or {}).items() if k not in metrics}
        if extra:
            p("  its run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items()))
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        result["best"] = [t.number for t in front]
        p(f"Pareto front: {len(front)} of {len(complete)} complete trials")
        for line in _trial_rows(front, metrics, params, runs):
            p(line)

    p("")
    for i, m in enumerate(metrics):
        imp, why = importances(study, None if len(metrics) == 1 else i)
        result["importances"][m] = imp
        if not imp:
            p(f"parameter importances ({m}): not computable: {why}")
            continue
        p(f"parameter importances (fANOVA, {m}):")
        for k, v in imp.items():
            p(f"  {k:28s} {v:5.3f}  {'#' * int(round(v * 20))}")

    p("")
    p(f"trials ({len(trials)}):")
    for line in _trial_rows(trials, metrics, params, runs):
        p(line)
    if plots_dir is not None:
        result["plots"] = plot(study, metrics, Path(plots_dir), result["importances"])
        if result["plots"]:
            p("")
            p(f"plots in {plots_dir}: " + ", ".join(Path(x).name for x in result["plots"]))
    getattr(study._storage, "_backend", study._storage).engine.dispose()
    return result


def print_to(out: TextIO):
    def p(line: str = "") -> None:
        out.write(line + "\n")
    return p


def plot(study: Any, metrics: list[str], folder: Path, imps: dict[str, dict]) -> list[str]:
    """Optuna's matplotlib figures as PNG: optimisation history (per objective), Pareto front
    (2-3 objectives), parameter importances, intermediate values (pruned studies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vm

    folder.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, Any]] = []
    multi = len(metrics) > 1
    for i, m in enumerate(metrics):
        suffix = f"_{m}" if multi else ""
        target = (lambda t, i=i: t.values[i]) if multi else None
        figs.append((f"optimization_history{suffix}", lambda target=target, m=m:
                     vm.plot_optimization_history(study, target=target, target_name=m)))
        if imps.get(m):
            figs.append((f"param_importances{suffix}", lambda target=target, m=m:
                         vm.plot_param_importances(study, target=target, target_name=m)))
    if multi and len(metrics) in (2, 3):
        figs.append(("pareto_front", lambda: vm.plot_pareto_front(study, target_names=metrics)))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        figs.append(("intermediate_values", lambda: vm.plot_intermediate_values(study)))
    written = []
    for name, make in figs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = make()
            except (ValueError, RuntimeError):
                continue
        ax0 = ax.flat[0] if hasattr(ax, "flat") else ax
        path = folder / f"{name}.png"
        ax0.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(ax0.figure)
        written.append(str(path))
    return written

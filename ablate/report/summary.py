"""The results table in plain Python: what ``ablate table`` runs, without pandas or numpy.

:func:`build` reads the runs (:func:`ablate.results.load_columns`), :func:`summarize` pools them
into rows, both as :mod:`ablate.report.table` documents (rows are configurations within one code
fingerprint, absent metrics stay absent, marks only where a Welch test backs them); the result is
a :class:`Table` of columns, which :mod:`ablate.report.render` turns into text and
:meth:`Table.frame` into the pandas frame that :func:`ablate.report.table.build_table` returns.

This is the fast path; :func:`ablate.report.table.summarize_ref` is its pandas reference twin,
and tests/test_table_fast.py holds them equal, number for number. The means are pandas'
(Kahan-compensated sums in run order) and the stds pandas' (Welford's update), so every figure
has the reference's bits; the t quantiles are :mod:`ablate.stats`'.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .. import stats
from ..results import higher_is_better, load_columns, run_ids_sql, run_specs
from .naming import UNKNOWN_CODE, code_names, config_hypers, resolve_key, sort_value

if TYPE_CHECKING:
    import pandas as pd

    from ..db.read import Reader
    from ..registry import Registry

# (metric, column title, higher is better (None: no direction), format); the default columns
METRIC_COLUMNS: list[tuple[str, str, Optional[bool], str]] = [
    ("fid_domain", "FID (domain) ↓", False, "{:.1f}"),
    ("kid_domain", "KID (domain) ↓", False, "{:.4f}"),
    ("precision_domain", "Precision (domain) ↑", True, "{:.3f}"),
    ("recall_domain", "Recall (domain) ↑", True, "{:.3f}"),
    ("fid", "FID ↓", False, "{:.1f}"),
    ("align_acc", "Align acc ↑", True, "{:.3f}"),
    ("align_acc_heldout", "Align acc held-out ↑", True, "{:.3f}"),
    ("clip_score", "CLIP score ↑", True, "{:.3f}"),
    ("clip_domain", "CLIP (domain) ↑", True, "{:.1f}"),
    ("blank_rate", "Blank ↓", False, "{:.3f}"),
    ("fragment_rate", "Fragments ↓", False, "{:.3f}"),
    ("train_tokens_per_s", "Train tok/s ↑", True, "{:.0f}"),
    ("sample_images_per_s", "Sample img/s ↑", True, "{:.1f}"),
    ("peak_mem_mb", "Peak MiB ↓", False, "{:.0f}"),
    ("params", "Params", None, "{:,.0f}"),
]
FORMATS = ("markdown", "csv", "latex", "html", "json")
# recorded by runs that trained on several processes or accumulated micro-batches: shown with
# the Hyperparameters (a run's key does not hold the launcher, so the table says it)
SCALE = {"world_size": "ranks", "global_batch": "global batch"}
# recorded by CPU runs: the process's CPU time over what its threads could use (ablate.train.
# cpu_share). Below CONTENDED a neighbour shared the cores while the run was timed, and the row's
# Notes say so: its throughput and times measure the machine's load, not the method
SHARES = {"train_cpu_share": "training", "sample_cpu_share": "sampling"}
CONTENDED = 0.8
# the row keys without --group-by: one configuration, one code version
CONFIG_GROUP = ("variant", "config_key", "fingerprint")
FINISHED = ("done", "superseded")  # statuses whose metrics count (superseded: only when asked for)
_KNOWN = {m: (title, hib, fmt) for m, title, hib, fmt in METRIC_COLUMNS}
SPEC_FREE = ("variant", "method", "Method", "model.variant", "hyper", "seed", "config", "config_key", "fingerprint")


def metric_column(metric: str) -> tuple[str, Optional[bool], str]:
    """(title, higher is better, format) of ``metric``: the defaults' own, else its name with
    the arrow of :func:`higher_is_better` and 4 significant digits."""
    if metric in _KNOWN:
        return _KNOWN[metric]
    hib = higher_is_better(metric)
    return metric + {True: " ↑", False: " ↓", None: ""}[hib], hib, "{:.4g}"


def table_metrics(metrics: Optional[Sequence[str]] = None) -> list[str]:
    """The final metrics a table of ``metrics`` (None: the default columns, those present) can
    show, and the launcher's scale its Hyperparameters name: what :func:`build` loads."""
    return [*(metrics if metrics is not None else [m for m, *_ in METRIC_COLUMNS]), *SCALE, *SHARES]


def missing(v: Any) -> bool:
    """None, or a NaN (pandas' NaN and NaT included): a value the table leaves absent."""
    return v is None or v != v


class Table:
    """Equally long columns in order, and ``attrs`` (``metrics``, ``group_by``, ``best``,
    ``tied``, ``baseline``): the numeric table of :func:`summarize`, as the pandas frame of
    :func:`ablate.report.table.build_table` holds it. Absent values are None or NaN."""

    def __init__(self, columns: dict[str, list], attrs: Optional[dict] = None):
        self.data = columns
        self.attrs = dict(attrs or {})

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def __getitem__(self, name: str) -> list:
        return self.data[name]

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def __len__(self) -> int:
        return len(next(iter(self.data.values()), ()))

    def insert(self, at: int, name: str, values: list) -> None:
        items = list(self.data.items())
        items.insert(at, (name, values))
        self.data = dict(items)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Table:
        """A pandas table (:func:`ablate.report.table.build_table`'s) as a Table."""
        return cls({c: frame[c].tolist() for c in frame.columns}, frame.attrs)

    def frame(self) -> pd.DataFrame:
        """This table as :func:`ablate.report.table.build_table`'s pandas frame."""
        import pandas as pd

        out = pd.DataFrame(self.data, columns=self.columns)
        out.attrs.update(self.attrs)
        return out


# -- reading ---------------------------------------------------------------------------------------

def config_specs(r: Reader, runs: dict[str, list]) -> dict[str, dict]:
    """``{config_key: flat spec}`` (:func:`ablate.results.run_specs`) for :func:`config_hypers`:
    one run's spec (its first run's) per configuration, of the variants with several
    configurations in ``runs`` only (the others need no name for what differs)."""
    configs: dict[str, set] = {}
    first: dict[str, int] = {}
    for v, ck, rid in zip(runs["variant"], runs["config_key"], runs["run_id"]):
        configs.setdefault(v, set()).add(ck)
        if ck not in first or rid < first[ck]:
            first[ck] = rid
    wanted = sorted({ck for v, cks in configs.items() if len(cks) > 1 for ck in cks})
    by_run = run_specs(r, [first[ck] for ck in wanted]) if wanted else {}
    return {ck: by_run[first[ck]] for ck in wanted if first[ck] in by_run}


def config_paradigms(r: Reader, grid: Optional[str], study: Optional[str]) -> dict[str, str]:
    """``{config_key: model.paradigm}`` of the selection's runs, in one query (the spec's JSON
    path; ``masked`` where a spec predates the field). A configuration key fixes the spec but
    the seed, so one run's spec per configuration says it (10x fewer specs read than runs)."""
    ids, params = run_ids_sql(grid, study)
    first = "SELECT min(id) FROM runs WHERE config_key IS NOT NULL" + (f" AND id IN ({ids})" if ids else "") + \
        " GROUP BY config_key"
    if r.dialect == "sqlite":
        path = "json_extract(spec, '$.\"model\".\"paradigm\"')"
    elif r.dialect == "postgresql":
        path = "spec #>> '{model,paradigm}'"
    else:
        path = None
    rows = r.rows(f"SELECT config_key, {path or 'spec'} FROM runs WHERE id IN ({first})", **params)
    if path is None:  # other databases: the spec's JSON read here
        rows = [(ck, (json.loads(s) if isinstance(s, str) else s).get("model", {}).get("paradigm")) for ck, s in rows]
    return {ck: p or "masked" for ck, p in rows if ck is not None}


def add_paradigm(table: Table, paradigms: dict[str, str]) -> None:
    """A Paradigm column after Method, in place, where the rows do not all generate one way
    (masked only: no column, the tables of before)."""
    col = [paradigms.get(ck, "masked") if isinstance(ck, str) else "-" for ck in table["config_key"]]
    if any(p not in ("masked", "-") for p in col):
        table.insert(1, "Paradigm", col)


def build(r: Reader, grid: Optional[str] = None, registry: Optional[Registry] = None,
          study: Optional[str] = None, metrics: Optional[Sequence[str]] = None,
          group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
          baseline: Optional[str] = None, include_superseded: bool = False,
          runs: Optional[dict[str, list]] = None, specs: Optional[dict[str, dict]] = None) -> Table:
    """The numeric results table of the database ``r`` reads: what
    :func:`ablate.report.table.build_table` documents, as a :class:`Table`. ``runs``:
    :func:`ablate.results.load_columns`' columns (``spec=False``) of the same selection, when the
    caller has them."""
    from .catalog import catalog

    need_spec = any(k not in SPEC_FREE for k in (group_by or ()))
    if runs is None or need_spec:
        # the metrics the table can show, not all (a run may record many more); a --metrics name
        # missing from them loads all, for the error's list of what is present
        runs = load_columns(r, grid, study, spec=need_spec, metrics=None if group_by else table_metrics(metrics))
        if metrics is not None and not set(metrics) <= set(runs):
            runs = load_columns(r, grid, study, spec=need_spec)
    if not include_superseded and "superseded" in runs["status"]:
        keep = [i for i, s in enumerate(runs["status"]) if s != "superseded"]
        runs = {c: [v[i] for i in keep] for c, v in runs.items()}
    n = len(runs["run_id"])
    if group_by or not n:
        specs = None
    elif specs is None:
        specs = config_specs(r, runs)
    names = catalog(registry, tuple(dict.fromkeys(runs["variant"])))
    table = summarize(runs, names, metrics, group_by, sort, all_variants=grid is None and study is None,
                      specs=specs, overrides=grid is not None or study is not None, baseline=baseline)
    if not group_by and n:
        add_paradigm(table, config_paradigms(r, grid, study))
    return table


# -- summarising -----------------------------------------------------------------------------------

def _numbers(values: list) -> Optional[bool]:
    """What pandas makes of a column of these values: True for float64 (floats, or ints with
    absent values), False for int64, None for anything else (object, str, bool)."""
    floats = ints = absent = False
    for v in values:
        if v is None:
            absent = True
        elif isinstance(v, float):
            floats = True
        elif isinstance(v, int) and not isinstance(v, bool):
            ints = True
        else:
            return None
    if floats or (ints and absent):
        return True
    return False if ints else None


def _floats(values: list) -> list[float]:
    return [v if type(v) is float else math.nan if v is None else float(v) for v in values]


def _key_values(values: list) -> list:
    """Group keys as pandas groups them: numbers as their column's dtype (ints beside absent
    values are floats), lists as their JSON text, absent values as ``-``."""
    if _numbers(values):
        values = _floats(values)
    return ["-" if missing(v) else json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """pandas' groupby mean (a Kahan-compensated sum in order) and std (ddof=1, Welford's
    update; NaN for one value) of non-NaN ``values``, to the bit."""
    total = comp = mean = m2 = 0.0
    k = 0
    for v in values:
        k += 1
        y = v - comp
        t = total + y
        comp = t - total - y
        if comp != comp:  # an infinite value: keep the sum infinite, not NaN
            comp = 0.0
        total = t
        old = mean
        mean += (v - old) / k
        m2 += (v - mean) * (v - old)
    if not k:
        return math.nan, math.nan
    var = m2 / (k - 1) if k > 1 else math.nan
    return total / k, math.sqrt(var) if var >= 0 else math.nan  # (libc's sqrt: NaN below 0, as pandas')


# -- what both twins share: the row keys and order, the texts of a row, the columns, the sort ---------

def row_keys_of(columns: Sequence[str], group_by: Optional[Sequence[str]]) -> tuple[list[str], list[str]]:
    """``(keys, row keys)``: the keys a row stands for (``variant`` and the ``group_by`` keys
    resolved, or a configuration and its code), and the columns that tell rows apart."""
    if group_by:
        keys = list(dict.fromkeys(["variant"] + [resolve_key(columns, k, "--group-by") for k in group_by]))
        return keys, keys + ["_stale"]
    return list(CONFIG_GROUP), ["variant", "config_key", "_code"]


def no_metric(name: str, present: Sequence[str]) -> ValueError:
    return ValueError(f"--metrics: no final metric {name!r} in these runs (present: {', '.join(present) or 'none'})")


def placer(pooled: bool, hypers: dict[str, tuple], newest_of: dict[str, str], descriptions: dict[str, str]):
    """The sort key of a row's key tuple: variants with runs in registry order (then
    unregistered ones by name), a variant's rows by what differs, current code first."""
    order = {name: i for i, name in enumerate(descriptions)}

    def place(t: tuple) -> tuple:
        if pooled:
            rest = [sort_value(v) for v in t[1:-1]]
        else:
            rest = [hypers.get(t[1], ((), ("",)))[1]]
        older = bool(t[-1]) if pooled else t[-1] != newest_of.get(t[1], t[-1])
        return (order.get(t[0], len(order)), t[0], rest, older, t[-1])

    return place


def describe(key: tuple, row_keys: Sequence[str], keys: Sequence[str], extra: Sequence[str], counts: dict[str, int],
             n_configs: int, ck: Optional[str], fps: Sequence[str], scale: dict[str, list[int]], first_error: Any,
             numbers: dict[str, Any], hypers: dict[str, tuple], newest_of: dict[str, str],
             versions_of: dict[str, int], descriptions: dict[str, str],
             shares: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """A row of runs: ``key`` (its ``row_keys`` values), ``counts`` ({status: runs}), its number
    of configurations (``ck``: the configuration key where it is one), ``fps`` (its finished
    runs' code, sorted), ``scale`` ({SCALE name: sorted distinct values}), the first failed
    run's error, ``numbers`` (its metric columns), ``shares`` ({SHARES name: the lowest of its
    finished runs, NaN for none}), and the texts around them."""
    variant, at = key[0], dict(zip(row_keys, key))
    pooled = row_keys[-1] == "_stale"
    done_i, super_i, failed_i = counts.get("done", 0), counts.get("superseded", 0), counts.get("failed", 0)
    fin_i = done_i + super_i
    if fin_i:
        trained = f"Yes ({fin_i}{f', {super_i} superseded' if super_i else ''})"
    elif failed_i:
        trained = f"Failed ({failed_i})"
    elif any(counts.values()):
        trained = "No (" + ", ".join(f"{c} {st}" for st, c in counts.items() if c) + ")"
    else:
        trained = "No"
    row: dict[str, Any] = {"Method": variant, "Implemented": "Yes" if variant in descriptions else "No",
                           "Trained": trained, **{k: at[k] for k in extra}, "n": fin_i, **numbers}
    older = bool(at["_stale"]) if pooled else (ck is not None and at["_code"] != newest_of.get(ck, at["_code"]))
    if pooled:
        parts = [at[k] if k == "hyper" else f"{k}={at[k]}" for k in keys[1:]]
        hyper = ", ".join(x for x in parts if x not in ("", "-")) or "base"
        if n_configs > 1:
            hyper += f" (pooled over {n_configs} configs)"
    else:
        hyper = hypers.get(ck, ("base",))[0]
    for m, label in SCALE.items():
        if scale[m] and scale[m] != [1]:
            hyper += f", {label}={'|'.join(map(str, scale[m]))}"
    notes = [descriptions.get(variant, "variant no longer registered")]
    if older:
        notes.append(f"older code ({code_names(fps)})")
    elif ck is not None and len(fps) == 1 and versions_of.get(ck, 1) > 1:
        notes.append(f"newest code ({code_names(fps)})")
    if fin_i == 1:
        notes.append("n=1: no interval")
    low = [f"{label} {v:.2f}" for m, label in SHARES.items() if (v := (shares or {}).get(m, math.nan)) < CONTENDED]
    if low:
        notes.append(f"timed on a shared CPU (lowest CPU share: {', '.join(low)}): its speed figures are the load's")
    if failed_i and isinstance(first_error, str):
        notes.append(f"failed: {first_error}")
    row.update(Hyperparameters=hyper, Notes=" — ".join(notes), config_key=ck,
               fingerprint=None if len(fps) != 1 or fps[0] == UNKNOWN_CODE else fps[0], older_code=older)
    return row


def never_row(name: str, extra: Sequence[str], metrics: Sequence[str], descriptions: dict[str, str]) -> dict[str, Any]:
    """The row of a registered variant that never ran."""
    return {"Method": name, "Implemented": "Yes", "Trained": "No", **{k: "-" for k in extra}, "n": 0,
            **{c: v for m in metrics for c, v in ((m, math.nan), (f"{m}_std", math.nan), (f"{m}_n", 0))},
            "Hyperparameters": "-", "Notes": descriptions[name], "config_key": None, "fingerprint": None,
            "older_code": False}


def table_columns(extra: Sequence[str], metrics: Sequence[str], baseline: Optional[str]) -> list[str]:
    per_metric = ["", "_std", "_n", "_ci95_low", "_ci95_high"]
    if baseline is not None:
        per_metric += ["_diff", "_diff_ci95_low", "_diff_ci95_high", "_significant"]
    return ["Method", "Implemented", "Trained", *extra, "n", *[m + suffix for m in metrics for suffix in per_metric],
            "Hyperparameters", "Notes", *[c for c in ("config_key", "fingerprint") if c not in extra], "older_code"]


def sort_order(sort: str, metrics: Sequence[str], extra: Sequence[str]) -> tuple[str, bool]:
    """``(column, ascending)`` of ``--sort``: a metric best first, any other column ascending,
    ``-`` reversing either; a one-line ValueError for an unknown key."""
    reverse, key = sort.startswith("-"), sort.lstrip("-")
    if key in metrics:
        hib = metric_column(key)[1]
        ascending = not hib if hib is not None else False
    else:
        candidates = {"Method": "Method", "variant": "Method", "Trained": "Trained", "n": "n",
                      "Hyperparameters": "Hyperparameters", **{k: k for k in extra}}
        ends = [k for k in extra if k.endswith("." + key)]
        key = candidates.get(key) or (ends[0] if len(ends) == 1 else None)
        if key is None:
            raise ValueError(f"--sort: unknown key {sort!r} (accepted: a metric column "
                             f"({', '.join(metrics) or 'none'}), Method, Trained, n, Hyperparameters"
                             f"{', ' + ', '.join(extra) if extra else ''}; prefix - to reverse)")
        ascending = True
    return key, ascending != reverse


def pick_baseline(table: Any, which: str) -> dict[str, Any]:
    """The row ``which`` names in ``table`` (its ``Method``, ``Trained``, ``config_key``,
    ``older_code`` and ``Hyperparameters`` columns): a variant with one configuration (and
    current code) in the table, or a configuration key or prefix of one; a one-line ValueError
    otherwise."""
    keys, methods, hypers = list(table["config_key"]), list(table["Method"]), list(table["Hyperparameters"])
    # rows of runs (a row pooling several configurations has no config_key), not never-run variants
    ran = [not missing(ck) or t != "No" for ck, t in zip(keys, table["Trained"])]
    current = [r and not old for r, old in zip(ran, table["older_code"])]

    def listing(pos: Sequence[int]) -> str:
        return "; ".join(f"{'(pooled)' if missing(keys[i]) else keys[i]} ({hypers[i]})" for i in pos)

    by_variant = [i for i, ok in enumerate(current) if ok and methods[i] == which] or \
        [i for i, ok in enumerate(ran) if ok and methods[i] == which]
    if by_variant:
        if len(by_variant) > 1:
            raise ValueError(f"--baseline: variant {which!r} has {len(by_variant)} configurations in this table: "
                             f"{listing(by_variant)}; name one by its config key (a prefix is enough)")
        row = by_variant[0]
        return dict(label=which, row=row, config_key=keys[row])
    match = [i for i, ok in enumerate(current) if ok and not missing(keys[i]) and str(keys[i]).startswith(which)]
    if len(match) == 1:
        row = match[0]
        return dict(label=f"{methods[row]} [{which}]", row=row, config_key=keys[row])
    if match:
        raise ValueError(f"--baseline: config key prefix {which!r} matches {len(match)} rows: {listing(match)}; "
                         "give more of the key")
    variants = ", ".join(dict.fromkeys(m for m, ok in zip(methods, ran) if ok)) or "none"
    raise ValueError(f"--baseline: no variant or config key {which!r} in this table (variants: {variants})")


def summarize(runs: dict[str, list], descriptions: dict[str, str], metrics: Optional[Sequence[str]] = None,
              group_by: Optional[Sequence[str]] = None, sort: Optional[str] = None,
              all_variants: bool = True, specs: Optional[dict[str, dict]] = None, overrides: bool = False,
              baseline: Optional[str] = None) -> Table:
    """The numeric table of ``runs`` (:func:`ablate.results.load_columns`' columns), as
    :func:`ablate.report.table.summarize` documents it (its arguments, columns and attrs)."""
    pooled = bool(group_by)
    n_runs = len(runs["run_id"])
    keys, row_keys = row_keys_of(list(runs), group_by)
    if metrics is None:
        metrics = [m for m, *_ in METRIC_COLUMNS if m in runs and not all(map(missing, runs[m]))]
    else:
        absent = [m for m in metrics if m not in runs]
        if absent and n_runs:
            raise no_metric(absent[0], sorted(c for c, v in runs.items() if c not in keys and _numbers(v) is True))
        metrics = list(metrics)
    data = {c: runs[c] for c in dict.fromkeys(keys + ["config_key", "fingerprint", "status", "error", "hyper",
                                                     "finished_at", "run_id"])}
    values = {m: _floats(runs[m]) if m in runs else [math.nan] * n_runs for m in metrics}
    scale_of = {m: _floats(runs[m]) if m in runs else [math.nan] * n_runs for m in (*SCALE, *SHARES)}
    for k in keys:
        if k != "fingerprint":
            data[k] = _key_values(data[k])

    # the code identity of each run: its fingerprint, and its configuration's newest code (that
    # of the latest finished run); a finished run joins the row of its own code, an unfinished
    # one (no numbers) its configuration's current-code row
    fps = [UNKNOWN_CODE if missing(f) else f for f in data["fingerprint"]]
    finished = [s in FINISHED for s in data["status"]]
    latest: dict[str, tuple] = {}
    for ck, fp, fin, when, rid in zip(data["config_key"], fps, finished, data["finished_at"], data["run_id"]):
        if fin:
            order = (False, 0, rid) if missing(when) else (True, when, rid)
            if ck not in latest or order > latest[ck][0]:
                latest[ck] = (order, fp)
    newest_of = {ck: fp for ck, (_, fp) in latest.items()}
    stale = [fin and ck in newest_of and fp != newest_of[ck]
             for ck, fp, fin in zip(data["config_key"], fps, finished)]
    codes = [fp if fin else newest_of.get(ck, UNKNOWN_CODE) for ck, fp, fin in zip(data["config_key"], fps, finished)]
    data.update(_stale=stale, _code=codes)
    if "fingerprint" in keys:
        data["fingerprint"] = codes

    # one pass over the runs: each row's statuses, configurations, code versions, first error and
    # launcher scale; then per metric its finished runs' values (in run order, as pandas sums them)
    statuses = list(dict.fromkeys(data["status"]))
    group_of: dict[tuple, int] = {}
    index: list[tuple] = []
    row_of: list[int] = []  # each run's row
    per_status: list[dict[str, int]] = []
    configs: list[dict] = []
    code_sets: list[dict] = []
    first_error: list[Optional[str]] = []
    versions: dict[str, set] = {}
    for key, status, ck, fp, fin, error in zip(zip(*(data[k] for k in row_keys)), data["status"], data["config_key"],
                                             fps, finished, data["error"]):
        g = group_of.get(key)
        if g is None:
            g = group_of[key] = len(index)
            index.append(key)
            per_status.append(dict.fromkeys(statuses, 0))
            configs.append({})
            code_sets.append({})
            first_error.append(None)
        row_of.append(g)
        per_status[g][status] += 1
        configs[g].setdefault(ck, None)
        if status == "failed" and first_error[g] is None and not missing(error):
            first_error[g] = error
        if fin:
            code_sets[g].setdefault(fp, None)
            versions.setdefault(ck, set()).add(fp)
    done = [i for i, fin in enumerate(finished) if fin]
    done_rows = [row_of[i] for i in done]

    def by_row(column: list[float]) -> list[list[float]]:
        """The finished runs' values of ``column`` (not NaN), per row, in run order."""
        out: list[list[float]] = [[] for _ in index]
        for g, v in zip(done_rows, [column[i] for i in done]):
            if v == v:
                out[g].append(v)
        return out

    figures = {m: by_row(values[m]) for m in metrics}
    scale_sets = {m: by_row(scale_of[m]) for m in (*SCALE, *SHARES)}
    hypers = {} if pooled else config_hypers(data["variant"], data["config_key"], data["hyper"], specs, overrides)

    seen = {t[0] for t in index}
    never = [name for name in descriptions if name not in seen] if all_variants else []
    place = placer(pooled, hypers, newest_of, descriptions)
    groups = sorted(range(len(index)), key=lambda g: place(index[g]))
    versions_of = {ck: len(v) for ck, v in versions.items()}
    extra = [k for k in keys if k not in ("variant", "hyper", "config_key", "fingerprint")]
    rows = []
    for g in groups:
        numbers: dict[str, Any] = {}
        fin_i = per_status[g].get("done", 0) + per_status[g].get("superseded", 0)
        for m in metrics:
            mean, std = _mean_std(figures[m][g])
            numbers.update({m: mean if fin_i else math.nan, f"{m}_std": std if fin_i else math.nan,
                            f"{m}_n": len(figures[m][g])})
        ck = next(iter(configs[g])) if len(configs[g]) == 1 else None
        rows.append(describe(index[g], row_keys, keys, extra, per_status[g], len(configs[g]), ck, sorted(code_sets[g]),
                             {m: sorted({int(v) for v in scale_sets[m][g]}) for m in SCALE}, first_error[g],
                             numbers, hypers, newest_of, versions_of, descriptions,
                             {m: min(scale_sets[m][g], default=math.nan) for m in SHARES}))
    rows += [never_row(name, extra, metrics, descriptions) for name in never]
    columns = table_columns(extra, metrics, baseline)
    table = {c: [row[c] for row in rows] for c in columns if not c.endswith(("_ci95_low", "_ci95_high",
                                                                               "_significant", "_diff"))}
    for m in metrics:
        h = [stats.halfwidth(s, k) for s, k in zip(table[f"{m}_std"], table[f"{m}_n"])]
        table[f"{m}_ci95_low"] = [a - b for a, b in zip(table[m], h)]
        table[f"{m}_ci95_high"] = [a + b for a, b in zip(table[m], h)]
    if sort:
        table = _sorted(table, sort, metrics, extra)
    base = None
    if baseline is not None:
        base = pick_baseline(table, baseline)
        for m in metrics:
            _diff_columns(table, m, base["row"])
    out = Table({c: table[c] for c in columns})
    best, tied = _marks(out, metrics)
    out.attrs.update(metrics=list(metrics), group_by=keys, best=best, tied=tied, baseline=base)
    return out


def _sorted(table: dict[str, list], sort: str, metrics: Sequence[str], extra: Sequence[str]) -> dict[str, list]:
    """The rows sorted by ``sort`` as pandas' stable ``sort_values`` sorts them: absent values
    last, ties in their order."""
    key, ascending = sort_order(sort, metrics, extra)
    col = table[key]
    present = sorted((i for i, v in enumerate(col) if not missing(v)), key=col.__getitem__, reverse=not ascending)
    order = present + [i for i, v in enumerate(col) if missing(v)]
    return {c: [v[i] for i in order] for c, v in table.items()}


def _diff_columns(table: dict[str, list], m: str, row: int) -> None:
    """``<m>_diff`` (row minus baseline), its 95% Welch interval and ``<m>_significant``."""
    mean, std, n = table[m], table[f"{m}_std"], table[f"{m}_n"]
    diffs, lows, highs = [], [], []
    for i, (a, s, k) in enumerate(zip(mean, std, n)):
        diff, low, high, _ = stats.welch(a, s, k, mean[row], std[row], n[row])
        if i == row:  # the baseline against itself: no interval, no claim
            low = high = math.nan
        diffs.append(diff)
        lows.append(low)
        highs.append(high)
    table[f"{m}_diff"] = diffs
    table[f"{m}_diff_ci95_low"] = lows
    table[f"{m}_diff_ci95_high"] = highs
    table[f"{m}_significant"] = [low > 0 or high < 0 for low, high in zip(lows, highs)]


def _marks(table: Table, metrics: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """``(best, tied)``, each {metric: row positions}, for metrics with a direction and at least
    two different means. ``best``: the best mean, where it is significantly better (95% Welch)
    than every other row with a value (so never with n < 2 on either side). ``tied`` otherwise:
    the best and every row whose difference from it is not significant."""
    best, tied = {}, {}
    for m in metrics:
        hib = metric_column(m)[1]
        mean, std, n = table[m], table[f"{m}_std"], table[f"{m}_n"]
        valid = [k >= 1 and a == a for a, k in zip(mean, n)]
        shown = [a for a, ok in zip(mean, valid) if ok]
        if hib is None or len(shown) < 2 or min(shown) == max(shown):
            continue  # one value, or all equal: nothing stands out
        b = max((i for i, ok in enumerate(valid) if ok), key=lambda i: mean[i] if hib else -mean[i])
        sign = 1 if hib else -1  # the best is significantly better than row j: its interval lies on this side of 0
        worse = [j for j, ok in enumerate(valid) if ok and j != b and
                 stats.welch_side(mean[b], std[b], n[b], mean[j], std[j], n[j]) != sign]
        if n[b] >= 2 and not worse:
            best[m] = [b]
        else:
            tied[m] = [b] + worse
    return best, tied

"""The table tells the truth: rows are configurations (never two settings averaged together),
runs of different code are never pooled silently, every number carries its 95% interval, and
"best" is claimed only where a Welch test backs it. Runs are written through the harness's own
store (register, claim, finish) into a real SQLite database."""
from __future__ import annotations

import inspect
import json
import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
from sqlalchemy import update

from ablate import results
from ablate.cli import main
from ablate.config import RunSpec
from ablate.db import Database, Run
from ablate.report import build_table, display_table, render
from ablate.stats import t_halfwidth, welch_interval

T0 = datetime(2025, 1, 1)


def _owned(write, token, *args):
    """``write(*args)`` by the claiming attempt: with ``token=`` where the store takes one."""
    if "token" in inspect.signature(write).parameters:
        return write(*args, token=token)
    return write(*args)


def _spec(variant: str, seed: int, width: int = 128) -> dict:
    return RunSpec.model_validate({"model": {"variant": variant, "width": width}, "seed": seed}).model_dump(mode="json")


def _runs(db: Database, grid: str, variant: str, values: dict[str, list[float]], width: int = 128,
          fingerprint: str | None = None, finished_at: datetime = T0, first_seed: int = 0,
          overrides: dict | None = None) -> list[str]:
    """Register seeds ``first_seed, ...`` of one configuration in ``grid`` and finish them with
    ``values`` ({metric: one value per seed}), recorded as made by ``fingerprint`` at ``finished_at``."""
    n = len(next(iter(values.values())))
    cells = []
    for i in range(n):
        seed = first_seed + i
        key = f"{grid}-{variant}-{width}-{seed}"
        cells.append((key, variant, seed, _spec(variant, seed, width), {"model.variant": variant, **(overrides or {})}))
    db.register(grid, cells)
    for i, (key, *_) in enumerate(cells):
        tok = db.claim(key)
        assert tok
        _owned(db.finish, tok, key, {m: v[i] for m, v in values.items()})
        with db.tx() as s:  # provenance as the job would record it, and a known finishing time
            s.execute(update(Run).where(Run.key == key).values(fingerprint=fingerprint,
                                                                  finished_at=finished_at + timedelta(seconds=i)))
    return [c[0] for c in cells]


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path}/t.db")
    yield d
    d.close()


def _rows(t, method):
    return t[t["Method"] == method].reset_index(drop=True)


def test_config_key_is_filled_by_register(db):
    _runs(db, "g", "transformer", {"params": [1.0, 1.0]})
    df = results.load(db, spec=False)
    assert {"config_key", "fingerprint"} <= set(results.RUN_COLUMNS)
    assert df["config_key"].notna().all() and df["config_key"].nunique() == 1  # two seeds, one config


def test_two_configs_of_one_variant_are_two_rows_with_and_without_grid(db, tmp_path, capsys):
    # the reproduction: quickstart, then the same grid at another width under another name
    _runs(db, "quick", "transformer", {"params": [100.0] * 3, "align_acc": [0.5, 0.6, 0.7]}, width=32)
    _runs(db, "quick-w48", "transformer", {"params": [200.0] * 3, "align_acc": [0.1, 0.2, 0.3]}, width=48)
    t = build_table(db)
    tr = _rows(t, "transformer")
    assert len(tr) == 2 and sorted(tr["n"]) == [3, 3]
    assert dict(zip(tr["Hyperparameters"], tr["params"])) == {"model.width=32": 100.0, "model.width=48": 200.0}
    assert (tr["params_std"] == 0).all()  # never 150 ± 55 over two models
    assert tr["config_key"].nunique() == 2
    # each grid's table: its own configuration, its own params
    for grid, params in (("quick", 100.0), ("quick-w48", 200.0)):
        g = _rows(build_table(db, grid), "transformer")
        assert len(g) == 1 and g["params"][0] == params and g["Hyperparameters"][0] == "base"
    # a grid whose base was edited and rerun under the same name holds both: two rows there too
    _runs(db, "edited", "transformer", {"params": [100.0] * 2}, width=32, first_seed=10)
    _runs(db, "edited", "transformer", {"params": [200.0] * 2}, width=48, first_seed=10)
    e = _rows(build_table(db, "edited"), "transformer")
    assert sorted(zip(e["Hyperparameters"], e["params"])) == [("model.width=32", 100.0), ("model.width=48", 200.0)]
    # the CLI says the same
    url = f"sqlite:///{tmp_path}/t.db"
    assert main(["table", "--db", url, "--results", str(tmp_path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = [r for r in doc["rows"] if r["Method"] == "transformer"]
    assert sorted(r["metrics"]["params"]["mean"] for r in rows) == [100.0, 200.0]
    # pooling configurations only when asked, and then visibly
    pooled = _rows(build_table(db, group_by=["variant"]), "transformer")
    assert len(pooled) == 1 and "(pooled over 2 configs)" in pooled["Hyperparameters"][0]


def test_hyperparameters_name_only_what_differs_plus_the_grids_overrides(db):
    _runs(db, "g", "transformer", {"params": [1.0]}, width=32, overrides={"model.width": 32})
    _runs(db, "g", "transformer", {"params": [2.0]}, width=48, overrides={"model.width": 48})
    _runs(db, "g", "mamba-prefix", {"params": [3.0]}, width=64, overrides={"model.width": 64})
    whole = build_table(db)
    assert _rows(whole, "mamba-prefix")["Hyperparameters"][0] == "base"  # one config: nothing differs
    assert sorted(_rows(whole, "transformer")["Hyperparameters"]) == ["model.width=32", "model.width=48"]
    grid = build_table(db, "g")
    assert _rows(grid, "mamba-prefix")["Hyperparameters"][0] == "model.width=64"  # the grid's override


def test_different_code_is_split_and_the_older_marked(db):
    # old code (no fingerprint), then code "aaaa", then the newest "bbbb"; run ids do not follow
    # that order (the newest is decided by when runs finished)
    _runs(db, "g", "transformer", {"align_acc": [0.9, 0.9]}, fingerprint="b" * 16,
          finished_at=T0 + timedelta(days=2), first_seed=0)
    _runs(db, "g", "transformer", {"align_acc": [0.1, 0.2]}, fingerprint="a" * 16,
          finished_at=T0 + timedelta(days=1), first_seed=2)
    _runs(db, "g", "transformer", {"align_acc": [0.5]}, fingerprint=None, finished_at=T0, first_seed=4)
    db.register("g", [("pending-one", "transformer", 9, _spec("transformer", 9), {"model.variant": "transformer"})])
    t = build_table(db, "g", metrics=["align_acc"])
    tr = _rows(t, "transformer")
    assert len(tr) == 3 and tr["config_key"].nunique() == 1
    by_mean = {round(m, 2): r for m, r in zip(tr["align_acc"], tr.to_dict("records"))}
    assert set(by_mean) == {0.9, 0.15, 0.5}
    assert not by_mean[0.9]["older_code"] and by_mean[0.15]["older_code"] and by_mean[0.5]["older_code"]
    assert by_mean[0.9]["fingerprint"] == "b" * 16 and pd.isna(by_mean[0.5]["fingerprint"])
    assert "older code (fingerprint aaaaaaaa)" in by_mean[0.15]["Notes"]
    assert "older code" in by_mean[0.5]["Notes"] and "no fingerprint" in by_mean[0.5]["Notes"]
    assert "newest code (fingerprint bbbbbbbb)" in by_mean[0.9]["Notes"]
    assert by_mean[0.9]["Hyperparameters"] == by_mean[0.15]["Hyperparameters"] == "base"
    shown = display_table(t)
    assert sorted(shown["Method"]) == ["transformer", "transformer †", "transformer †"]
    assert "†: runs of older code" in render(t, "markdown")
    # grouping by other keys still keeps older code apart from the current code
    g = _rows(build_table(db, "g", metrics=["align_acc"], group_by=["variant"]), "transformer")
    assert sorted(g["older_code"]) == [False, True]
    assert g.loc[~g["older_code"], "align_acc"].iloc[0] == pytest.approx(0.9)


def test_superseded_runs_are_left_out_unless_asked(db):
    keys = _runs(db, "g", "transformer", {"align_acc": [0.2, 0.3]}, fingerprint="a" * 16)
    _runs(db, "g", "transformer", {"align_acc": [0.8, 0.9]}, fingerprint="b" * 16,
          finished_at=T0 + timedelta(days=1), first_seed=2)
    with db.tx() as s:
        s.execute(update(Run).where(Run.key.in_(keys)).values(status="superseded"))
    assert set(results.load(db)["status"]) == {"done", "superseded"}  # load keeps them
    t = _rows(build_table(db, "g", metrics=["align_acc"]), "transformer")
    assert len(t) == 1 and t["align_acc"][0] == pytest.approx(0.85) and t["n"][0] == 2
    both = _rows(build_table(db, "g", metrics=["align_acc"], include_superseded=True), "transformer")
    assert len(both) == 2 and both.loc[both["older_code"], "align_acc"].iloc[0] == pytest.approx(0.25)


def test_cell_shows_the_t_half_width_and_n(db):
    sample = [0.41, 0.38, 0.45]
    _runs(db, "g", "transformer", {"align_acc": sample})
    t = build_table(db, "g", metrics=["align_acc"])
    low, high = st.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=st.sem(sample))
    row = _rows(t, "transformer").iloc[0]
    assert row["align_acc_ci95_low"] == pytest.approx(low) and row["align_acc_ci95_high"] == pytest.approx(high)
    assert float(t_halfwidth(np.std(sample, ddof=1), 3)) == pytest.approx((high - low) / 2)
    assert display_table(t)["Align acc ↑"][0] == f"{np.mean(sample):.3f} ± {(high - low) / 2:.3f} (n=3)"


def _marks(t, metric):
    return t.attrs["best"].get(metric, []), t.attrs["tied"].get(metric, [])


def test_bold_only_where_significant(db):
    _runs(db, "g", "transformer", {"align_acc": [0.80, 0.81, 0.82], "params": [1.0, 1.0, 1.0]})
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.40, 0.41, 0.42], "params": [2.0, 2.0, 2.0]})
    t = build_table(db, "g", metrics=["align_acc", "params"])
    best, tied = _marks(t, "align_acc")
    assert [t["Method"][i] for i in best] == ["transformer"] and tied == []
    md = render(t, "markdown")
    assert "**0.810 ± 0.025 (n=3)**" in md
    assert _marks(t, "params") == ([], [])  # no direction: never marked, however different


def test_overlapping_rows_are_tied_not_bold(db):
    _runs(db, "g", "transformer", {"align_acc": [0.5, 0.6, 0.7]})
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.55, 0.65, 0.45]})
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.10, 0.11, 0.12]}, width=64)  # clearly worse
    t = build_table(db, "g", metrics=["align_acc"])
    best, tied = _marks(t, "align_acc")
    assert best == []
    assert sorted((t["Method"][i], t["align_acc"][i].round(2)) for i in tied) == \
        [("mamba-prefix", 0.55), ("transformer", 0.6)]  # the clearly worse row is not tied
    md = render(t, "markdown")
    assert "_0.600 ± 0.248 (n=3)_" in md and "**" not in md.split("\n\n")[0]
    assert "_italic_: tied with the best" in md


def test_single_runs_are_never_bold(db):
    _runs(db, "g", "transformer", {"align_acc": [0.99]})  # best, but n=1
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.10, 0.11, 0.12]})
    t = build_table(db, "g", metrics=["align_acc"])
    assert _marks(t, "align_acc")[0] == []
    # nor is a clearly better row with n=3 bold against an n=1 row: significance needs n >= 2 on both sides
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.05]}, width=64)
    t2 = build_table(db, "g", metrics=["align_acc"])
    assert _marks(t2, "align_acc")[0] == []
    md = render(t2, "markdown")
    assert "n=1: a single run" in md and "n=1: no interval" in " ".join(t2["Notes"])


def test_baseline_difference_matches_scipy_welch(db, tmp_path, capsys):
    base = [0.40, 0.45, 0.43, 0.41]
    other = [0.52, 0.61, 0.58]
    close = [0.39, 0.47, 0.42]
    _runs(db, "g", "transformer", {"align_acc": base, "fid_domain": [10.0, 11.0, 12.0, 11.0]})
    _runs(db, "g", "mamba-prefix", {"align_acc": other, "fid_domain": [10.5, 12.5, 11.0]})
    _runs(db, "g", "mamba-prefix", {"align_acc": close, "fid_domain": [10.0, 10.5, 12.0]}, width=64)
    t = build_table(db, "g", metrics=["align_acc", "fid_domain"], baseline="transformer")
    assert t.attrs["baseline"]["label"] == "transformer"
    for sample in (other, close):
        row = t[np.isclose(t["align_acc"], np.mean(sample))].iloc[0]
        ci = st.ttest_ind(sample, base, equal_var=False).confidence_interval(0.95)
        assert row["align_acc_diff"] == pytest.approx(np.mean(sample) - np.mean(base))
        assert row["align_acc_diff_ci95_low"] == pytest.approx(ci.low)
        assert row["align_acc_diff_ci95_high"] == pytest.approx(ci.high)
        assert bool(row["align_acc_significant"]) == (ci.low > 0 or ci.high < 0)
    assert t.loc[np.isclose(t["align_acc"], np.mean(other)), "align_acc_significant"].item()
    assert not t.loc[np.isclose(t["align_acc"], np.mean(close)), "align_acc_significant"].item()
    d, lo, hi, df = welch_interval(np.mean(other), np.std(other, ddof=1), 3, np.mean(base), np.std(base, ddof=1), 4)
    assert float(df) == pytest.approx(st.ttest_ind(other, base, equal_var=False).df)
    md = render(t, "markdown")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split(" | ")]
    assert "Δ Align acc ↑ vs transformer" in header and "Δ FID (domain) ↓ vs transformer" in header
    assert f"+{d:.3f} [{float(lo):.3f}, {float(hi):.3f}]*" in md and "(baseline)" in md
    # a variant with several configurations here cannot be the baseline; its config key can
    with pytest.raises(ValueError, match="--baseline: variant 'mamba-prefix' has 2 configurations") as err:
        build_table(db, "g", metrics=["align_acc"], baseline="mamba-prefix")
    keys = list(_rows(build_table(db, "g"), "mamba-prefix")["config_key"])
    assert all(k in str(err.value) for k in keys)
    by_key = build_table(db, "g", metrics=["align_acc"], baseline=keys[0][:8])
    assert by_key["config_key"][by_key.attrs["baseline"]["row"]] == keys[0]
    url = f"sqlite:///{tmp_path}/t.db"
    assert main(["table", "--db", url, "--results", str(tmp_path), "--baseline", "mamba-prefix"]) == 2
    assert "configurations" in capsys.readouterr().err


def test_json_carries_every_figure(db, tmp_path, capsys):
    _runs(db, "g", "transformer", {"align_acc": [0.80, 0.81, 0.82], "kid_domain": [0.01, 0.02, 0.015]},
          fingerprint="c" * 16)
    _runs(db, "g", "mamba-prefix", {"align_acc": [0.40, 0.41, 0.42], "kid_domain": [0.05, 0.06, 0.055]})
    url = f"sqlite:///{tmp_path}/t.db"
    assert main(["table", "--db", url, "--results", str(tmp_path), "--grid", "g", "--format", "json",
                 "--baseline", "transformer"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["baseline"]["label"] == "transformer" and "kid_domain" in doc["metrics"]  # a default column now
    for r in doc["rows"]:
        assert {"config_key", "fingerprint", "older_code", "Hyperparameters", "Notes", "n"} <= set(r)
        for cell in r["metrics"].values():
            assert {"mean", "std", "n", "ci95_low", "ci95_high", "best", "tied", "diff", "diff_ci95_low",
                    "diff_ci95_high", "significant"} <= set(cell)
    tr = next(r for r in doc["rows"] if r["Method"] == "transformer")
    mp = next(r for r in doc["rows"] if r["Method"] == "mamba-prefix")
    assert tr["fingerprint"] == "c" * 16 and mp["fingerprint"] is None
    assert tr["metrics"]["align_acc"]["best"] and tr["metrics"]["kid_domain"]["best"]  # ↑ and ↓
    assert mp["metrics"]["align_acc"]["significant"] and mp["metrics"]["align_acc"]["diff"] == pytest.approx(-0.4)
    assert tr["metrics"]["align_acc"]["diff"] == 0 and tr["metrics"]["align_acc"]["diff_ci95_low"] is None
    cell = tr["metrics"]["align_acc"]
    assert cell["ci95_low"] < cell["mean"] < cell["ci95_high"] and not math.isnan(cell["std"])


def test_new_metric_directions():
    from ablate.report.table import metric_column

    assert results.higher_is_better("kid_domain") is False and results.higher_is_better("kid_domain_std") is None
    for m in ("precision_domain", "recall_domain", "align_acc_heldout"):
        assert results.higher_is_better(m) is True and metric_column(m)[1] is True
    assert metric_column("peak_mem_mb")[1] is False and metric_column("params")[1] is None


def test_zero_spread_on_both_sides_claims_nothing():
    """Two seeds that happen to agree exactly on each side (0.22, 0.22 vs 0.19, 0.19: a metric
    read off 100 images moves in steps of 0.01) show no spread, not no noise: no interval, no
    significance, whatever the difference."""
    from ablate.stats import significant, welch_interval

    diff, low, high, df = welch_interval(0.22, 0.0, 2, 0.19, 0.0, 2)
    assert diff == pytest.approx(0.03) and np.isnan(low) and np.isnan(high) and np.isnan(df)
    assert not significant(low, high)
    _, low, high, _ = welch_interval(0.22, 0.01, 2, 0.19, 0.0, 2)
    assert np.isfinite(low) and np.isfinite(high), "one side with spread gives an interval"


# ---- ablate agree: does one metric rank configurations like another? ---------------------------

def test_agree_matches_scipy_and_respects_directions(tmp_path, capsys):
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    g = np.random.default_rng(3)
    truth = g.normal(size=8)
    for i, v in enumerate(["transformer", "uvit", "mamba-prefix", "mamba-xattn", "m-mamba", "hybrid-gsa",
                           "mamba-text-A", "mamba-text-B"]):
        acc = [truth[i] + 0.05, truth[i] - 0.05]
        # the judge's score tracks the truth with noise; fid goes the other way (lower is better)
        clip = [10 * truth[i] + g.normal(), 10 * truth[i] + g.normal()]
        _runs(db, "ag", v, {"align_acc": acc, "clip_domain": clip, "fid_domain": [-a for a in acc]},
              fingerprint="f1")
    from ablate.report.agree import agreement

    res = agreement(db, "ag", "clip_domain", "align_acc", resamples=2000)
    means = res["table"]
    assert res["configs"]["rho"] == pytest.approx(st.spearmanr(means["clip_domain"], means["align_acc"]).statistic)
    assert res["configs"]["rho"] > 0.7 and res["configs"]["p"] < 0.05 and res["configs"]["low"] <= res["configs"]["rho"]
    # fid_domain is lower-better: negated, it ranks like align_acc exactly
    assert agreement(db, "ag", "fid_domain", "align_acc", resamples=200)["configs"]["rho"] == pytest.approx(1.0)
    # another code version for one configuration: refused, not pooled
    _runs(db, "ag", "uvit", {"align_acc": [0.1], "clip_domain": [1.0], "fid_domain": [0.0]}, fingerprint="f2",
          first_seed=5)
    with pytest.raises(ValueError, match="several code versions"):
        agreement(db, "ag", "clip_domain", "align_acc")
    db.close()
    assert main(["agree", "ag", "clip_domain", "nope", "--db", f"sqlite:///{tmp_path / 'a.db'}"]) == 2
    assert "nope" in capsys.readouterr().err


def test_hyperparameters_say_how_many_ranks_trained_a_row(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    _runs(db, "w", "transformer", {"align_acc": [0.5, 0.6], "world_size": [2.0, 2.0], "global_batch": [64.0, 64.0]})
    _runs(db, "w", "uvit", {"align_acc": [0.4, 0.5]})
    t = build_table(db, "w").set_index("Method")
    assert t.loc["transformer", "Hyperparameters"].endswith("ranks=2, global batch=64")
    assert "ranks" not in t.loc["uvit", "Hyperparameters"]
    db.close()


def test_a_row_timed_on_a_shared_cpu_says_so(db, tmp_path, capsys):
    """A run whose CPU share fell below 0.8 (a neighbour shared the cores while it was timed) puts
    a note on its row, naming the lowest share and whether training or sampling; rows timed alone
    (0.8 and above) get none; the note is the same through the command (no pandas) and the frame."""
    _runs(db, "g", "transformer", {"train_tokens_per_s": [900.0, 950.0], "train_cpu_share": [0.97, 0.80],
                                   "sample_cpu_share": [0.99, 0.95]})
    _runs(db, "g", "mamba-prefix", {"train_tokens_per_s": [400.0, 300.0], "train_cpu_share": [0.98, 0.55],
                                    "sample_cpu_share": [0.99, 0.61]})
    _runs(db, "g", "mamba-prefix", {"train_tokens_per_s": [500.0]}, width=64)  # recorded no share
    t = build_table(db, "g")
    assert "shared CPU" not in _rows(t, "transformer")["Notes"][0]
    unknown, contended = _rows(t, "mamba-prefix")["Notes"]  # (width 64 sorts first)
    assert "timed on a shared CPU (lowest CPU share: training 0.55, sampling 0.61)" in contended
    assert "shared CPU" not in unknown
    assert "train_cpu_share" not in t.columns, "a share is a note, not a default column"
    assert main(["table", "--db", db.url, "--grid", "g", "--out", str(tmp_path / "R.md")]) == 0
    out = capsys.readouterr().out
    assert out.count("timed on a shared CPU") == 1 and "training 0.55, sampling 0.61" in out

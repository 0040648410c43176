"""The pandas API and the table: a fixture database written through the harness's own
transactions, numbers checked against hand computation, every format parsed back."""
from __future__ import annotations

import inspect
import json
import math
import re
import statistics
from io import StringIO

import pandas as pd
import pytest

from ablate import results
from ablate.cli import main
from ablate.config import RunSpec
from ablate.db import Database
from ablate.report import build_table, display_table, render, write_results

# (variant, overrides, seed, status, final metrics)
RUNS = [
    ("transformer", {}, 0, "done", {"fid_domain": 10.0, "align_acc": 0.50, "params": 100.0, "train_tokens_per_s": 900.0}),
    ("transformer", {}, 1, "done", {"fid_domain": 12.0, "align_acc": 0.70, "params": 100.0, "train_tokens_per_s": 1100.0}),
    ("transformer", {}, 2, "done", {"fid_domain": 17.0, "align_acc": 0.60, "params": 100.0, "train_tokens_per_s": 1000.0}),
    ("mamba-prefix", {"model.width": 64}, 0, "done", {"fid_domain": 8.0, "align_acc": 0.40, "params": 90.0,
                                                      "train_tokens_per_s": 500.0}),
    ("mamba-prefix", {"model.width": 64}, 1, "done", {"fid_domain": 9.0, "align_acc": 0.30, "params": 90.0}),
    ("mamba-prefix", {"model.width": 64}, 2, "failed", {}),
    ("mamba-prefix", {"model.width": 32}, 0, "done", {"fid_domain": 30.0, "align_acc": 0.90, "params": 50.0,
                                                      "train_tokens_per_s": 2000.0}),
    ("mamba-prefix", {"model.width": 32}, 1, "pending", {}),
]


def _spec(variant: str, overrides: dict, seed: int) -> dict:
    spec = RunSpec.model_validate({"model": {"variant": variant, "width": overrides.get("model.width", 128)},
                                   "seed": seed})
    return spec.model_dump(mode="json")


def _owned(write, token, *args):
    """``write(*args)`` by the claiming attempt: with ``token=`` where the store takes one."""
    if "token" in inspect.signature(write).parameters:
        return write(*args, token=token)
    return write(*args)


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    url = f"sqlite:///{root / 'ablate.db'}"
    db = Database(url)
    cells = [(f"key{i:02d}", v, seed, _spec(v, over, seed), {"model.variant": v, **over})
             for i, (v, over, seed, _, _) in enumerate(RUNS)]
    db.register("g", cells)
    db.register("other-grid", [cells[0]])
    for (key, *_), (_, _, _, status, final) in zip(cells, RUNS):
        if status == "pending":
            continue
        tok = db.claim(key)
        assert tok
        _owned(db.log_metrics, tok, key, [("train_loss", 10, 2.0), ("train_loss", 20, 1.5), ("val_loss", 20, 1.7)])
        if status == "done":
            _owned(db.finish, tok, key, final, [("model", f"/nowhere/{key}.pt")])
        else:
            _owned(db.fail, tok, key, "RuntimeError: boom\nTraceback (most recent call last): ...")
    yield db, url, root
    db.close()


def test_load_one_row_per_run_with_flat_spec_and_final_metrics(fixture_db):
    db, url, _ = fixture_db
    df = results.load(db, grid="g")
    assert len(df) == len(RUNS) and list(df["key"]) == [f"key{i:02d}" for i in range(len(RUNS))]
    assert list(df["variant"]) == [r[0] for r in RUNS]
    assert list(df["model.width"]) == [r[1].get("model.width", 128) for r in RUNS]
    assert "model.params" not in df.columns and "train.lr" in df.columns
    assert df.loc[0, "fid_domain"] == 10.0 and math.isnan(df.loc[4, "train_tokens_per_s"])
    assert df.loc[5, "status"] == "failed" and df.loc[5, "error"] == "RuntimeError: boom"
    assert df.loc[3, "hyper"] == "model.width=64" and df.loc[0, "hyper"] == ""
    assert "train_loss" not in df.columns  # curves are not final metrics
    # a URL works as well as a Database; another grid sees only its own runs
    assert list(results.load(url, grid="other-grid", spec=False)["key"]) == ["key00"]


def test_load_of_named_metrics_keeps_them_alone_and_absent_ones_absent(fixture_db):
    db, _, _ = fixture_db
    full = results.load(db, grid="g", spec=False)
    some = results.load(db, grid="g", spec=False, metrics=["params", "nope", "align_acc", "train_loss"])
    # the named final metrics by name; one no run has, and curves (no final value), get no column
    assert list(some.columns) == results.RUN_COLUMNS + ["align_acc", "params"]
    pd.testing.assert_frame_equal(some, full[list(some.columns)])
    assert list(results.load(db, grid="g", spec=False, metrics=[]).columns) == results.RUN_COLUMNS


def test_table_command_reads_no_config_models(fixture_db, tmp_path):
    """`ablate table` reads the database: the config's pydantic models, the grid and executor
    code and the HTML report stay unimported (they cost a third of its start)."""
    import subprocess
    import sys

    _, url, _ = fixture_db
    heavy = ["ablate.config", "ablate.grid", "ablate.launch", "ablate.weights", "ablate.report.site"]
    code = ("import sys; from ablate.cli import main; main(['table', '--db', %r, '--results', %r]); "
            "print(sorted(m for m in %r if m in sys.modules))" % (url, str(tmp_path), heavy))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    # the names `import ablate` offers still resolve, on first use
    code = "import ablate; print(ablate.RunSpec.__name__, ablate.load_grid.__name__, 'RunSpec' in dir(ablate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["RunSpec", "load_grid", "True"]


def test_curves_long_form(fixture_db):
    db, _, _ = fixture_db
    c = results.curves(db, grid="g", names=["train_loss"])
    assert set(c["name"]) == {"train_loss"}
    assert list(c[c["key"] == "key00"]["step"]) == [10, 20]
    assert len(c) == 2 * sum(r[3] != "pending" for r in RUNS)
    arts = results.artifacts(db, grid="g", kind="model")
    assert len(arts) == sum(r[3] == "done" for r in RUNS)


def test_mean_std_n_match_hand_computation(fixture_db):
    db, _, _ = fixture_db
    t = build_table(db, "g")
    tr = t[t["Method"] == "transformer"].iloc[0]
    assert tr["n"] == 3 and tr["Trained"] == "Yes (3)"
    assert tr["fid_domain"] == pytest.approx((10 + 12 + 17) / 3)
    assert tr["fid_domain_std"] == pytest.approx(statistics.stdev([10.0, 12.0, 17.0]))  # sample std, ddof=1
    assert tr["align_acc_std"] == pytest.approx(0.1)
    w64 = t[(t["Method"] == "mamba-prefix") & (t["Hyperparameters"] == "model.width=64")].iloc[0]
    assert w64["n"] == 2 and w64["fid_domain"] == pytest.approx(8.5)
    assert w64["fid_domain_std"] == pytest.approx(math.sqrt(0.5))
    assert w64["train_tokens_per_s_n"] == 1 and math.isnan(w64["train_tokens_per_s_std"])
    assert "failed: RuntimeError: boom" in w64["Notes"]
    w32 = t[(t["Method"] == "mamba-prefix") & (t["Hyperparameters"] == "model.width=32")].iloc[0]
    assert w32["n"] == 1 and math.isnan(w32["fid_domain_std"])
    shown = display_table(t).set_index(["Method", "Hyperparameters"])
    # mean ± the 95% t half-width (t_{0.975,2} * 3.606 / sqrt(3) = 8.96) and n
    assert shown.loc[("transformer", "base"), "FID (domain) ↓"] == "13.0 ± 9.0 (n=3)"
    assert shown.loc[("mamba-prefix", "model.width=64"), "Train tok/s ↑"] == "500 (n=1)"
    assert shown.loc[("mamba-prefix", "model.width=32"), "Align acc ↑"] == "0.900 (n=1)"
    assert "n=1: no interval" in w32["Notes"] and "n=1" not in tr["Notes"]
    # a grid's table lists what the grid ran; the whole-database table also lists the
    # registered variants that never ran, after the ones that did
    assert list(t["Method"]) == ["mamba-prefix", "mamba-prefix", "transformer"]
    everything = build_table(db)
    assert list(everything["Method"][:3]) == ["mamba-prefix", "mamba-prefix", "transformer"]
    assert (everything["Trained"].iloc[3:] == "No").all() and len(everything) > 3


def _row(md: str, method: str, hyper: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0] == method and hyper in cells:
            return cells
    raise AssertionError(f"no row {method} {hyper}")


def test_no_bold_on_noise_ties_marked_on_the_right_cells(fixture_db):
    db, _, _ = fixture_db
    t = build_table(db, "g")
    md = render(t, "markdown")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split(" | ")]
    col = {name: header.index(title) for name, title in
           [("fid", "FID (domain) ↓"), ("align", "Align acc ↑"), ("tok", "Train tok/s ↑"), ("params", "Params")]}
    w64, w32, tr = (_row(md, "mamba-prefix", "model.width=64"), _row(md, "mamba-prefix", "model.width=32"),
                    _row(md, "transformer", "base"))
    # every column has an n=1 row (w32), so nothing can be significantly best: no bold at all
    assert t.attrs["best"] == {} and "**" not in md.split("\n\n")[0]
    # lower FID is better: w64 (8.5) is the best, and tied with the rest (none significantly worse)
    pos = int(t.index[(t["Method"] == "mamba-prefix") & (t["Hyperparameters"] == "model.width=64")][0])
    assert t.attrs["tied"]["fid_domain"][0] == pos
    assert w64[col["fid"]] == "_8.5 ± 6.4 (n=2)_" and tr[col["fid"]].startswith("_13.0")
    assert w32[col["align"]] == "_0.900 (n=1)_"  # higher is better: the n=1 best is only tied
    assert not any("_" in r[col["params"]] for r in (w64, w32, tr))  # no direction, no mark
    assert "n=1: a single run" in md
    assert r"\textit{8.5" in render(t, "latex") and "<em>0.900 (n=1)</em>" in render(t, "html")


def test_markdown_has_one_row_per_variant_setting(fixture_db):
    db, _, _ = fixture_db
    md = render(build_table(db, "g", metrics=["fid_domain"], group_by=["variant"]), "markdown")
    rows = [line for line in md.splitlines()[2:] if line.startswith("| ")]
    methods = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert len(methods) == len(set(methods)) and {"transformer", "mamba-prefix"} <= set(methods)
    prefix = _row(md, "mamba-prefix", "Yes (3)")
    assert "pooled over 2 configs" in prefix[-2]


def test_csv_round_trips(fixture_db):
    db, _, _ = fixture_db
    t = build_table(db, "g")
    back = pd.read_csv(StringIO(render(t, "csv")))
    expected = t.reset_index(drop=True).astype(object).where(t.notna(), float("nan")).infer_objects()
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)  # (csv has no None: NaN)
    assert {"fid_domain_ci95_low", "fid_domain_ci95_high", "fid_domain_std", "fid_domain_n",
            "config_key", "fingerprint", "older_code"} <= set(back.columns)


def test_latex_and_html_contain_every_value(fixture_db):
    from ablate.report.render import latex_escape
    import html

    db, _, _ = fixture_db
    t = build_table(db, "g")
    tex, page = render(t, "latex"), render(t, "html")
    assert tex.startswith(r"\begin{tabular}") and tex.rstrip().endswith(r"\end{tabular}")
    assert page.count("<tr>") == len(t) + 1
    for value in display_table(t).to_numpy().ravel():
        assert latex_escape(value) in tex, value
        assert html.escape(value) in page, value


def test_json_loads_with_best_flags(fixture_db):
    db, _, _ = fixture_db
    t = build_table(db, "g", metrics=["fid_domain", "align_acc"])
    doc = json.loads(render(t, "json"))
    assert doc["metrics"] == ["fid_domain", "align_acc"] and len(doc["rows"]) == len(t)
    tr = next(r for r in doc["rows"] if r["Method"] == "transformer")
    assert tr["metrics"]["fid_domain"]["mean"] == pytest.approx(13.0) and tr["n"] == 3
    assert not any(r["metrics"]["fid_domain"]["best"] for r in doc["rows"])  # noise: no best
    assert sum(r["metrics"]["fid_domain"]["tied"] for r in doc["rows"]) == 3
    cell = tr["metrics"]["fid_domain"]
    assert cell["std"] == pytest.approx(statistics.stdev([10.0, 12.0, 17.0])) and cell["n"] == 3
    assert (cell["ci95_high"] - cell["ci95_low"]) / 2 == pytest.approx(4.302653 * cell["std"] / math.sqrt(3))
    w32 = next(r for r in doc["rows"] if r["Hyperparameters"] == "model.width=32")
    assert w32["metrics"]["fid_domain"]["ci95_low"] is None and w32["config_key"]


def test_group_by_sort_and_metrics(fixture_db):
    db, _, _ = fixture_db
    t = build_table(db, "g", metrics=["align_acc"], group_by=["model.width"], sort="align_acc")
    assert "model.width" in t.columns and [c for c in t.columns if c.startswith("align")] == \
        ["align_acc", "align_acc_std", "align_acc_n", "align_acc_ci95_low", "align_acc_ci95_high"]
    ran = t[t["n"] > 0]
    assert list(ran["align_acc"]) == sorted(ran["align_acc"], reverse=True)  # best (highest) first
    fid_sorted = build_table(db, "g", metrics=["fid_domain"], sort="fid_domain")
    assert fid_sorted["fid_domain"].iloc[0] == pytest.approx(8.5)  # lower first
    rev = build_table(db, "g", metrics=["fid_domain"], sort="-fid_domain")
    assert rev["fid_domain"].iloc[0] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="--group-by: unknown key 'nope'"):
        build_table(db, "g", group_by=["nope"])
    with pytest.raises(ValueError, match="--metrics: no final metric 'fidd'"):
        build_table(db, "g", metrics=["fidd"])


def test_cli_formats_study_and_results_md(fixture_db, tmp_path, capsys):
    db, url, root = fixture_db
    for fmt in ("markdown", "csv", "latex", "html", "json"):
        assert main(["table", "--db", url, "--results", str(tmp_path), "--grid", "g", "--format", fmt]) == 0
        assert "transformer" in capsys.readouterr().out
    text = (tmp_path / "RESULTS.md").read_text()
    assert url in text and re.search(r"at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text) and "(grid `g`)" in text
    assert main(["table", "--db", url, "--results", str(tmp_path), "--study", "s1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--study" in err and "no studies" in err
    assert main(["table", "--db", url, "--results", str(tmp_path), "--group-by", "nope"]) == 2
    assert "--group-by: unknown key" in capsys.readouterr().err
    out = tmp_path / "t.tex"
    assert main(["table", "--db", url, "--results", str(tmp_path), "--format", "latex", "--out", str(out),
                 "--metrics", "fid_domain,align_acc", "--sort=-align_acc"]) == 0
    assert out.read_text() == capsys.readouterr().out


def test_write_results_names_db_and_time(fixture_db, tmp_path):
    db, url, _ = fixture_db
    md = write_results(db, tmp_path / "R.md", "g")
    head = (tmp_path / "R.md").read_text().split("\n\n", 2)
    assert url in head[1] and "UTC" in head[1] and head[2].rstrip() .endswith(md.rstrip().splitlines()[-1])


def test_table_command_imports_neither_torch_nor_variants(fixture_db, tmp_path):
    import subprocess
    import sys

    _, url, _ = fixture_db
    code = ("import sys; from ablate.cli import main; main(['table', '--db', %r, '--results', %r]); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('variants')))" % (url, str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_bench_table_small(tmp_path, capsys):
    from ablate.bench.table import bench_table, build_db

    url = build_db(tmp_path / "b.db", runs=200, n_metrics=20, variants=4, seeds=5)
    df = results.load(url, spec=False)
    assert len(df) == 200 and len([c for c in df.columns if c not in results.RUN_COLUMNS]) == 20
    rows = bench_table(runs=200, repeats=1, subprocess_runs=False, workdir=tmp_path / "w")
    assert [r["what"] for r in rows] == ["build_db", "in_process"] and rows[1]["seconds"] > 0
    assert main(["bench", "table", "--runs", "150", "--repeats", "1", "--no-subprocess",
                 "--results", str(tmp_path)]) == 0
    assert "in_process" in capsys.readouterr().out
    db = Database(f"sqlite:///{tmp_path / 'ablate.db'}", create=False)
    assert [r.row["what"] for r in db.bench_results("table")] == ["build_db", "in_process"]
    db.close()

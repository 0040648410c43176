"""`ablate table` without pandas: the plain-Python table (ablate.report.summary) is its pandas
reference twin (ablate.report.table.build_table_ref) number for number, renders the same
text, and imports neither pandas, numpy, scipy nor SQLAlchemy for a SQLite file.

Tolerance: none. Both twins compute the statistics with ablate.stats, so every figure must have
the same bits (means: Kahan sums in run order as pandas' groupby; stds: Welford's update)."""
from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
from sqlalchemy import text
from tabledata import random_db

from ablate.db.read import reading
from ablate.report import build_table, render, summary
from ablate.report.summary import FORMATS, Table
from ablate.report.table import build_table_ref

OPTIONS = [
    {}, {"grid": "g1"}, {"grid": "g2"}, {"group_by": ["variant"]}, {"group_by": ["model.width"]},
    {"group_by": ["scan"]}, {"group_by": ["seed"]}, {"group_by": ["hyper"]}, {"group_by": ["fingerprint"]},
    {"group_by": ["config"]}, {"group_by": ["model.width", "train.lr"]}, {"sort": "align_acc"},
    {"sort": "-fid_domain"}, {"sort": "Method"}, {"sort": "n"}, {"sort": "-Trained"},
    {"baseline": "transformer"}, {"baseline": "mamba-prefix"}, {"include_superseded": True},
    {"metrics": ["align_acc", "my_loss", "params"]}, {"metrics": ["nope"]}, {"sort": "nope"},
    {"group_by": ["nope"]}, {"grid": "g1", "group_by": ["model.width"], "sort": "train_tokens_per_s"},
    {"group_by": ["variant"], "baseline": "transformer"}, {"metrics": ["kid_domain"], "baseline": "uvit"},
]


def _same(a, b) -> bool:
    """Equal, to the bit for floats; an absent value (None, NaN) equals any absent value."""
    if summary.missing(a) or summary.missing(b):
        return summary.missing(a) and summary.missing(b)
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b) and math.copysign(1, a) == math.copysign(1, b)
    return a == b and type(a) is type(b) or (isinstance(a, (bool, int)) and a == b and bool(a) == bool(b))


def _attrs(attrs: dict) -> dict:
    base = attrs.get("baseline")
    if base is not None:  # (pandas holds a pooled row's absent config key as NaN)
        base = {**base, "config_key": None if summary.missing(base["config_key"]) else base["config_key"]}
    return {**attrs, "baseline": base}


def _check(url: str, options: dict) -> None:
    try:
        ref = build_table_ref(url, **options)
    except ValueError as exc:
        with reading(url) as r, pytest.raises(ValueError) as err:
            summary.build(r, **options)
        assert str(err.value) == str(exc)
        return
    with reading(url) as r:
        fast = summary.build(r, **options)
    assert isinstance(fast, Table) and fast.columns == list(ref.columns), options
    for c in ref.columns:
        want = ref[c].tolist()
        assert len(fast[c]) == len(want) and all(map(_same, fast[c], want)), (options, c)
    assert _attrs(fast.attrs) == _attrs(ref.attrs), options
    # the frame build_table returns is the reference's, dtypes and all
    pd.testing.assert_frame_equal(build_table(url, **options), ref, check_exact=True)
    for fmt in FORMATS:
        assert render(fast, fmt) == render(ref, fmt), (options, fmt)
    assert render(fast, "csv") == ref.to_csv(index=False), options  # pandas' own writer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_table_is_the_pandas_reference(tmp_path, seed):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db = random_db(url, seed)
    if seed == 2:  # rows that generate in different ways: a Paradigm column
        with db.tx() as s:
            s.execute(text("UPDATE runs SET spec = json_set(spec, '$.model.paradigm', 'ar') "
                           "WHERE variant = 'transformer'"))
    db.close()
    for options in OPTIONS:
        _check(url, options)
    if seed == 2:
        assert "Paradigm" in build_table(url).columns


def test_fast_table_is_the_pandas_reference_on_both_databases(any_db_url):
    random_db(any_db_url, 3, runs=80).close()
    for options in OPTIONS[:12] + OPTIONS[16:20]:
        _check(any_db_url, options)


def test_csv_and_json_keep_every_digit(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    random_db(url, 4, magnitudes=300).close()  # values from 1e-300 to 1e300
    with reading(url) as r:
        table = summary.build(r, metrics=["fid_domain", "align_acc"], group_by=["variant"], baseline="transformer")
    back = pd.read_csv(__import__("io").StringIO(render(table, "csv")))
    for c in ("fid_domain", "fid_domain_std", "fid_domain_ci95_low", "align_acc_diff_ci95_high"):
        assert all(map(_same, back[c].tolist(), table[c])), c


def test_table_command_imports_no_pandas_numpy_scipy_or_sqlalchemy(tmp_path):
    """`ablate table` on a SQLite file, every format and option kind: standard library and
    ablate only (pandas alone cost 0.3-0.5 s of its start, scipy.special 0.2 s)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    random_db(url, 5).close()
    calls = [["--format", fmt] for fmt in FORMATS] + [["--baseline", "uvit"], ["--group-by", "model.width"],
                                                      ["--grid", "g1", "--sort", "align_acc"]]
    code = ("import sys; from ablate.cli import main\n"
            f"for extra in {calls!r}:\n"
            f"    main(['table', '--db', {url!r}, '--results', {str(tmp_path)!r}, *extra])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pandas', 'numpy', 'scipy', 'sqlalchemy', 'torch', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

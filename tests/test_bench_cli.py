"""`ablate bench ops|step`: the table is printed and stored in the results database; bad input
is one line, exit 2, nothing stored. Toy sizes: this checks the plumbing, never a speed."""
from __future__ import annotations

import pytest

from ablate.cli import main
from ablate.db import open_db


def _bench_rows(results, suite):
    db = open_db(None, results, create=False)
    try:
        return db.bench_results(suite)
    finally:
        db.close()


def test_bench_ops_prints_and_stores(tmp_path, capsys):
    rc = main(["bench", "ops", "--lengths", "5", "9", "--batch", "2", "--d-inner", "8", "--d-state", "2",
               "--repeats", "1", "--impls", "ref", "torch", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| ref | plain | 5 |" in out and "| torch | batch_A | 9 |" in out and "stored as bench ops" in out
    rows = _bench_rows(tmp_path, "ops")
    cases = {(r.row["impl"], r.row["case"], r.row["L"]) for r in rows}
    assert ("torch", "initial_state", 9) in cases and ("attention", "self-attention D=4, 4 heads", 5) in cases
    assert all(r.row["fwd_bwd_s"] > 0 and r.device.startswith("cpu") for r in rows)
    plain = [r.row for r in rows if r.row["impl"] == "torch" and r.row["case"] == "plain"]
    assert all(p["speedup_vs_ref"] > 0 for p in plain)
    assert len({r.session for r in rows}) == 1


def test_bench_step_ratios_against_the_first_variant(tmp_path, capsys):
    rc = main(["bench", "step", "--variants", "transformer", "mamba-prefix", "--batch", "2", "--width", "16",
               "--depth", "1", "--grid", "2x3", "--text-len", "4", "--codebook", "8", "--repeats", "2",
               "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "| transformer |" in out and "/ transformer" in out
    rows = [r.row for r in _bench_rows(tmp_path, "step")]
    assert [r["variant"] for r in rows] == ["transformer", "mamba-prefix"]
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] > 0 and rows[1]["seq"] == 6 + 4
    assert rows[0]["params"] > 0


def test_bench_step_pairs_precisions_per_variant(tmp_path, capsys):
    rc = main(["bench", "step", "--variants", "transformer", "mamba-prefix", "--batch", "2", "--width", "16",
               "--depth", "1", "--grid", "2x3", "--text-len", "4", "--codebook", "8", "--repeats", "2",
               "--precision", "fp32", "bf16", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "| mamba-prefix | bf16 |" in out and "/ fp32" in out
    rows = [r.row for r in _bench_rows(tmp_path, "step")]
    assert [(r["variant"], r["precision"]) for r in rows] == [
        ("transformer", "fp32"), ("transformer", "bf16"), ("mamba-prefix", "fp32"), ("mamba-prefix", "bf16")]
    assert rows[0]["vs_precision"] == 1.0 and rows[2]["vs_precision"] == 1.0 and rows[3]["vs_precision"] > 0


@pytest.mark.parametrize("argv,field", [
    (["bench", "step", "--variants", "transformer", "no-such-variant"], "--variants"),
    (["bench", "ops", "--impls", "warp-drive", "--lengths", "4"], "impls"),
])
def test_bench_bad_input_is_one_line_and_stores_nothing(tmp_path, capsys, argv, field):
    rc = main(argv + ["--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and len(err.strip().splitlines()) == 1
    if (tmp_path / "ablate.db").exists():  # a check that needs no database runs before it is made
        assert _bench_rows(tmp_path, "ops") == [] and _bench_rows(tmp_path, "step") == []


def test_bench_bad_grid_shape_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "step", "--grid", "4by4", "--results", str(tmp_path)])
    assert info.value.code == 2 and "HxW" in capsys.readouterr().err


def test_bench_sample_pairs_paradigms_and_names_what_it_skips(tmp_path, capsys):
    rc = main(["bench", "sample", "--variants", "transformer", "m-mamba", "--tokens", "2x2", "--batch", "2",
               "--width", "16", "--depth", "1", "--steps", "2", "--repeats", "1", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped m-mamba ar: it declares masked only" in out and "skipped m-mamba var" in out
    rows = [r.row for r in _bench_rows(tmp_path, "sample")]
    assert [(r["variant"], r["paradigm"]) for r in rows] == [("transformer", "masked"), ("transformer", "ar"),
                                                             ("transformer", "var"), ("m-mamba", "masked")]
    assert rows[2]["steps"] == 2 and rows[2]["vs_ar"] > 0, "var on a 2x2 map: scales 1, 2"
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_masked"] > 0 and rows[1]["decode"] == "cached"
    assert all(r["images_per_s"] > 0 for r in rows)

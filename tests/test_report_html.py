"""``ablate report`` without a browser: the folder holds the same numbers and marks as ``ablate
table``, every run of the grid exactly once behind its row, only files that exist, nothing from
the network, text from the database as data only, holes for deleted artifacts, one-line errors
with exit 2 for bad input, and a study's page data."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.db import Database
from ablate.report import build_table, display_table
from ablate.report.site import MARKER, write_report
from ablate.report.table import row_members
from ablate.results import load
from reportgrid import HOSTILE, STEPS, build, build_study

# XML namespace names are identifiers, never fetched; anything else with a scheme is a reference
NAMESPACES = {"http://www.w3.org/2000/svg"}


def read_js(path: Path):
    """The JSON inside ``window.ABLATE_DATA = ...;``, ``ablateRow(i, ...);`` or ``ablateTexts(...);``."""
    text = path.read_text(encoding="utf-8").strip()
    for head in ("window.ABLATE_DATA = ", "ablateTexts(", "ablateRow("):
        if text.startswith(head):
            body = text[len(head):].rstrip(";").removesuffix(")")
            return json.loads(body.split(", ", 1)[1] if head == "ablateRow(" else body)
    raise AssertionError(f"{path.name}: not a report data file")


def read_row(out: Path, i: int) -> dict:
    """Row ``i``'s details with its prompts and captions looked up in texts.js, as the page does."""
    texts, d = read_js(out / "data" / "texts.js"), read_js(out / "data" / "rows" / f"{i}.js")
    for s in d["sheets"]:
        s["prompts"] = texts[s["prompts"]]
    for s in d["samples"]:
        s["captions"] = texts[s["captions"]]
    return d


def row_of(out: Path, method: str, hyper: str = "base") -> dict:
    """The details of the row of ``method`` whose Hyperparameters read ``hyper``."""
    data = read_js(out / "data" / "table.js")
    i = next(i for i, r in enumerate(data["rows"]) if r["cells"][0] == method and r["cells"][-2] == hyper)
    return read_row(out, i)


@pytest.fixture(scope="module")
def grid_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    db, url = build(root)
    yield db, url, root
    db.close()


@pytest.fixture(scope="module")
def report(grid_db):
    db, _, root = grid_db
    info = write_report(db, root / "out", grid="g", baseline="transformer", roots=[root])
    return info, read_js(root / "out" / "data" / "table.js")


def test_cells_and_marks_are_ablate_tables(grid_db, report):
    db, url, root = grid_db
    info, data = report
    table = build_table(db, "g", baseline="transformer")
    shown = display_table(table)
    assert [c["title"] for c in data["columns"]] == list(shown.columns)
    assert [r["cells"] for r in data["rows"]] == [[str(v) for v in row] for row in shown.itertuples(index=False)]
    titles = list(shown.columns)
    for kind, letter in (("best", "b"), ("tied", "t")):
        for m, rows in table.attrs[kind].items():
            j = str(titles.index(next(c["title"] for c in data["columns"] if c["metric"] == m and c["kind"] == "metric")))
            assert [i for i, r in enumerate(data["rows"]) if r["marks"].get(j) == letter] == sorted(rows)
    # the numbers the page sorts by are the table's means and differences, NaN as None
    j = titles.index("FID (domain) ↓")
    assert [r["sort"][j] for r in data["rows"]] == [None if math.isnan(v) else v for v in table["fid_domain"]]
    # and the CLI's markdown shows the same cells
    assert main(["table", "--grid", "g", "--baseline", "transformer", "--db", url, "--results", str(root / "results"),
                 "--out", str(root / "t.md")]) == 0
    md = (root / "t.md").read_text()
    for r in data["rows"]:
        assert all(c.replace("|", "\\|") in md for c in r["cells"][3:5])
    assert data["meta"]["baseline"] == {"label": "transformer", "row": table.attrs["baseline"]["row"]}
    assert info.rows == len(table) == 4 and info.runs == 8


def test_every_run_sits_behind_exactly_one_row(grid_db):
    db, _, _ = grid_db
    runs = load(db, "g", spec=False)
    table = build_table(db, "g")
    members = row_members(runs, table)
    flat = sorted(r for ids in members for r in ids)
    assert flat == sorted(runs["run_id"])  # every run once, pending and failed included
    by_id = runs.set_index("run_id")
    for i, ids in enumerate(members):
        assert {by_id.loc[r, "variant"] for r in ids} == {table["Method"].iat[i]}
        assert {by_id.loc[r, "config_key"] for r in ids} == {table["config_key"].iat[i]}
        assert sum(by_id.loc[r, "status"] == "done" for r in ids) == table["n"].iat[i]
    with pytest.raises(ValueError, match="pools configurations"):
        row_members(runs, build_table(db, "g", group_by=["variant"]))


def test_row_details_curves_config_and_images(grid_db, report):
    _, _, root = grid_db
    out = root / "out"
    data = report[1]
    details = [read_row(out, i) for i in range(len(data["rows"]))]
    t = row_of(out, "transformer")  # seeds 0 and 1, train loss 3/s + seed
    assert t["curves"]["train_loss"]["step"] == list(STEPS)
    assert t["curves"]["train_loss"]["mean"] == pytest.approx([3.0 / s + 0.5 for s in STEPS])
    assert t["curves"]["train_loss"]["std"] == pytest.approx([math.sqrt(0.5)] * 2)
    spec = {**data["spec"], **t["spec"]}  # shared entries once in table.js, the row's own in its file
    assert spec["model.width"] == 96 and spec["train.steps"] == 20 and "seed" not in spec
    assert "model.width" in t["spec"] and "train.steps" in data["spec"]
    assert [s["seed"] for s in t["sheets"]] == [0, 1] and [x["step"] for x in t["sheets"][0]["steps"]] == list(STEPS)
    assert t["sheets"][0]["prompts"][1] == HOSTILE
    srcs = [x["src"] for d in details for s in d["sheets"] for x in s["steps"]]
    srcs += [s["src"] for d in details for s in d["samples"]]
    srcs += [it["src"] for d in details for f in d["failures"] for it in f["items"]]
    assert len(srcs) == 6 * 2 + 6 + 6 and all(srcs)  # 6 finished runs: 2 steps, samples, 1 failure each
    for src in srcs:
        assert not src.startswith(("/", "..")) and (out / src).is_file(), src
    failed = next(d for d in details if any(r["status"] == "failed" for r in d["runs"]))
    assert "<script>alert(3)</script>" in next(r["error"] for r in failed["runs"] if r["status"] == "failed")


def test_no_network_reference_and_no_markup_from_the_database(grid_db, report):
    _, _, root = grid_db
    out = root / "out"
    texts = {p: p.read_text(encoding="utf-8") for p in out.rglob("*") if p.suffix in (".html", ".js", ".css", ".svg")}
    for p, text in texts.items():
        refs = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert refs <= NAMESPACES, (p.name, refs - NAMESPACES)
    page = texts[out / "index.html"]
    assert re.findall(r"<script[^>]*>", page) == ['<script src="data/table.js">', '<script src="assets/report.js">']
    assert "Content-Security-Policy" in page and "script-src 'self'" in page and "<img" not in page
    js = texts[out / "assets" / "report.js"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert HOSTILE not in page  # the hostile caption lives only in data files, as a JSON string
    assert json.dumps(HOSTILE)[1:-1] in texts[out / "data" / "texts.js"]


def test_deleted_artifacts_become_holes(tmp_path):
    db, _ = build(tmp_path)
    try:
        runs = tmp_path / "results" / "runs"
        (runs / "key00" / "sheet" / "step_000020.png").unlink()
        (runs / "key02" / "samples.png").unlink()
        shutil.rmtree(runs / "key06" / "sheet")
        info = write_report(db, tmp_path / "out", grid="g", roots=[tmp_path])
    finally:
        db.close()
    out = tmp_path / "out"
    t = row_of(out, "transformer")
    step20 = t["sheets"][0]["steps"][1]
    assert step20["step"] == 20 and step20["src"] is None and step20["missing"].endswith("step_000020.png")
    m = row_of(out, "mamba-prefix", "model.width=64")
    assert m["samples"][0]["src"] is None and m["samples"][0]["missing"].endswith("samples.png")
    u = row_of(out, "uvit")
    assert u["sheets"][0]["missing"].endswith("sheet") and u["sheets"][0]["steps"] == []
    assert len(info.holes) == 3


def test_rebuild_replaces_the_report_and_refuses_other_folders(grid_db, tmp_path):
    db, _, root = grid_db
    out = tmp_path / "r"
    write_report(db, out, grid="g", roots=[root])
    (out / "data" / "rows" / "99.js").write_text("stale")
    write_report(db, out, grid="g", roots=[root])
    assert not (out / "data" / "rows" / "99.js").exists() and (out / MARKER).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not an ablate report"):
        write_report(db, mine, grid="g", roots=[root])
    assert (mine / "thesis.tex").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r"]


def test_bad_input_is_one_line_and_exit_2(grid_db, tmp_path, capsys):
    _, url, root = grid_db
    common = ["--db", url, "--results", str(root / "results")]
    (tmp_path / "a-file").write_text("x")
    empty_url = f"sqlite:///{tmp_path / 'empty.db'}"
    Database(empty_url).close()
    cases = {
        "no grid named 'nope'": ["report", "--grid", "nope", *common],
        "no study named 'nope'": ["report", "--study", "nope", *common],
        "nothing to report": ["report", "--db", empty_url, "--results", str(tmp_path / "res"), "--out", str(tmp_path / "o")],
        "cannot create": ["report", "--grid", "g", *common, "--out", str(tmp_path / "a-file" / "sub" / "r")],
        "is a file": ["report", "--grid", "g", *common, "--out", str(tmp_path / "a-file")],
        "--baseline: no variant": ["report", "--grid", "g", *common, "--baseline", "nope", "--out", str(tmp_path / "b")],
        "give one": ["report", "--grid", "g", "--study", "s", *common],
    }
    for what, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, (what, err)
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()


def test_cli_writes_the_default_folder(grid_db, capsys, monkeypatch):
    _, url, root = grid_db
    monkeypatch.chdir(root)
    assert main(["report", "--grid", "g", "--db", url, "--results", str(root / "results")]) == 0
    assert (root / "results" / "report" / "g" / "index.html").is_file()
    assert "4 rows, 8 runs, 24 images" in capsys.readouterr().out


def test_study_report_history_importances_and_axes(tmp_path):
    url, values = build_study(tmp_path)
    assert main(["report", "--study", "s", "--db", url, "--results", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    data = read_js(tmp_path / "r" / "data" / "table.js")
    s = data["study"]
    assert [t["number"] for t in s["trials"]] == list(range(5)) and s["counts"]["COMPLETE"] == 5
    assert s["history"][0]["value"] == values and s["history"][0]["best"] == [5.0, 3.0, 3.0, 1.0, 1.0]
    axes = {a["name"]: a for a in s["axes"]}
    assert axes["train.lr"]["log"] and axes["model.width"]["choices"] == ["32", "64"]
    imp = s["importances"]["fid_domain"]
    assert set(imp["values"]) <= {"train.lr", "model.width"} and (imp["values"] or imp["reason"])
    rows = {t["row"] for t in s["trials"]}
    assert None not in rows and rows <= set(range(len(data["rows"])))  # every trial links to its table row


def test_bench_report_small(capsys):
    assert main(["bench", "report", "--runs", "200", "--repeats", "1", "--no-store", "--no-subprocess",
                 "--no-browser"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| in_process"))
    assert "| 200 |" in row and "holes 0" in row  # every snapshot the spec expects was written
    images = int(re.search(r"([\d,]+) images", row).group(1).replace(",", ""))
    assert images == 194 * 4  # the 194 finished runs (4 failed, 2 pending): 3 snapshots + samples each


def test_conditioning_cpu_sized_report_stays_small(tmp_path):
    # grids/conditioning-cpu.yaml's shape: every variant x 2 seeds, 6 fixed prompts x 4 snapshots of
    # 32x32 images, 64 final samples per run, and a failure case each
    import yaml

    variants = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("grids/conditioning-cpu.yaml")
                              .read_text())["axes"]["model.variant"]
    runs = [(v, {}, seed, "done", {"fid_domain": 50.0 + i + seed, "align_acc": 0.5, "train_tokens_per_s": 3000.0 + i})
            for i, v in enumerate(variants) for seed in (0, 1)]
    prompts = [f"a large red circle in position {k}" for k in range(6)]
    db, _ = build(tmp_path, "conditioning-cpu", runs, steps=(100, 200, 300, 400), prompts=prompts, tile=32,
                  n_samples=64)
    try:
        info = write_report(db, tmp_path / "out", grid="conditioning-cpu", baseline="transformer", roots=[tmp_path])
    finally:
        db.close()
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    images = sum(f.stat().st_size for f in (tmp_path / "results" / "runs").rglob("*.png"))
    n = len(variants)
    assert info.rows == n and info.images == 2 * n * (4 + 1 + 1) and not info.holes
    assert on_disk == info.bytes < 10_000_000, on_disk
    assert on_disk - images < 600_000  # the page, its scripts and data: images are copied once, never inlined


def test_a_hostile_grid_name_is_escaped_in_the_page(tmp_path):
    from reportgrid import RUNS, spec

    name = '</title><script>alert(4)</script>/../../x'
    db, url = build(tmp_path)
    try:
        variant, over, seed, *_ = RUNS[0]
        db.register(name, [("key00", variant, seed, spec(variant, over, seed), {"model.variant": variant})])
        write_report(db, tmp_path / "out", grid=name, roots=[tmp_path])
    finally:
        db.close()
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "&lt;/title&gt;&lt;script&gt;alert(4)&lt;/script&gt;" in page and "<script>alert" not in page
    assert len(re.findall(r"<script", page)) == 2
    assert read_js(tmp_path / "out" / "data" / "table.js")["meta"]["grid"] == name  # data stays data
    # the default folder is named after the grid, never led out of <results>/report by it
    assert main(["report", "--grid", name, "--db", url, "--results", str(tmp_path / "results")]) == 0
    made = [p.name for p in (tmp_path / "results" / "report").iterdir()]
    assert made == ["_title_script_alert_4_script_.._.._x"] and not (tmp_path / "x").exists()

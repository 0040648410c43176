"""``ablate report`` in a real browser: headless Chromium (Debian's, through Selenium) opens the
report from ``file://``: no console error, one table row per configuration with ``ablate
table``'s cells, sorting reorders and filters hide rows (across pages), the comparison view
shows prompts x picked rows images, deleted artifacts show as holes, a hostile caption stays
text (no element, no dialog), and the study page draws one line per trial. Screenshots go to
``$ABLATE_TEST_ARTIFACTS`` (default ``test-artifacts/``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ablate.bench.table import build_db
from ablate.db import Database
from ablate.report import build_table, display_table
from ablate.report.browser import load_report, wait_for
from ablate.report.site import write_report
from reportgrid import HOSTILE, PROMPTS, build, build_study

ARTIFACTS = Path(os.environ.get("ABLATE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def errors(driver) -> list[str]:
    """Console messages at SEVERE level since the last call (failed loads, exceptions, CSP)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def go(driver, hash_: str) -> None:
    driver.execute_script("location.hash = arguments[0]", hash_)


def cells(driver, col: int) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results tbody tr')].map(tr => tr.children[arguments[0]].textContent)",
        col + 1)  # column 0 of the page is the pick box


def no_dialog(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert.dismiss()
    except NoAlertPresentException:
        return True
    return False


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The fixture grid's report, with one snapshot deleted (a hole) and a baseline."""
    root = tmp_path_factory.mktemp("browser")
    db, _ = build(root)
    (root / "results" / "runs" / "key00" / "sheet" / "step_000020.png").unlink()
    try:
        write_report(db, root / "out", grid="g", baseline="transformer", roots=[root])
        shown = display_table(build_table(db, "g", baseline="transformer"))
    finally:
        db.close()
    return root / "out" / "index.html", shown


def test_index_loads_clean_with_the_tables_rows_and_sorts_and_filters(browser, small):
    index, shown = small
    ms = load_report(browser, index)
    assert errors(browser) == [] and ms < 2000
    assert len(browser.find_elements("css selector", "#results tbody tr")) == len(shown) == 4
    for j, title in enumerate(shown.columns):
        assert cells(browser, j) == [str(v) for v in shown[title]], title
    shot(browser, "report-index")

    fid = list(shown.columns).index("FID (domain) ↓")
    header = browser.find_elements("css selector", "#results thead th")[fid + 1]
    header.click()  # a lower-is-better metric: best (lowest mean) first
    means = [float(c.split()[0]) for c in cells(browser, fid)]
    assert means == sorted(means) and means != [float(c.split()[0]) for c in shown[shown.columns[fid]]]
    browser.find_elements("css selector", "#results thead th")[fid + 1].click()
    assert [float(c.split()[0]) for c in cells(browser, fid)] == sorted(means, reverse=True)

    browser.find_element("id", "filter").send_keys("uvit")  # typed: the rows follow each key
    assert cells(browser, 0) == ["uvit"]
    browser.execute_script("""const f = document.getElementById('filter');
        f.value = ''; f.dispatchEvent(new Event('input'));""")
    assert len(cells(browser, 0)) == 4
    browser.execute_script("""const s = document.querySelector('select.facet[data-key="model.width"]');
        s.value = '32'; s.dispatchEvent(new Event('change'));""")
    assert cells(browser, len(shown.columns) - 2) == ["model.width=32"]
    assert errors(browser) == []


def test_compare_view_shows_the_prompts_of_every_picked_row(browser, small):
    index, shown = small
    load_report(browser, index)
    boxes = browser.find_elements("css selector", "#results tbody input.pick-box")
    for b in boxes[:3]:
        b.click()
    browser.find_element("id", "compare-button").click()
    wait_for(browser, "document.querySelectorAll('#compare-view .tile, #compare-view .hole').length > 0")
    # at each row's final step (20); the transformer's seed-0 snapshot there was deleted: holes
    tiles = browser.find_elements("css selector", "#compare-view .tile")
    holes = browser.find_elements("css selector", "#compare-view .hole")
    assert len(tiles) == len(PROMPTS) * 2 and len(holes) == len(PROMPTS)
    assert all("sheet.000020.png" in t.value_of_css_property("background-image") for t in tiles)
    shot(browser, "report-compare")
    browser.execute_script("""const s = document.getElementById('compare-step');
        s.value = '10'; s.dispatchEvent(new Event('change'));""")
    tiles = browser.find_elements("css selector", "#compare-view .tile")
    assert len(tiles) == len(PROMPTS) * 3
    assert all("sheet.000010.png" in t.value_of_css_property("background-image") for t in tiles)
    prompts = [e.text for e in browser.find_elements("css selector", "#compare-view th.prompt")]
    assert prompts == PROMPTS  # the hostile one as text
    assert errors(browser) == []


def test_hostile_caption_stays_text_and_holes_show(browser, small):
    index, shown = small
    load_report(browser, index)
    transformer = list(shown["Method"]).index("transformer")
    go(browser, f"row/{transformer}")
    wait_for(browser, "document.querySelectorAll('#row-view .samples figure').length > 0")
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    srcs = browser.execute_script("return [...document.scripts].map(s => s.getAttribute('src'))")
    assert set(srcs) == {"data/table.js", "assets/report.js", "data/texts.js", f"data/rows/{transformer}.js"}  # ours only
    assert no_dialog(browser)
    text = browser.find_element("id", "row-view").text
    assert HOSTILE in text and "judge read: a small green triangle in the bottom" in text
    holes = browser.find_elements("css selector", "#row-view .hole")
    assert len(holes) == len(PROMPTS)  # step 20 of seed 0 was deleted: one hole per prompt
    assert all("step_000020.png" in h.get_attribute("title") for h in holes)
    shot(browser, "report-row")
    assert errors(browser) == []


def test_pages_sorting_and_filters_span_every_row(browser, tmp_path):
    url = build_db(tmp_path / "many.db", runs=300, n_metrics=8, variants=3, seeds=2, curve_runs=4)
    db = Database(url, create=False)
    try:
        write_report(db, tmp_path / "out", roots=[tmp_path])
        table = build_table(db)
    finally:
        db.close()
    load_report(browser, tmp_path / "out" / "index.html")
    assert len(browser.find_elements("css selector", "#results tbody tr")) == 50
    assert f"of {len(table)}" in browser.find_element("id", "page-info").text
    titles = [t for t in display_table(table).columns]
    fid = titles.index("FID (domain) ↓")
    browser.find_elements("css selector", "#results thead th")[fid + 1].click()
    best = min(v for v in table["fid_domain"] if v == v)
    assert float(cells(browser, fid)[0].split()[0]) == pytest.approx(best, abs=0.051)
    browser.find_element("id", "next-page").click()
    second = [float(c.split()[0]) for c in cells(browser, fid)]
    assert second == sorted(second) and second[0] >= best
    browser.execute_script("""const s = document.querySelector('select.facet[data-key="Method"]');
        s.value = 'uvit'; s.dispatchEvent(new Event('change'));""")
    assert set(cells(browser, 0)) == {"uvit"}
    assert errors(browser) == []


def test_study_page_draws_every_trial(browser, tmp_path):
    from ablate.cli import main

    url, values = build_study(tmp_path)
    assert main(["report", "--study", "s", "--db", url, "--results", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    load_report(browser, tmp_path / "r" / "index.html", "study")
    wait_for(browser, "document.getElementById('study-view')")
    assert len(browser.find_elements("css selector", "svg.parallel polyline.trial-line")) == len(values)
    assert len(browser.find_elements("css selector", "#study-view circle.trial")) == len(values)
    assert len(browser.find_elements("css selector", "table.trials tbody tr")) == len(values)
    shot(browser, "report-study")
    assert errors(browser) == []


@pytest.mark.slow
def test_report_of_a_small_real_grid(browser, tmp_path):
    """A real grid (two variants, trained for a few steps, with sample-sheet snapshots) through
    `ablate run` and `ablate report`, opened in Chromium."""
    import subprocess
    import sys

    import ablate
    from jobgrid import write_grid

    grid = write_grid(tmp_path / "g.yaml", "real", variants=("transformer", "mamba-prefix"), steps=20,
                      launcher="{executor: debug, jobs: 1, cpus_per_job: 1, timeout_min: 20}")
    results = tmp_path / "results"
    # run where the user is (artifact paths are stored relative to it), with this checkout's ablate
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ablate.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "ablate.cli", "run", str(grid), "--results", "results", "--no-table"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rep = subprocess.run([sys.executable, "-m", "ablate.cli", "report", "--grid", "real", "--results", "results"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and rep.stderr == "", rep.stderr
    index = results / "report" / "real" / "index.html"
    # the judge scored images of 20-step models wrong: each run saved failure cases, the report carries them
    assert len(list(results.glob("runs/*/failures/failures.json"))) == 2
    assert list((results / "report" / "real" / "img").glob("*.failure.*.png"))
    load_report(browser, index)
    assert len(browser.find_elements("css selector", "#results tbody tr")) == 2
    for b in browser.find_elements("css selector", "#results tbody input.pick-box"):
        b.click()
    browser.find_element("id", "compare-button").click()
    wait_for(browser, "document.querySelectorAll('#compare-view .tile').length > 0")
    assert len(browser.find_elements("css selector", "#compare-view .tile")) == 6 * 2  # eval.sheet_prompts x rows
    shot(browser, "report-real-grid-compare")
    assert errors(browser) == []
    print(f"real grid: trained and reported in {time.perf_counter() - t0:.0f} s")

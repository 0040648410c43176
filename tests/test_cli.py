"""The CLI end to end on a tiny grid (real jobs, real DB), and the bad-input corpus."""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from ablate.cli import main
from ablate.db import Database

TINY = """
name: tiny
base:
  data: {name: shapes, image_size: 16, n_train: 256, n_val: 32, n_test: 32}
  tokenizer: {codebook_size: 32, code_dim: 8, hidden: 16, downsample: 4, steps: 20, batch_size: 32}
  text: {encoder: learned, max_len: 10, width: 32, layers: 1}
  model: {width: 32, depth: 1, heads: 2}
  train: {steps: 6, batch_size: 8, warmup_steps: 2, log_every: 2, eval_every: 3, checkpoint_every: 3, throughput_warmup: 1}
  sample: {steps: 3, batch_size: 16}
  eval: {n_images: 16, judge_steps: 20}
axes:
  model.variant: [transformer, mamba-prefix]
seeds: [0]
launcher: {executor: debug, jobs: 1, timeout_min: 10}
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    grid = root / "tiny.yaml"
    grid.write_text(TINY)
    results = root / "results"
    code = main(["run", str(grid), "--results", str(results)])
    return root, grid, results, code


def test_run_trains_every_cell_and_writes_the_table(tiny_run, capsys):
    root, grid, results, code = tiny_run
    assert code == 0
    db = Database(f"sqlite:///{results / 'ablate.db'}", create=False)
    from ablate.report import load_runs
    runs = load_runs(db, "tiny")
    assert sorted(runs["variant"]) == ["mamba-prefix", "transformer"]
    assert (runs["status"] == "done").all()
    for col in ("fid_domain", "align_acc", "blank_rate", "train_tokens_per_s", "sample_images_per_s",
                "params", "peak_mem_mb", "tok_recon_mse", "judge_acc", "tok_align_acc",
                "overhead_start_s", "overhead_end_s", "commit_s", "job_span_s", "queue_s"):
        assert runs[col].notna().all(), col
    assert (runs["overhead_start_s"] > 0).all() and (runs["overhead_end_s"] >= runs["commit_s"]).all()
    assert (runs["job_span_s"] > runs["overhead_end_s"]).all() and (runs["queue_s"] >= 0).all()
    key = runs["key"].iloc[0]
    steps = [s for s, _ in db.curve(key, "train_loss")]
    assert steps == [2, 4, 6]
    assert [s for s, _ in db.curve(key, "val_loss")] == [3, 6]
    md = (results / "RESULTS.md").read_text()
    assert "| transformer | Yes | Yes (1) |" in md and "| mamba-prefix | Yes | Yes (1) |" in md
    db.close()


def test_second_run_does_no_work(tiny_run, capsys):
    root, grid, results, _ = tiny_run
    before = digest(results / "ablate.db")
    assert main(["run", str(grid), "--results", str(results), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert "all 2 cells already done" in out
    assert digest(results / "ablate.db") == before


def test_table_formats_from_db_alone(tiny_run, capsys):
    root, grid, results, _ = tiny_run
    assert main(["table", "--format", "csv", "--results", str(results), "--grid", "tiny"]) == 0
    from io import StringIO
    df = pd.read_csv(StringIO(capsys.readouterr().out))
    assert {"Method", "Implemented", "Trained", "Hyperparameters", "Notes"} <= set(df.columns)
    assert set(df["Method"]) >= {"transformer", "mamba-prefix"}
    assert main(["status", "tiny", "--results", str(results)]) == 0
    assert "2 done" in capsys.readouterr().out


BAD = [
    ("syntax", "base: [1, 2\n", "YAML syntax error"),
    ("unknown key", "base: {train: {stepz: 1}}\n", "train.stepz: unknown key"),
    ("wrong type", "base: {train: {steps: lots}}\n", "train.steps"),
    ("unknown variant", "base: {model: {variant: mamba-z}}\n", "unknown variant 'mamba-z'"),
    ("missing dataset", "base: {data: {name: folder, path: /nonexistent/data}}\n", "data.path: folder /nonexistent/data does not exist"),
    ("bad launcher", "launcher: {jobs: 0}\n", "launcher.jobs"),
]


@pytest.mark.parametrize("name, text, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, name, text, expected):
    grid = tmp_path / "bad.yaml"
    grid.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    existing = results / "ablate.db"
    Database(f"sqlite:///{existing}").close()
    before = digest(existing)
    assert main(["run", str(grid), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert digest(existing) == before


def test_bad_db_url_and_override(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(TINY)
    assert main(["run", str(grid), "--results", str(tmp_path / "r"),
                 "--db", "postgresql+psycopg://u:pw@127.0.0.1:9/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "pw" not in err
    assert main(["run", str(grid), "--results", str(tmp_path / "r"), "--set", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "r" / "ablate.db").exists()
    assert main(["table", "--results", str(tmp_path / "r2")]) == 2
    assert "no database" in capsys.readouterr().err


def test_unusable_results_folder(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(TINY)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", str(grid), "--results", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert "--results: cannot create results folder" in err and len(err.strip().splitlines()) == 1


def test_orphaned_running_cell_is_resumed(tmp_path, capsys):
    """A cell left `running` by a killed job (stale heartbeat) is marked lost and run again."""
    grid = tmp_path / "g.yaml"
    grid.write_text(TINY.replace("model.variant: [transformer, mamba-prefix]", "model.variant: [transformer]"))
    results = tmp_path / "results"
    results.mkdir()
    from ablate.grid import load_grid
    from ablate.db.models import Run
    from sqlalchemy import update
    g = load_grid(grid)
    db = Database(f"sqlite:///{results / 'ablate.db'}")
    db.register(g.name, [(c.key, c.variant, c.seed, c.spec.model_dump(mode="json"), c.overrides) for c in g.cells])
    key = g.cells[0].key
    assert db.claim(key)
    from datetime import datetime
    with db.tx() as s:
        s.execute(update(Run).where(Run.key == key).values(heartbeat_at=datetime(2000, 1, 1)))
    db.close()
    assert main(["run", str(grid), "--results", str(results), "--no-table"]) == 0
    assert "marked lost, will resume" in capsys.readouterr().out
    db = Database(f"sqlite:///{results / 'ablate.db'}", create=False)
    assert db.run(key).status == "done" and db.run(key).attempts == 2
    db.close()


def test_what_a_run_writes_under_results_is_ignored_by_git():
    """`ablate run` and `ablate table` write into results/ (the default folder): a run must leave
    the checkout clean, so git ignores all of it."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        if os.environ.get("CI"):  # CI runs on a clone with git installed
            pytest.fail("CI: expected a git checkout with git on PATH")
        pytest.skip("not a git checkout")
    for path in ("results/RESULTS.md", "results/ablate.db", "results/report/quickstart/index.html",
                 "results/runs/abc/samples.png", "results/cache/tokenizer/x/vqvae.pt"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=repo)
        assert done.returncode == 0, f"{path} is not ignored by git"

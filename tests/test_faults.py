"""Faults on the local executor: a job killed with SIGKILL mid-training is `lost` and the next
`ablate run` resumes it from its checkpoint; two concurrent `ablate run` of one grid train every
cell exactly once; a failing cell (exception, NaN loss) is `failed` with its traceback while the
rest of the grid goes on; `ablate cancel` stops a grid."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from ablate.db import Database

pytestmark = pytest.mark.timeout(900)

from jobgrid import cli, driving, local_job_running, poll_run, start_run, wait_for, write_grid


def runs_of(db_url: str, grid: str):
    db = Database(db_url, create=False)
    from ablate.report import load_runs
    return load_runs(db, grid), db


def test_sigkill_mid_training_is_lost_then_resumed(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "kill", steps=400, width=64, depth=2, batch=32)
    results, db_url = tmp_path / "results", f"sqlite:///{tmp_path / 'k.db'}"
    with driving(start_run(grid, results, db_url)) as driver:
        key, job_id = poll_run(db_url, local_job_running)
        wait_for(results / "runs" / key / "ckpt*.pt")
        os.kill(int(job_id.split(":")[1]), signal.SIGKILL)
        out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1, out[-3000:]
    assert "LOST" in out and "the next run resumes it" in out
    runs, db = runs_of(db_url, "kill")
    assert runs["status"].tolist() == ["lost"] and "without a result" in db.run(key).error
    db.close()
    again = subprocess.run(cli("run", str(grid), "--results", str(results), "--db", db_url, "--no-table"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs, db = runs_of(db_url, "kill")
    try:
        run = db.run(key)
        assert run.status == "done" and run.attempts == 2
        steps = [s for s, _ in db.curve(key, "train_loss")]
        assert steps == list(range(10, 401, 10)), "no lost and no duplicated curve rows"
        assert db.final_metrics(key)["train_steps"] == 400
    finally:
        db.close()
    log = "".join(p.read_text() for p in (results / "submitit" / "kill").rglob("*.out"))
    assert "resumed from step" in log


def test_two_concurrent_runs_train_every_cell_once(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "twice", variants=("transformer", "mamba-prefix"), steps=30)
    results, db_url = tmp_path / "results", f"sqlite:///{tmp_path / 't.db'}"
    procs = [start_run(grid, results, db_url) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs, db = runs_of(db_url, "twice")
    try:
        assert (runs["status"] == "done").all() and len(runs) == 2
        for key in runs["key"]:
            assert db.run(key).attempts == 1, "a cell was trained twice"
            steps = [s for s, _ in db.curve(key, "train_loss")]
            assert steps == [10, 20, 30]
    finally:
        db.close()


EXPLODE = """
import torch.nn as nn
from pydantic import BaseModel, ConfigDict


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Explode(nn.Module):
    name = "explode"
    description = "raises in its forward pass (a bug in a plugin)"
    family = "transformer"
    Config = Cfg
    scan_orders = ()

    def __init__(self, ctx, cfg):
        super().__init__()
        self.lin = nn.Linear(ctx.width, ctx.width)

    def forward(self, x, text, text_mask):
        raise RuntimeError("explode: a bug in the variant's forward")


VARIANT = Explode
"""


def test_failures_are_recorded_and_the_grid_goes_on(tmp_path):
    """lr 1e9 makes the loss non-finite (FloatingPointError); a plugin variant raises in its
    forward. Both fail with reason and traceback; the good cell is done; `ablate status` prints
    each failure; exit code 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "explode_plugin.py").write_text(EXPLODE)
    dist = site / "explode_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: explode-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ablate.variants]\nexplode = explode_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    extra = "zip:\n  - {model.variant: [transformer, transformer, explode], train.lr: [0.001, 1.0e+9, 0.001]}\n"
    grid = write_grid(tmp_path / "g.yaml", "faults", steps=20, extra=extra)
    results, db_url = tmp_path / "results", f"sqlite:///{tmp_path / 'f.db'}"
    run = subprocess.run(cli("run", str(grid), "--results", str(results), "--db", db_url),
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    runs, db = runs_of(db_url, "faults")
    try:
        by_status = runs.groupby("status")["key"].apply(list).to_dict()
        assert len(by_status["done"]) == 1 and len(by_status["failed"]) == 2, by_status
        errors = [db.run(k).error for k in by_status["failed"]]
        assert any("FloatingPointError" in e and "Traceback" in e for e in errors), errors
        assert any("explode: a bug" in e and "Traceback" in e for e in errors), errors
    finally:
        db.close()
    status = subprocess.run(cli("status", "faults", "--db", db_url), capture_output=True, text=True, env=env)
    assert "3 cells: 0 pending, 0 running, 1 done, 2 failed" in status.stdout, status.stdout
    assert status.stdout.count("  failed ") == 2


def test_cancel_stops_a_running_grid_and_run_resumes_it(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "cancel", steps=400, width=64, depth=2, batch=32)
    results, db_url = tmp_path / "results", f"sqlite:///{tmp_path / 'c.db'}"
    with driving(start_run(grid, results, db_url)) as driver:
        key, _ = poll_run(db_url, local_job_running)
        cancel = subprocess.run(cli("cancel", "cancel", "--db", db_url), capture_output=True, text=True, timeout=60)
        assert cancel.returncode == 0 and "1 cell(s) cancelled, 1 job(s) stopped" in cancel.stdout, cancel
        driver.communicate(timeout=120)
    runs, db = runs_of(db_url, "cancel")
    assert runs["status"].tolist() == ["cancelled"] and "ablate cancel" in db.run(key).error
    db.close()
    bad = subprocess.run(cli("cancel", "nope", "--db", db_url), capture_output=True, text=True)
    assert bad.returncode == 2 and "no grid named 'nope'" in bad.stderr

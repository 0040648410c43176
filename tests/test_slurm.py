"""Against a real single-node Slurm (and a real PostgreSQL): a grid as a job array into the
server database; preemption by submitit's signal and by `scontrol requeue`, each resuming from a
checkpoint to the same final step and the same metrics as an uninterrupted run.

Slurm holds a requeued job for about two minutes before it is eligible again; the tests release it
at once with `scontrol update StartTime=now` (what an impatient admin would do) to save CI time.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ablate.cli import main
import jobgrid
from ablate.db import Database

pytestmark = pytest.mark.timeout(900)

QUALITY = ("train_steps", "train_loss", "val_loss", "align_acc", "fid_domain", "blank_rate")


def write_grid(path: Path, partition: str, name: str = "g", **kw) -> Path:
    return jobgrid.write_grid(path, name, jobgrid.slurm_launcher(partition), **kw)


def ablate(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], capture_output=True, text=True,
                          timeout=800, **kw)


def test_grid_as_a_slurm_array_into_postgresql(slurm, pg_url, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", slurm, variants=("transformer", "mamba-prefix"))
    results = tmp_path / "results"
    run = ablate("run", str(grid), "--results", str(results), "--db", pg_url)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "executor 'slurm' with one job array per stage" in run.stdout
    db = Database(pg_url, create=False)
    try:
        from ablate.report import load_runs
        runs = load_runs(db, "g")
        assert sorted(runs["variant"]) == ["mamba-prefix", "transformer"]
        assert (runs["status"] == "done").all()
        for key in runs["key"]:
            r = db.run(key)
            assert r.job_id.startswith("slurm:") and r.attempts == 1
            assert db.final_metrics(key)["train_steps"] == 20
    finally:
        db.close()
    # the table comes from the server database alone
    table = ablate("table", "--db", pg_url, "--results", str(tmp_path / "elsewhere"), "--format", "csv")
    assert table.returncode == 0, table.stderr
    assert "transformer" in table.stdout and "mamba-prefix" in table.stdout
    assert "ablate:ablate" not in run.stdout + run.stderr + table.stdout + table.stderr, "password printed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slurm):
    """The uninterrupted run (in-process), and the results folder whose caches it filled."""
    root = tmp_path_factory.mktemp("preempt")
    grid = write_grid(root / "ref.yaml", slurm, name="ref", steps=400, ckpt=25, width=64, depth=2, batch=32)
    results = root / "results"
    assert main(["run", str(grid), "--results", str(results), "--db", f"sqlite:///{root / 'ref.db'}",
                 "--executor", "debug", "--no-table"]) == 0
    db = Database(f"sqlite:///{root / 'ref.db'}", create=False)
    from ablate.report import load_runs
    runs = load_runs(db, "ref")
    key = runs["key"].iloc[0]
    final = db.final_metrics(key)
    db.close()
    return root, results, key, final


def _job_id(db_url: str, key: str) -> str:
    """The Slurm job id of the run once it is running (``123_0``)."""
    _, job = jobgrid.poll_run(db_url, lambda r: r.key == key and r.status == "running"
                              and (r.job_id or "").startswith("slurm:"))
    return job.split(":", 1)[1]


def _interrupt_mid_training(grid: Path, results: Path, db_url: str, key: str, how: str) -> None:
    """Run ``grid`` with a driver process; once the cell's first checkpoint exists, preempt its
    job (``signal``: submitit's USR2; ``requeue``: ``scontrol requeue``), release the requeued
    job at once, and require the driver to finish the grid (exit 0)."""
    driver = jobgrid.start_run(grid, results, db_url)
    try:
        job = _job_id(db_url, key)
        jobgrid.wait_for(results / "runs" / key / "ckpt*.pt")  # mid-training: the first checkpoint exists
        if how == "signal":
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job], check=True)
        jobgrid.release_when_requeued(job)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]


@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_preempted_job_resumes_to_the_same_result(reference, slurm, how):
    """``signal``: submitit's preemption signal (USR2): training stops at the next step boundary,
    saves a checkpoint there, submitit requeues the job. ``requeue``: ``scontrol requeue`` kills
    the job outright; it resumes from its last periodic checkpoint. Either way: 400 steps, and
    the quality metrics equal the uninterrupted run's (same seed, same threads: exact resume;
    tolerance 1e-6 relative for float noise)."""
    root, results, key, want = reference
    grid = write_grid(root / f"{how}.yaml", slurm, name=how, steps=400, ckpt=25, width=64, depth=2, batch=32)
    db_url = f"sqlite:///{root / f'{how}.db'}"
    _interrupt_mid_training(grid, results, db_url, key, how)
    db = Database(db_url, create=False)
    try:
        run = db.run(key)
        got = db.final_metrics(key)
        steps = [s for s, _ in db.curve(key, "train_loss")]
    finally:
        db.close()
    assert run.status == "done" and run.attempts == 2, (run.status, run.attempts, run.error)
    assert steps == sorted(set(steps)) and steps[-1] == 400, "no duplicated or missing curve rows"
    for name in QUALITY:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    log = "".join(p.read_text() for p in (results / "submitit" / how).rglob("*.out"))
    assert "resumed from step" in log


def test_a_two_task_cell_on_slurm_is_preempted_and_resumes_exactly(slurm, tmp_path):
    """One cell as 2 Slurm tasks (ntasks-per-node 2 on the 2-CPU node), joined by gloo: done, with
    world size 2 and the global batch of both ranks. Then the same cell again with USR2 mid-
    training: both ranks stop at the same step boundary, rank 0 checkpoints, the job is requeued,
    both ranks resume, and the quality metrics equal the uninterrupted run's."""
    launcher = ("{executor: slurm, timeout_min: 20, tasks_per_job: 2, slurm: {partition: %s, gpus_per_job: 0, "
                "cpus_per_job: 1, mem_gb: 2, time_min: 20}}" % slurm)
    results = tmp_path / "results"
    grid = jobgrid.write_grid(tmp_path / "t.yaml", "tasks", launcher, steps=300, ckpt=25, width=64, depth=2, batch=16)
    url = f"sqlite:///{tmp_path / 't.db'}"
    run = ablate("run", str(grid), "--results", str(results), "--db", url)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "each cell runs as 2 processes" in run.stdout
    db = Database(url, create=False)
    try:
        from ablate.report import load_runs
        (key,) = load_runs(db, "tasks")["key"].tolist()
        want = db.final_metrics(key)
        assert db.run(key).status == "done" and want["world_size"] == 2 and want["global_batch"] == 32
    finally:
        db.close()

    url2 = f"sqlite:///{tmp_path / 'p.db'}"
    _interrupt_mid_training(grid, results, url2, key, "signal")
    db = Database(url2, create=False)
    try:
        r = db.run(key)
        got = db.final_metrics(key)
    finally:
        db.close()
    assert r.status == "done" and r.attempts == 2, (r.status, r.attempts, r.error)
    for name in QUALITY:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    log = "".join(p.read_text() for p in (results / "submitit" / "tasks").rglob("*.out"))
    assert "resumed from step" in log

"""End to end, with real processes: a job whose run was taken by another attempt stops and
writes nothing (local jobs, SQLite and PostgreSQL); after a grid and a study on a password-
protected PostgreSQL (local processes and the real Slurm) no file under the results folder holds
the password; a preemption signal during evaluation on the real Slurm requeues the job, which
finishes the run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url

import jobgrid
from ablate.db import Database, Run

pytestmark = pytest.mark.timeout(900)


def _ablate(*args: str, env: dict | None = None, timeout: int = 800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _curve_steps(db: Database, key: str) -> list[int]:
    return [s for s, _ in db.curve(key, "train_loss")]


def test_a_job_whose_run_was_taken_stops_without_writing(any_db_url, tmp_path):
    """The race: job A trains; its run is marked lost (as a launcher with a skewed clock or
    after a database outage would) and claimed by B. A's heartbeat finds the run taken, A stops
    at its next step boundary, logs no more curve rows, writes no checkpoint over B's and no
    result; B's result is the one recorded."""
    grid = jobgrid.write_grid(tmp_path / "g.yaml", "race", steps=4000, ckpt=10, width=32, depth=1, batch=8)
    results = tmp_path / "results"
    env = {**os.environ, "ABLATE_HEARTBEAT_S": "0.5"}
    driver = subprocess.Popen(jobgrid.cli("run", str(grid), "--results", str(results), "--db", any_db_url,
                                          "--no-table"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    with jobgrid.driving(driver):
        key, _ = jobgrid.poll_run(any_db_url, jobgrid.local_job_running)
        jobgrid.wait_for(results / "runs" / key / "ckpt*.pt")
        db = Database(any_db_url, create=False)
        try:
            with db.tx() as s:  # A's heartbeat looks old to this launcher
                s.execute(update(Run).where(Run.key == key).values(heartbeat_at=datetime(2000, 1, 1)))
            assert db.mark_lost(older_than_s=60) == [key]
            b = db.claim(key, job_id="attempt-b")
            assert b
            at_claim = _curve_steps(db, key)
            out, _ = driver.communicate(timeout=300)
            assert driver.returncode == 0, out[-3000:]
            assert "taken over by another attempt" in out
            assert _curve_steps(db, key) == at_claim, "A wrote curve rows after B's claim"
            # a checkpoint A was saving when B claimed may land just after (its curve rows were
            # committed before the claim), but no training state past what A had logged by then
            steps = [torch.load(p, weights_only=True)["step"] for p in (results / "runs" / key).glob("ckpt*.pt")]
            assert steps and max(steps) <= max(at_claim), "A checkpointed training it did after B's claim"
            run = db.run(key)
            assert run.status == "running" and run.job_id == "attempt-b" and run.attempt == b
            assert db.heartbeat(key, b), "B still owns the run"
            db.finish(key, {"align_acc": 0.75}, [], token=b)
            assert db.final_metrics(key) == {"align_acc": 0.75}
        finally:
            db.close()


# ----------------------------------------------------------------------------- no secret on disk

@pytest.fixture
def secret_url():
    """``make(pg_url)``: a new role with a unique password, owning ``pg_url``'s database;
    returns (its URL with the password, the password). Roles are dropped after the test (and
    after ``pg_url`` dropped its database: request this fixture first)."""
    from conftest import PG_ADMIN_URL

    roles = []

    def make(pg_url: str) -> tuple[str, str]:
        role, password = f"r_{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
                roles.append(role)
                conn.exec_driver_sql(f"GRANT {role} TO CURRENT_USER")  # to hand it the database
                conn.exec_driver_sql(f'ALTER DATABASE "{make_url(pg_url).database}" OWNER TO {role}')
        except Exception as exc:  # the admin role lacks CREATEROLE: .ci/services.sh grants it
            pytest.fail(f"cannot make a password role ({str(exc).splitlines()[0]}); "
                        "run `bash .ci/services.sh`", pytrace=False)
        finally:
            admin.dispose()
        u = make_url(pg_url).set(username=role, password=password)
        return u.render_as_string(hide_password=False), password

    yield make
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for role in roles:
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
    admin.dispose()


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


STUDY = """name: pw
base:
  data: {name: shapes, image_size: 16, n_train: 256, n_val: 32, n_test: 32}
  tokenizer: {codebook_size: 32, code_dim: 8, hidden: 16, downsample: 4, steps: 20, batch_size: 32}
  text: {encoder: learned, max_len: 10, width: 32}
  model: {variant: transformer, width: 32, depth: 1, heads: 2}
  train: {steps: 6, batch_size: 8, warmup_steps: 2, log_every: 2, eval_every: 3, checkpoint_every: 3}
  sample: {steps: 2, batch_size: 16}
  eval: {n_images: 16, judge_steps: 20, sheet_prompts: 0}
search:
  train.lr: [0.002, 0.01]
objectives: {val_loss: minimize}
sampler: {name: random, seed: 0}
trials: 2
launcher: LAUNCHER
"""


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_no_password_on_disk_after_a_grid_and_a_study(secret_url, pg_url, tmp_path, executor, request):
    if executor == "slurm":
        partition = request.getfixturevalue("slurm")
        launcher = jobgrid.slurm_launcher(partition)
    else:
        launcher = "{executor: local, jobs: 2, cpus_per_job: 1, timeout_min: 20}"
    url, password = secret_url(pg_url)
    results = tmp_path / "results"
    grid = jobgrid.write_grid(tmp_path / "g.yaml", "pw", launcher=launcher, steps=6, ckpt=3)
    run = _ablate("run", str(grid), "--results", str(results), "--db", url)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.replace("LAUNCHER", launcher))
    st = _ablate("study", str(study), "--results", str(results), "--db", url, "--workers", "1")
    assert st.returncode == 0, st.stdout[-3000:] + st.stderr[-3000:]
    assert list((results / "submitit").rglob("*.pkl")), "the job files are where the scan looks"
    assert _files_holding(results, password) == [], "a file under results/ holds the password"
    for out in (run.stdout, run.stderr, st.stdout, st.stderr):
        assert password not in out
    db = Database(url, create=False)
    try:
        with db.engine.connect() as conn:
            assert set(conn.execute(select(Run.status)).scalars()) == {"done"}
    finally:
        db.close()


# ----------------------------------------------------------------------------- Slurm: evaluation

def test_preemption_during_evaluation_on_slurm_requeues(slurm, tmp_path):
    """USR2 (submitit's preemption signal) while the job samples and scores its images: the job
    stops at the next sampling batch, the run goes back to pending (not lost), Slurm requeues the
    job, and the requeued job resumes from the final checkpoint and finishes the run."""
    launcher = jobgrid.slurm_launcher(slurm)
    grid = tmp_path / "g.yaml"
    jobgrid.write_grid(grid, "evalpre", launcher=launcher, steps=20, ckpt=10)
    # evaluation long enough to be hit: many small sampling batches
    grid.write_text(grid.read_text().replace("sample: {steps: 3, batch_size: 32}", "sample: {steps: 24, batch_size: 2}")
                    .replace("eval: {n_images: 32,", "eval: {n_images: 64,"))
    results, db_url = tmp_path / "results", f"sqlite:///{tmp_path / 'e.db'}"
    driver = jobgrid.start_run(grid, results, db_url)
    with jobgrid.driving(driver):
        key, job = jobgrid.poll_run(db_url, lambda r: r.status == "running" and (r.job_id or "").startswith("slurm:"))
        job = job.split(":", 1)[1]
        db = Database(db_url, create=False)
        t0 = time.time()
        while 20 not in _curve_steps(db, key):  # the last training step is logged: sampling starts
            assert time.time() - t0 < 300
            time.sleep(0.05)
        db.close()
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        jobgrid.release_when_requeued(job)
        out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    db = Database(db_url, create=False)
    try:
        run = db.run(key)
        assert run.status == "done" and run.attempts == 2, (run.status, run.attempts, run.error)
        assert db.final_metrics(key)["train_steps"] == 20
    finally:
        db.close()
    log = "".join(p.read_text() for p in (results / "submitit" / "evalpre").rglob("*.out"))
    assert "resumed from step 20" in log

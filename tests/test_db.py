"""Status flow, atomic results, ownership of a run by its attempt, and the invariants the schema
encodes; on SQLite and on a real PostgreSQL."""
from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from ablate.config import RunSpec, config_key
from ablate.db import Database, DBError, Metric, Run, open_db, safe_url
from ablate.db.store import NotOwner


@pytest.fixture
def db(any_db_url):
    d = Database(any_db_url)
    yield d
    d.close()


def cell(key="k1", variant="fake", seed=0):
    return (key, variant, seed, {"seed": seed}, {"model.variant": variant})


def test_status_flow(db):
    assert db.register("g", [cell()]) == {"k1": "pending"}
    assert db.register("g", [cell()]) == {"k1": "pending"}  # idempotent
    tok = db.claim("k1", job_id="42")
    assert tok
    assert not db.claim("k1"), "a running cell must not be claimed twice"
    db.log_metrics("k1", [("train_loss", 10, 2.0), ("train_loss", 20, 1.5)], tok)
    db.log_metrics("k1", [("train_loss", 20, 1.4)], tok)  # a resumed run rewrites its step
    assert db.curve("k1", "train_loss") == [(10, 2.0), (20, 1.4)]
    db.finish("k1", {"align_acc": 0.5, "fid_domain": 3.0}, [("model", "/x/model.pt")], token=tok)
    run = db.run("k1")
    assert run.status == "done" and run.finished_at is not None and run.job_id == "42"
    assert db.final_metrics("k1") == {"align_acc": 0.5, "fid_domain": 3.0}
    assert not db.claim("k1"), "a done cell is never claimed again"


def test_cell_shared_by_two_grids_is_one_run(db):
    db.register("g1", [cell()])
    db.register("g2", [cell()])
    with db.tx() as s:
        assert len(list(s.scalars(select(Run)))) == 1
    assert db.grids() == ["g1", "g2"]


def test_failure_is_recorded_and_retry_needs_claim(db):
    db.register("g", [cell()])
    tok = db.claim("k1")
    assert db.fail("k1", "ValueError: boom\nTraceback ...", tok)
    run = db.run("k1")
    assert run.status == "failed" and run.error.startswith("ValueError: boom")
    assert not db.claim("k1", allow=("pending",))
    assert db.claim("k1")  # default allow includes failed (what --retry-failed uses)
    assert db.run("k1").attempts == 2


def test_finish_is_all_or_nothing(db):
    db.register("g", [cell()])
    tok = db.claim("k1")

    class Boom:
        def __float__(self):
            raise RuntimeError("metric cannot be converted")

    with pytest.raises(RuntimeError):
        db.finish("k1", {"align_acc": 0.5, "bad": Boom()}, [("model", "/m.pt")], token=tok)
    assert db.run("k1").status == "running"
    assert db.final_metrics("k1") == {}, "no half-written result"


def test_final_metric_unique_per_run_even_with_null_step(db):
    db.register("g", [cell()])
    rid = db.run("k1").id
    with pytest.raises(IntegrityError):
        with db.tx() as s:
            s.add(Metric(run_id=rid, name="fid", step=None, value=1.0))
            s.add(Metric(run_id=rid, name="fid", step=None, value=2.0))
    with pytest.raises(IntegrityError):
        with db.tx() as s:
            s.add(Metric(run_id=rid, name="loss", step=3, value=1.0))
            s.add(Metric(run_id=rid, name="loss", step=3, value=2.0))


def test_stale_heartbeat_becomes_lost(db):
    db.register("g", [cell("a"), cell("b", seed=1)])
    db.claim("a")
    tb = db.claim("b")
    time.sleep(1.1)
    assert db.heartbeat("b", tb)
    assert db.mark_lost(older_than_s=1.0) == ["a"]
    assert db.statuses(["a", "b"]) == {"a": "lost", "b": "running"}
    assert db.claim("a"), "a lost run can be resumed"


def test_bad_urls_are_one_line_and_hide_passwords(tmp_path):
    with pytest.raises(DBError, match="does not exist"):
        Database(f"sqlite:///{tmp_path}/missing/dir/a.db")
    with pytest.raises(DBError, match="cannot parse"):
        Database("::::not a url")
    with pytest.raises(DBError) as info:
        Database("postgresql+psycopg://user:s3cret@127.0.0.1:1/nodb")
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    assert "***" in safe_url("postgresql://u:s3cret@h/db")
    with pytest.raises(DBError, match="no database"):
        open_db(None, tmp_path, create=False)
    assert not (tmp_path / "ablate.db").exists()


def test_config_key_groups_seeds_of_one_configuration(db):
    a, b = RunSpec(seed=0), RunSpec(seed=1)
    wide = RunSpec.model_validate({"model": {"width": 48, "heads": 4}, "seed": 0})
    db.register("g", [(f"k{i}", "transformer", s.seed, s.model_dump(mode="json"), {}) for i, s in
                      enumerate((a, b, wide))])
    keys = [db.run(f"k{i}").config_key for i in range(3)]
    assert keys[0] == keys[1] == config_key(a), "two seeds of one config share its key"
    assert keys[2] == config_key(wide) != keys[0], "another width is another configuration"


def test_only_the_owning_attempt_writes(db):
    """The race of a job whose run was marked lost while it still ran (a clock skew, a database
    outage longer than lost_after_s): claim A, mark lost, claim B. A's heartbeat must not keep B's
    row alive, A's curves and result are refused, and B's result is the one recorded."""
    db.register("g", [cell()])
    a = db.claim("k1", job_id="job-a")
    db.log_metrics("k1", [("train_loss", 10, 2.0)], a)
    time.sleep(1.1)
    assert db.mark_lost(older_than_s=1.0) == ["k1"]
    assert not db.heartbeat("k1", a), "a lost attempt's heartbeat refreshes nothing"
    b = db.claim("k1", job_id="job-b")
    assert b and b != a
    assert not db.heartbeat("k1", a), "A's heartbeat must not keep B's row alive"
    assert not db.owns("k1", a) and db.owns("k1", b)
    with pytest.raises(NotOwner):
        db.log_metrics("k1", [("train_loss", 20, 9.9)], a)
    with pytest.raises(NotOwner):
        db.finish("k1", {"align_acc": 0.1}, [("model", "/a/model.pt")], token=a)
    assert not db.fail("k1", "A crashed", a)
    assert not db.release("k1", a, "pending")
    assert db.run("k1").status == "running", "A's refused writes leave B's run running"
    assert db.heartbeat("k1", b)
    db.finish("k1", {"align_acc": 0.9}, [("model", "/b/model.pt")], token=b)
    assert db.final_metrics("k1") == {"align_acc": 0.9}
    assert db.curve("k1", "train_loss") == [(10, 2.0)]
    with pytest.raises(NotOwner):
        db.finish("k1", {"align_acc": 0.1}, token=a)
    assert db.final_metrics("k1") == {"align_acc": 0.9}


def test_heartbeat_and_lost_cutoff_use_the_servers_clock(db, monkeypatch):
    """A worker whose clock runs an hour behind (or ahead) neither looks dead nor keeps a dead
    run alive: both the heartbeat and the cutoff are the database server's time."""
    from datetime import datetime, timedelta, timezone

    import ablate.db.models as models
    import ablate.db.store as store

    db.register("g", [cell()])
    skewed = lambda: datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=1)  # noqa: E731
    with monkeypatch.context() as m:  # the worker: its clock an hour behind
        m.setattr(store, "utcnow", skewed)
        m.setattr(models, "utcnow", skewed)
        tok = db.claim("k1")
        assert db.heartbeat("k1", tok)
    # the launcher, on time: the heartbeat it sees is fresh
    assert db.mark_lost(older_than_s=60) == [], "a fresh heartbeat is fresh whatever the worker's clock says"
    with monkeypatch.context() as m:  # a launcher an hour behind must not miss a dead run either
        m.setattr(store, "utcnow", skewed)
        m.setattr(models, "utcnow", skewed)
        time.sleep(1.1)
        assert db.mark_lost(older_than_s=1.0) == ["k1"]


def test_preemption_release_and_launcher_verdicts(db):
    db.register("g", [cell("a"), cell("b", seed=1)])
    ta = db.claim("a", job_id="j1")
    assert db.release("a", ta, "pending", "preempted at step 3")
    assert db.run("a").status == "pending" and not db.owns("a", ta)
    db.claim("b", job_id="j2")
    assert not db.set_status("b", "lost", "died", only_from=("running",), job_id="other-job")
    assert db.set_status("b", "lost", "died", only_from=("running",), job_id="j2")
    assert db.run("b").status == "lost"


# ---- the commands that only read: a plain read transaction, SQLite through the standard library ----

def test_reads_neither_wait_on_nor_block_a_running_job(tmp_path, monkeypatch, capsys):
    """A job holds SQLite's write lock (BEGIN IMMEDIATE, a row written, not committed): the
    table, plot, report and status reads go through in a plain read transaction instead of
    waiting for it, and see the database as it was before the job's transaction."""
    from ablate import results
    from ablate.cli import main
    from ablate.db import engine, read
    from ablate.report import build_table, render
    from ablate.report.table import config_specs
    from tabledata import random_db

    monkeypatch.setattr(engine, "SQLITE_BUSY_MS", 300)  # a read that waited would fail in 0.3 s
    monkeypatch.setattr(read, "SQLITE_BUSY_MS", 300)
    path = tmp_path / "r.db"
    url = f"sqlite:///{path}"
    db = random_db(url, 6)
    before = render(build_table(db), "csv")
    job = sqlite3.connect(path, isolation_level=None)
    job.execute("BEGIN IMMEDIATE")
    job.execute("UPDATE metrics SET value = value + 1 WHERE step IS NULL")
    try:
        assert main(["table", "--db", url, "--results", str(tmp_path), "--format", "csv"]) == 0
        assert capsys.readouterr().out == before
        assert render(build_table(db), "csv") == before  # through SQLAlchemy (report, plot)
        runs = results.load(db, spec=False)
        assert len(results.curves(db, runs=runs)) and config_specs(db, runs) is not None
        assert results.artifacts(db, runs=runs).empty and results.run_specs(db, [1])
        assert db.grids() == ["g1", "g2"] and db.statuses([runs["key"][0]])
        assert main(["status", "--db", url, "--results", str(tmp_path)]) == 0
        with pytest.raises(OperationalError, match="locked"):  # a writer still waits: the lock is real
            with db.tx() as s:
                s.execute(text("DELETE FROM grid_runs WHERE id = 1"))
    finally:
        job.execute("ROLLBACK")
        job.close()
        db.close()


def test_reader_opens_and_fails_as_the_database(tmp_path):
    """The standard library's reader of a SQLite file says what the Database would say, and any
    URL it does not read itself (options, a quoted path) goes through SQLAlchemy."""
    from ablate import results
    from ablate.db.read import reading

    for url in [f"sqlite:///{tmp_path}/missing.db", f"sqlite:///{tmp_path}/no/dir/a.db", "sqlite:///:memory:"]:
        with pytest.raises(DBError) as by_db:
            Database(url, create=False)
        with pytest.raises(DBError) as by_reader:
            with reading(url):
                pass
        assert str(by_reader.value) == str(by_db.value)
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(DBError, match="cannot reach"):
        with reading(f"sqlite:///{tmp_path}/junk.db"):
            pass
    quoted = f"sqlite:///{tmp_path}/a%23b.db"  # the file a#b.db
    Database(quoted).close()
    with reading(quoted) as r:
        assert r.grids() == [] and r.dialect == "sqlite"
    assert (tmp_path / "a#b.db").exists() and results.load_columns(quoted)["run_id"] == []

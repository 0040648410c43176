"""Status flow, atomic results and the invariants the schema encodes."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ablate.db import Database, DBError, Metric, Run, open_db, safe_url


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'a.db'}")
    yield d
    d.close()


def cell(key="k1", variant="fake", seed=0):
    return (key, variant, seed, {"seed": seed}, {"model.variant": variant})


def test_status_flow(db):
    assert db.register("g", [cell()]) == {"k1": "pending"}
    assert db.register("g", [cell()]) == {"k1": "pending"}  # idempotent
    assert db.claim("k1", job_id="42")
    assert not db.claim("k1"), "a running cell must not be claimed twice"
    db.log_metrics("k1", [("train_loss", 10, 2.0), ("train_loss", 20, 1.5)])
    db.log_metrics("k1", [("train_loss", 20, 1.4)])  # a resumed run rewrites its step
    assert db.curve("k1", "train_loss") == [(10, 2.0), (20, 1.4)]
    db.finish("k1", {"align_acc": 0.5, "fid_domain": 3.0}, [("model", "/x/model.pt")])
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
    assert db.claim("k1")
    db.fail("k1", "ValueError: boom\nTraceback ...")
    run = db.run("k1")
    assert run.status == "failed" and run.error.startswith("ValueError: boom")
    assert not db.claim("k1", allow=("pending",))
    assert db.claim("k1")  # default allow includes failed (what --retry-failed uses)
    assert db.run("k1").attempts == 2


def test_finish_is_all_or_nothing(db):
    db.register("g", [cell()])
    db.claim("k1")

    class Boom:
        def __float__(self):
            raise RuntimeError("metric cannot be converted")

    with pytest.raises(RuntimeError):
        db.finish("k1", {"align_acc": 0.5, "bad": Boom()}, [("model", "/m.pt")])
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
    db.claim("b")
    time.sleep(1.1)
    db.heartbeat("b")
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

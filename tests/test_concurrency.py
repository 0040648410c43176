"""Many writers at once, on one SQLite file and on a real PostgreSQL: every row lands exactly once
and no writer fails on a lock; racing claims give each run to exactly one writer."""
from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import func, select

from ablate.db import Database, Metric, Run

WRITERS = 16
OWN_RUNS, STEPS = 3, 20


def _writer(url: str, w: int) -> dict:
    """Registers its own runs plus shared ones, races for the shared ones, logs curves, finishes."""
    db = Database(url)
    try:
        own = [(f"w{w}-r{i}", "fake", i, {"w": w, "i": i}, {}) for i in range(OWN_RUNS)]
        shared = [(f"shared-{i}", "fake", i, {"i": i}, {}) for i in range(4)]
        db.register(f"grid-{w % 4}", own + shared)  # shared keys: concurrent inserts of one row
        tokens = {key: tok for key, *_ in shared if (tok := db.claim(key, job_id=f"w{w}"))}
        won = list(tokens)
        for key, *_ in own:
            tokens[key] = db.claim(key, job_id=f"w{w}")
        for key, tok in tokens.items():
            for step in range(1, STEPS + 1):
                db.log_metrics(key, [("train_loss", step, 1.0 / step), ("lr", step, 0.1)], tok)
                if step % 5 == 0:
                    assert db.heartbeat(key, tok)
            db.finish(key, {"fid_domain": float(w), "align_acc": 0.5}, [("model", f"/m/{key}")], token=tok)
        return {"won": won}
    finally:
        db.close()


def test_sixteen_writers_lose_nothing_and_duplicate_nothing(any_db_url):
    Database(any_db_url).close()  # schema first, as `ablate run` does before launching jobs
    ctx = mp.get_context("spawn")
    with ctx.Pool(WRITERS) as pool:
        results = pool.starmap(_writer, [(any_db_url, w) for w in range(WRITERS)])  # raises if any writer failed
    winners = [k for r in results for k in r["won"]]
    assert sorted(winners) == [f"shared-{i}" for i in range(4)], "each shared run claimed exactly once"
    db = Database(any_db_url)
    try:
        with db.tx() as s:
            n_runs = s.scalar(select(func.count()).select_from(Run))
            statuses = set(s.scalars(select(Run.status)))
            n_curve = s.scalar(select(func.count()).select_from(Metric).where(Metric.step.is_not(None)))
            n_final = s.scalar(select(func.count()).select_from(Metric).where(Metric.step.is_(None)))
            attempts = set(s.scalars(select(Run.attempts)))
        total = WRITERS * OWN_RUNS + 4
        assert n_runs == total and statuses == {"done"} and attempts == {1}
        assert n_curve == total * STEPS * 2 and n_final == total * 2
        assert sorted(db.grids()) == [f"grid-{i}" for i in range(4)]
    finally:
        db.close()

"""Shared by the table tests: a results database of varied, random runs, written in bulk (as
``ablate bench table`` writes its own) on any database URL.

What it varies is what the table must get right: several grids, registered and unregistered
variants, several configurations per variant (width, learning rate, a list-valued key, a key some
specs lack), seeds, every status, runs of one configuration by two code versions and by unknown
code, runs without a configuration key or a finishing time, metrics that some runs lack, metrics
with ties, equal means and no spread, runs of several ranks, and values of any magnitude."""
from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import insert

from ablate.config import RunSpec, stored_config_key
from ablate.db import Database, GridRun, Metric, Run

VARIANTS = ["transformer", "mamba-prefix", "uvit", "m-mamba", "not-registered"]
METRICS = ["fid_domain", "kid_domain", "align_acc", "clip_score", "blank_rate", "train_tokens_per_s",
           "peak_mem_mb", "params", "precision_domain", "my_loss", "world_size", "global_batch",
           "train_cpu_share", "sample_cpu_share"]
STATUSES = ["done"] * 12 + ["failed", "pending", "running", "lost", "cancelled", "superseded", "superseded"]


def _value(rng: random.Random, name: str, base: float, magnitudes: int) -> float:
    """A metric value around ``base``: mostly noise, sometimes a repeat or a far outlier."""
    if name == "world_size":
        return float(rng.choice([1, 1, 2, 4]))
    if name == "global_batch":
        return float(rng.choice([64, 128]))
    if name.endswith("_cpu_share"):
        return rng.choice([0.97, 0.99, 1.0, 0.55, 0.79, 0.8])  # alone, or beside a neighbour (< 0.8)
    if name == "params":
        return base  # no spread within a configuration
    roll = rng.random()
    if roll < 0.15:
        return round(base, 2)  # ties
    if roll < 0.2:
        return base * 10.0 ** rng.randint(-magnitudes, magnitudes)  # any magnitude
    return base + rng.gauss(0, abs(base) * rng.choice([0.001, 0.05, 0.5]) + 1e-9)


def random_db(url: str, seed: int, runs: int = 120, magnitudes: int = 12) -> Database:
    """Write ``runs`` random runs (grids ``g1`` and ``g2``, ``g2`` sharing some of ``g1``'s runs)
    into the database at ``url`` (made here); returns it open. Some values are scaled by up to
    ``10**magnitudes`` either way."""
    rng = random.Random(seed)
    db = Database(url)
    base = RunSpec().model_dump(mode="json")
    t0 = datetime(2025, 1, 1)
    configs = []
    for v in VARIANTS[:rng.randint(2, len(VARIANTS))]:
        for c in range(rng.randint(1, 4)):
            width, lr = rng.choice([64, 96, 128]), rng.choice([1e-3, 3e-3])
            spec = {**base, "model": {**base["model"], "variant": v, "width": width},
                    "train": {**base["train"], "lr": lr}}
            if c == 2:
                spec["model"]["params"] = {"scan": rng.choice(["raster", "cross"]), "layers": [1, c]}
            over = {"model.variant": v, "model.width": width, "train.lr": lr}
            codes = [None] if rng.random() < 0.15 else rng.sample(["a" * 16, "b" * 16, "c" * 16], rng.randint(1, 2))
            means = {m: rng.choice([0.5, 10.0, 123.25, 1e6 + 0.1]) * rng.uniform(0.5, 1.5) for m in METRICS}
            configs.append((v, spec, over, codes, means, rng.random() < 0.1))
    run_rows, link_rows, metric_rows = [], [], []
    for i in range(runs):
        v, spec, over, codes, means, unkeyed = configs[rng.randrange(len(configs))]
        seed_i = rng.randint(0, 6)
        status = rng.choice(STATUSES)
        started = status not in ("pending", "cancelled")
        full = {**spec, "seed": seed_i}
        run_rows.append(dict(
            id=i + 1, key=f"r{seed}-{i:05d}" + ("@old" if status == "superseded" else ""), grid="g1", variant=v,
            seed=seed_i, spec=full, overrides=over, status=status, created_at=t0, attempts=int(started),
            config_key=None if unkeyed else stored_config_key(full),
            fingerprint=rng.choice(codes) if started else None,
            finished_at=t0 + timedelta(seconds=rng.randint(0, 50)) if started and rng.random() > 0.1 else None,
            error=rng.choice(["RuntimeError: boom\nTraceback ...", "ValueError: nan loss", ""])
            if status == "failed" else None))
        link_rows.append(dict(grid="g1", run_id=i + 1, overrides=over))
        if rng.random() < 0.4:
            link_rows.append(dict(grid="g2", run_id=i + 1, overrides={**over, "sample.guidance": 2.0}))
        if status in ("done", "superseded", "failed"):
            for m in METRICS:
                if rng.random() < 0.85:
                    value = _value(rng, m, means[m], magnitudes)
                    metric_rows.append(dict(run_id=i + 1, name=m, step=None, value=value))
            metric_rows.append(dict(run_id=i + 1, name="train_loss", step=10, value=rng.random()))
    with db.tx() as s:
        s.execute(insert(Run), run_rows)
        s.execute(insert(GridRun), link_rows)
        if metric_rows:
            s.execute(insert(Metric), metric_rows)
    return db

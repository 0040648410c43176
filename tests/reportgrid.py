"""Shared by the HTML report tests: a results database written through the harness's own
transactions, with the artifacts real jobs leave (sample-sheet snapshots written by the
trainer's own ``save_sheet``, final samples with their captions, failure cases), and a hostile
caption among them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ablate.config import RunSpec
from ablate.db import Database
from ablate.train import save_sheet

HOSTILE = '<img src=x onerror=alert(1)><script>alert(2)</script>'
PROMPTS = ["a large red circle in the top left", HOSTILE, "a small blue square in the center"]
STEPS = (10, 20)  # the fixture specs' snapshot steps: every train.eval_every=10 up to train.steps=20

# (variant, overrides, seed, status, final metrics)
RUNS = [
    ("transformer", {}, 0, "done", {"fid_domain": 10.0, "align_acc": 0.50, "train_tokens_per_s": 900.0}),
    ("transformer", {}, 1, "done", {"fid_domain": 12.0, "align_acc": 0.70, "train_tokens_per_s": 1100.0}),
    ("mamba-prefix", {"model.width": 64}, 0, "done", {"fid_domain": 8.0, "align_acc": 0.40, "train_tokens_per_s": 500.0}),
    ("mamba-prefix", {"model.width": 64}, 1, "done", {"fid_domain": 9.0, "align_acc": 0.30, "train_tokens_per_s": 450.0}),
    ("mamba-prefix", {"model.width": 32}, 0, "done", {"fid_domain": 30.0, "align_acc": 0.90, "train_tokens_per_s": 2000.0}),
    ("mamba-prefix", {"model.width": 32}, 1, "failed", {}),
    ("uvit", {}, 0, "done", {"fid_domain": 20.0, "align_acc": 0.20, "train_tokens_per_s": 300.0}),
    ("uvit", {}, 1, "pending", {}),
]


def spec(variant: str, overrides: dict, seed: int, steps=STEPS) -> dict:
    """A resolved spec whose snapshot steps (every train.eval_every up to train.steps) are ``steps``."""
    return RunSpec.model_validate({"model": {"variant": variant, "width": overrides.get("model.width", 96)},
                                   "train": {"steps": max(steps), "eval_every": min(steps)},
                                   "seed": seed}).model_dump(mode="json")


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """uint8 [n, 3, size, size]: a dark tile with one coloured square, different per seed."""
    g = np.random.default_rng(seed)
    out = np.full((n, 3, size, size), 20, dtype=np.uint8)
    for i in range(n):
        y, x = g.integers(0, size - 3, 2)
        out[i, :, y:y + 3, x:x + 3] = g.integers(60, 255, (3, 1, 1))
    return torch.from_numpy(out)


def write_artifacts(folder: Path, seed: int, prompts=PROMPTS, steps=STEPS, tile: int = 8,
                    n_samples: int = 10) -> list[tuple[str, str]]:
    """What a finished job leaves: ``sheet/`` (prompts x ``steps``), ``samples.png`` and
    ``samples.txt``, and a ``failures/`` folder; returns its (kind, path) artifact rows."""
    sheet = folder / "sheet"
    for step in steps:
        save_sheet(_images(len(prompts), seed * 100 + step, tile), sheet / f"step_{step:06d}.png", cols=len(prompts))
    (sheet / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "tile": [tile, tile], "gap": 2}))
    captions = [prompts[i % len(prompts)] for i in range(n_samples)]
    save_sheet(_images(n_samples, seed, tile), folder / "samples.png")
    (folder / "samples.txt").write_text("\n".join(captions) + "\n")
    fail = folder / "failures"
    save_sheet(_images(1, seed + 7, tile), fail / "0.png", cols=1)
    (fail / "failures.json").write_text(json.dumps({"items": [
        {"file": "0.png", "caption": HOSTILE, "read": "a small green triangle in the bottom"}]}))
    return [("sheet", str(sheet)), ("samples", str(folder / "samples.png")), ("failures", str(fail))]


def build(root: Path, grid: str = "g", runs=RUNS, steps=STEPS, **artifacts) -> tuple[Database, str]:
    """A fresh database at ``root/results/ablate.db`` holding ``runs`` in ``grid`` (curves
    ``train_loss`` and ``val_loss`` at ``steps``; finished runs with their artifacts, shaped by
    ``artifacts`` (:func:`write_artifacts`' options), under ``root/results/runs/<key>``);
    returns (database, URL)."""
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{results / 'ablate.db'}"
    db = Database(url)
    cells = [(f"key{i:02d}", v, seed, spec(v, over, seed, steps), {"model.variant": v, **over})
             for i, (v, over, seed, _, _) in enumerate(runs)]
    db.register(grid, cells)
    for (key, *_), (_, _, seed, status, final) in zip(cells, runs):
        if status == "pending":
            continue
        tok = db.claim(key)
        db.set_provenance(key, tok, "rev", "f" * 40)
        db.log_metrics(key, [("train_loss", s, 3.0 / s + seed) for s in steps]
                       + [("val_loss", s, 3.5 / s + seed) for s in steps], token=tok)
        if status == "done":
            db.finish(key, final, write_artifacts(results / "runs" / key, seed, steps=steps, **artifacts), token=tok)
        else:
            db.fail(key, "RuntimeError: <script>alert(3)</script> went wrong\nTraceback ...", token=tok)
    return db, url


def build_study(root: Path, name: str = "s", values=(5.0, 3.0, 4.0, 1.0, 2.0)) -> tuple[str, list[float]]:
    """A database at ``root/ablate.db`` with an Optuna study ``name`` (minimize fid_domain; a
    log-scale ``train.lr`` and a categorical ``model.width``) whose trials are finished runs
    linked as ``ablate study`` links them; returns (URL, the trials' values)."""
    import optuna

    from ablate.study.runner import storage_for

    url = f"sqlite:///{root / 'ablate.db'}"
    db = Database(url)
    study = optuna.create_study(study_name=name, storage=storage_for(url), direction="minimize")
    study.set_user_attr("objectives", ["fid_domain"])
    for n, v in enumerate(values):
        t = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "model.width": optuna.distributions.CategoricalDistribution([32, 64])})
        width, key = t.params["model.width"], f"{name}-trial{n}"
        db.register_trial(name, t.number, f"study:{name}", key, "transformer", 0,
                          spec("transformer", {"model.width": width}, 0),
                          {"model.variant": "transformer", "model.width": width, "train.lr": t.params["train.lr"]})
        db.finish(key, {"fid_domain": v}, token=db.claim(key))
        study.tell(t, v)
    getattr(study._storage, "_backend", study._storage).engine.dispose()
    db.close()
    return url, list(values)

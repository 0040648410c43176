"""The tokenizer as a grid axis: cells that differ only in the generator share one preparation
(one tokenizer trained once), each distinct tokenizer gets its own, and the table keeps the
tokenizers apart, so their reconstruction metrics and their generators' scores sit side by side."""
from __future__ import annotations

import pytest
import torch

import ablate.tokenizer.vqvae as vqvae
from ablate.db import Database
from ablate.grid import GridFile, expand
from ablate.prepare import cache_keys, prep_key, prepare
from ablate.report import build_table

GRID = {
    "name": "tok-axis",
    "base": {"data": {"name": "shapes", "image_size": 16, "n_train": 64, "n_val": 16, "n_test": 16},
             "tokenizer": {"codebook_size": 16, "code_dim": 8, "hidden": 16, "downsample": 4, "steps": 3,
                           "batch_size": 16},
             "model": {"width": 32, "depth": 1, "heads": 2}},
    "axes": {"model.width": [32, 48]},
    # MSE-only vs the VQGAN recipe: one axis of several tokenizer keys
    "zip": [{"tokenizer.disc_weight": [0.0, 0.5], "tokenizer.disc_layers": [3, 1],
             "tokenizer.l1_weight": [0.0, 1.0], "tokenizer.ema_weights": [0.0, 0.9]}],
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def grid():
    return expand(GridFile.model_validate(GRID))


def test_each_distinct_tokenizer_is_one_preparation(grid, tmp_path, monkeypatch):
    assert len(grid.cells) == 8
    by_prep: dict[str, set] = {}
    for c in grid.cells:
        by_prep.setdefault(prep_key(c.spec), set()).add(cache_keys(c.spec)["tokenizer"])
    assert len(by_prep) == 2 and all(len(v) == 1 for v in by_prep.values()), by_prep
    # preparing every cell trains each distinct tokenizer once
    trained = []
    real = vqvae.train_tokenizer
    monkeypatch.setattr(vqvae, "train_tokenizer", lambda spec, *a, **k: trained.append(spec) or real(spec, *a, **k))
    for c in grid.cells:
        prepare(c.spec, tmp_path, torch.device("cpu"), say=lambda s: None, parts=("tokenizer",))
    assert sorted(t.disc_weight for t in trained) == [0.0, 0.5]


def test_the_table_keeps_tokenizers_apart(grid, tmp_path):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    try:
        db.register(grid.name, [(c.key, c.variant, c.seed, c.spec.model_dump(mode="json"), c.overrides)
                                for c in grid.cells if c.spec.model.width == 32])
        for c in grid.cells:
            if c.spec.model.width != 32:
                continue
            gan = c.spec.tokenizer.disc_weight > 0
            token = db.claim(c.key)
            db.finish(c.key, {"tok_recon_mse": 0.002 if gan else 0.004, "tok_fid_domain": 3.0 if gan else 5.0,
                              "fid_domain": (10.0 if gan else 12.0) + c.seed}, token=token)
        t = build_table(db, grid.name, metrics=["tok_recon_mse", "tok_fid_domain", "fid_domain"])
    finally:
        db.close()
    rows = t[t["Method"] == "transformer"].set_index("Hyperparameters")
    assert len(rows) == 2 and (rows["n"] == 2).all()
    gan = next(h for h in rows.index if "tokenizer.disc_weight=0.5" in h)
    plain = next(h for h in rows.index if "tokenizer.disc_weight=0.0" in h)
    assert "tokenizer.ema_weights=0.9" in gan and "tokenizer.l1_weight=1.0" in gan
    assert rows.loc[gan, "tok_recon_mse"] == 0.002 and rows.loc[plain, "tok_recon_mse"] == 0.004
    assert rows.loc[gan, "fid_domain"] == 10.5 and rows.loc[plain, "fid_domain"] == 12.5

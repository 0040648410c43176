"""Training: exact resume from a checkpoint, learning-rate schedule, text actually conditions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ablate.config import RunSpec
from ablate.prepare import prepare
from ablate.train import Trainer, lr_factor
from variant_case import assert_resume_is_exact

TINY = {
    "data": {"name": "shapes", "image_size": 16, "n_train": 128, "n_val": 16, "n_test": 16},
    "tokenizer": {"codebook_size": 16, "code_dim": 8, "hidden": 16, "downsample": 4, "steps": 10, "batch_size": 16},
    "text": {"max_len": 10, "width": 16, "heads": 2, "layers": 1},
    "model": {"variant": "transformer", "width": 32, "depth": 1, "heads": 2, "params": {"mlp_ratio": 4.0, "qk_norm": False}},
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "eval_every": 3,
              "checkpoint_every": 3, "throughput_warmup": 0, "ema_decay": 0.9},
    "eval": {"n_images": 8, "judge_steps": 5},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    spec = RunSpec.model_validate(TINY)
    return spec, root, prepare(spec, root, torch.device("cpu"), lambda m: None)


def test_resume_is_exact(prepared):
    spec, root, prep = prepared
    assert_resume_is_exact(spec, prep, root, stop_at=3)


def test_batches_cover_each_epoch_once(prepared):
    spec, root, prep = prepared
    tr = Trainer(spec, prep, torch.device("cpu"), root / "runs" / "epochs")
    n = len(tr.data["train"])
    per_epoch = n // spec.train.batch_size
    seen = torch.cat([tr.batch_indices(s) for s in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(n))
    assert not torch.equal(tr.batch_indices(0), tr.batch_indices(per_epoch)), "epochs are reshuffled"


def test_lr_schedule():
    t = RunSpec.model_validate({"train": {"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}}).train
    assert lr_factor(0, t) == pytest.approx(0.1)
    assert lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(100, t) == pytest.approx(0.1)
    assert lr_factor(55, t) == pytest.approx(0.55)

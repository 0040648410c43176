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


def test_cpu_share_tells_a_contended_job_from_one_that_had_its_core(prepared, tmp_path):
    """train_cpu_share: about 1 for a job alone on its core; about 1/2 when another process spins
    on the same core (both pinned to it), so a table can say its throughput was measured contended."""
    import os
    import subprocess
    import sys

    from ablate.train import cpu_share

    assert cpu_share(1.0, 2.0) == pytest.approx(0.5 / max(1, torch.get_num_threads()))
    if not hasattr(os, "sched_setaffinity"):
        if os.environ.get("CI"):  # CI runs on Linux
            pytest.fail("CI: os.sched_setaffinity missing")
        pytest.skip("needs os.sched_setaffinity (Linux)")
    spec, root, prep = prepared
    spec = RunSpec.model_validate({**TINY, "train": {**TINY["train"], "steps": 40}})
    cpu = min(os.sched_getaffinity(0))
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    shares = {}
    try:
        for contended in (False, True):
            spin = None
            if contended:
                spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
            try:
                tr = Trainer(spec, prep, torch.device("cpu"), tmp_path / f"c{contended}")
                tr.train()
                shares[contended] = tr.final_metrics()["train_cpu_share"]
            finally:
                if spin is not None:
                    spin.kill()
                    spin.wait()
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)
    assert shares[False] > 0.8, shares
    assert shares[True] < 0.75, shares

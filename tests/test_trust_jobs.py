"""A job's results can be trusted: preemption anywhere requeues instead of losing the run, the
preparation key is the caches' own keys, attempts never overwrite each other's checkpoints,
``peak_mem_mb`` is the model's training memory, and the code fingerprint sees code, not comments.
On SQLite and a real PostgreSQL where a database is involved."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from ablate.config import RunSpec, run_key
from ablate.db import Database

TINY = {
    "data": {"name": "shapes", "image_size": 16, "n_train": 128, "n_val": 16, "n_test": 16},
    "tokenizer": {"codebook_size": 16, "code_dim": 8, "hidden": 16, "downsample": 4, "steps": 10, "batch_size": 16},
    "text": {"max_len": 10, "width": 16},
    "model": {"variant": "transformer", "width": 32, "depth": 1, "heads": 2},
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "eval_every": 3,
              "checkpoint_every": 3, "throughput_warmup": 0, "ema_decay": 0.9},
    "sample": {"steps": 4, "batch_size": 4},
    "eval": {"n_images": 12, "judge_steps": 5, "sheet_prompts": 0},
}
QUALITY = ("train_steps", "train_loss", "val_loss", "align_acc", "fid_domain", "blank_rate")


def _register(url: str, spec: RunSpec) -> str:
    db = Database(url)
    key = run_key(spec)
    db.register("trust", [(key, spec.model.variant, spec.seed, spec.model_dump(mode="json"), {})])
    db.close()
    return key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of TINY (its caches are shared by the tests below)."""
    from ablate.jobs import run_job

    root = tmp_path_factory.mktemp("ref")
    url = f"sqlite:///{root / 'ref.db'}"
    spec = RunSpec.model_validate(TINY)
    key = _register(url, spec)
    assert run_job(key, url, str(root), 1)["status"] == "done"
    db = Database(url, create=False)
    final = db.final_metrics(key)
    db.close()
    return root, final


@pytest.mark.parametrize("phase", ["prepare", "sample", "evaluate"])
def test_preemption_anywhere_requeues_and_resumes_to_the_same_result(reference, any_db_url, phase, monkeypatch,
                                                                     tmp_path):
    """The preemption signal (here: its flag) arriving during preparation, sampling or
    evaluation stops the job at the next safe point: the run is ``pending`` (requeued), never
    lost, and the next attempt finishes with the uninterrupted run's numbers."""
    import shutil

    import ablate.eval
    from ablate import preempt
    from ablate.jobs import run_dir, run_job
    from ablate.train import Trainer

    root, want = reference
    results = tmp_path / "results"
    shutil.copytree(root / "cache", results / "cache")
    spec = RunSpec.model_validate(TINY)
    key = _register(any_db_url, spec)
    flag = {"on": phase == "prepare"}
    monkeypatch.setattr(preempt, "requested", lambda: flag["on"])
    if phase == "sample":
        orig = Trainer.generate

        def generate(self, *a, **kw):
            flag["on"] = True
            return orig(self, *a, **kw)
        monkeypatch.setattr(Trainer, "generate", generate)
    elif phase == "evaluate":  # the signal arrives while the generated images are scored
        orig_eval, orig_evaluate = ablate.eval.evaluate_images, Trainer.evaluate

        def evaluate_images(*a, **kw):
            flag["on"] = True
            return orig_eval(*a, **kw)

        def evaluate(self):
            monkeypatch.setattr(ablate.eval, "evaluate_images", evaluate_images)
            try:
                return orig_evaluate(self)
            finally:
                monkeypatch.setattr(ablate.eval, "evaluate_images", orig_eval)
        monkeypatch.setattr(Trainer, "evaluate", evaluate)

    res = run_job(key, any_db_url, str(results), 1)
    assert res["status"] == "pending", res
    db = Database(any_db_url, create=False)
    run = db.run(key)
    assert run.status == "pending" and "preempted" in run.error and not db.final_metrics(key)
    ckpts = list(run_dir(results, key).glob("ckpt*.pt"))
    if phase == "prepare":
        assert not ckpts, "stopped before training"
    else:
        assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=True)["step"] == spec.train.steps

    flag["on"] = False
    monkeypatch.undo()
    assert run_job(key, any_db_url, str(results), 1)["status"] == "done"
    run, got = db.run(key), db.final_metrics(key)
    db.close()
    assert run.status == "done" and run.attempts == 2
    for name in QUALITY:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    assert not list(run_dir(results, key).glob("ckpt*.pt")), "checkpoints go once the result is committed"


def test_prep_key_is_made_of_the_caches_own_keys(reference):
    """One source of truth: the keys `prep_key` hashes are the ones the tokenizer and judge
    caches were written under, and every judge setting changes it."""
    from ablate.prepare import cache_keys, prep_key

    root, _ = reference
    spec = RunSpec.model_validate(TINY)
    keys = cache_keys(spec)
    assert (root / "cache" / "tokenizer" / keys["tokenizer"] / "vqvae.pt").exists()
    assert (root / "cache" / "judge" / keys["judge"] / "judge.pt").exists()
    base = prep_key(spec)
    for field, value in [("judge_batch_size", 7), ("judge_lr", 1e-4), ("judge_width", 8), ("judge_steps", 9)]:
        other = RunSpec.model_validate({**TINY, "eval": {**TINY["eval"], field: value}})
        assert prep_key(other) != base, field
    same = RunSpec.model_validate({**TINY, "model": {**TINY["model"], "width": 64}, "seed": 3})
    assert prep_key(same) == base, "the generator's settings share the preparation"


def _checkpointed(reference, out: Path, steps: int):
    """(spec, preparation, a Trainer of attempt ``aaaa`` in ``out`` that trained ``steps`` steps
    and saved its checkpoint)."""
    from ablate.prepare import prepare
    from ablate.train import Trainer

    root, _ = reference
    spec = RunSpec.model_validate(TINY)
    prep = prepare(spec, root, torch.device("cpu"), lambda m: None)
    a = Trainer(spec, prep, torch.device("cpu"), out, attempt="aaaa")
    for _ in range(steps):
        a.train_step(a.step)
        a.step += 1
    a.save_checkpoint()
    return spec, prep, a


def test_attempts_keep_their_own_checkpoints_and_resume_from_the_furthest(reference, tmp_path):
    from ablate.train import Trainer, latest_checkpoint, remove_checkpoints

    out = tmp_path / "run"
    spec, prep, a = _checkpointed(reference, out, 3)
    b = Trainer(spec, prep, torch.device("cpu"), out, attempt="bbbb")
    assert b.step == 3, "a new attempt resumes from the other attempt's checkpoint"
    b.train_step(b.step)
    b.step += 1
    b.save_checkpoint()
    a.step = 1  # a stale attempt writes only its own file
    a.save_checkpoint()
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt-aaaa.pt", "ckpt-bbbb.pt"]
    assert latest_checkpoint(out).name == "ckpt-bbbb.pt", "the furthest checkpoint wins, not the newest file"
    remove_checkpoints(out)
    assert not list(out.glob("ckpt*.pt"))


def test_a_checkpoint_written_by_other_code_is_not_resumed(reference, tmp_path):
    """A lost run resumed after the code changed would mix two code versions in one result (and
    be recorded under the new one): its checkpoint is removed and training starts over. So is a
    checkpoint that does not say which code wrote it."""
    from ablate.fingerprint import variant_fingerprint
    from ablate.train import Trainer, latest_checkpoint
    from ablate.utils import torch_load

    out = tmp_path / "run"
    spec, prep, _ = _checkpointed(reference, out, 2)
    st = torch_load(out / "ckpt-aaaa.pt")
    assert st["fingerprint"] == variant_fingerprint(spec.model.variant)
    assert Trainer(spec, prep, torch.device("cpu"), out, attempt="bbbb").step == 2, "same code: resumed"

    for theirs in ("0.1.0-0000000000000000", None):
        torch.save({**st, "fingerprint": theirs}, out / "ckpt-aaaa.pt")
        said: list[str] = []
        b = Trainer(spec, prep, torch.device("cpu"), out, say=said.append, attempt="cccc")
        assert b.step == 0, f"a checkpoint of {theirs} was resumed"
        assert not (out / "ckpt-aaaa.pt").exists() and latest_checkpoint(out) is None
        assert any("ckpt-aaaa.pt was written by other code" in m and "starts over" in m for m in said), said


def test_peak_mem_is_the_models_training_memory_not_the_process_peak(reference):
    """Measured over the training steps only: a small model trained after a big one in the same
    process reports its own memory (ru_maxrss would report the big one's), and a bigger batch
    takes more."""
    from ablate.prepare import prepare
    from ablate.train import Trainer

    root, _ = reference
    spec = RunSpec.model_validate(TINY)
    prep = prepare(spec, root, torch.device("cpu"), lambda m: None)

    def peak(width: int, batch: int, tmp: Path) -> float:
        s = RunSpec.model_validate({**TINY, "model": {**TINY["model"], "width": width},
                                    "train": {**TINY["train"], "batch_size": batch, "steps": 2}})
        t = Trainer(s, prep, torch.device("cpu"), tmp)
        t.train()
        mb = t.final_metrics()["peak_mem_mb"]
        del t
        return mb

    big = peak(512, 128, root / "mem_big")
    small = peak(32, 8, root / "mem_small")
    assert math.isfinite(big) and math.isfinite(small)
    assert small < big / 4, (small, big)


def _module(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_fingerprint_sees_code_not_comments_or_docstrings(tmp_path):
    from ablate.fingerprint import _variant_digest, source_digest

    a = _module(tmp_path / "a.py", '''
        """Module docstring."""
        def f(x):
            """Doc."""
            return x + 1  # a comment
        ''')
    b = _module(tmp_path / "b.py", '''
        def f(x):

            return (x +
                    1)
        ''')
    c = _module(tmp_path / "c.py", '''
        def f(x):
            return x + 2
        ''')
    assert source_digest(a) == source_digest(b), "comments, docstrings and layout do not count"
    assert source_digest(a) != source_digest(c), "a changed constant does"
    pkg = tmp_path / "plug"
    pkg.mkdir()
    helper = _module(pkg / "_common.py", "def g():\n    return 1\n")
    variant = _module(pkg / "v.py", "from ._common import g\nVARIANT = g\n")
    before = _variant_digest.__wrapped__(str(variant))
    helper.write_text("def g():\n    return 2\n")
    assert _variant_digest.__wrapped__(str(variant)) != before, "a shared helper the variant imports counts"


def test_each_variant_has_its_own_fingerprint():
    from ablate.fingerprint import variant_fingerprint

    a, b = variant_fingerprint("transformer"), variant_fingerprint("mamba-prefix")
    from ablate import __version__
    assert a != b and a.startswith(__version__ + "-") and len(a.split("-")[-1]) == 16


def test_config_key_is_the_run_key_without_the_seed_on_stored_specs():
    """Seeds of one configuration share its key; a spec stored before a key-changing field
    existed never shares a configuration with runs made after it; fields added as LATER and
    absent from old specs count as their default, as in the run key."""
    from ablate.config import config_key, stored_config_key

    a = RunSpec()
    assert config_key(a) == config_key(RunSpec(seed=3))
    old = a.model_dump(mode="json")
    del old["data"]["heldout"]
    assert stored_config_key(old) != config_key(a), "an old spec is filled in with today's defaults"
    later = a.model_dump(mode="json")
    del later["sample"]["remask"], later["eval"]["sheet_steps"]
    assert stored_config_key(later) == config_key(a)
    assert config_key(RunSpec.model_validate({"sample": {"remask": "critic"}})) != config_key(a)
    assert config_key(RunSpec.model_validate({"model": {"width": 48}})) != config_key(a)


def test_stale_cells_are_listed_and_rerun_keeping_the_old_runs_as_history(tmp_path, capsys):
    """A cell done by other code (its fingerprint differs from the installed code's) is listed
    as stale by `ablate status`; `ablate run --rerun-stale` retrains it under its key, while the
    old run stays in the database, with its metrics and files, as `superseded` history."""
    import jobgrid
    from sqlalchemy import update

    from ablate.cli import main
    from ablate.db import Run

    grid = jobgrid.write_grid(tmp_path / "g.yaml", "stale", launcher="{executor: debug}", steps=4, ckpt=2)
    results, url = tmp_path / "results", f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", str(grid), "--results", str(results), "--db", url, "--no-table"]) == 0
    from ablate.report import load_runs
    from ablate.results import artifacts

    db = Database(url, create=False)
    key = load_runs(db, "stale")["key"].iloc[0]
    before = db.final_metrics(key)
    with db.tx() as s:  # as if trained by the code before a fix
        s.execute(update(Run).where(Run.key == key).values(fingerprint="0.0.9-0123456789abcdef"))
    db.close()
    capsys.readouterr()
    assert main(["status", "stale", "--db", url, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 stale" in out and "0.0.9-0123456789abcdef" in out
    assert main(["run", str(grid), "--results", str(results), "--db", url, "--no-table"]) == 0
    assert "nothing to run" in capsys.readouterr().out, "without --rerun-stale a done cell stays done"
    assert main(["run", str(grid), "--results", str(results), "--db", url, "--no-table", "--rerun-stale"]) == 0
    db = Database(url, create=False)
    try:
        new = db.run(key)
        from ablate.fingerprint import variant_fingerprint
        assert new.status == "done" and new.fingerprint == variant_fingerprint("transformer")
        runs = load_runs(db, "stale")
        old = runs[runs["key"] != key].iloc[0]
        assert old["status"] == "superseded" and old["key"].startswith(key + "@")
        assert db.final_metrics(old["key"]) == before, "the history keeps its numbers"
        assert (results / "runs" / old["key"] / "model.pt").exists(), "and its files"
        assert (results / "runs" / key / "model.pt").exists()
        arts = artifacts(db, "stale")
        paths = arts.loc[arts["key"] == old["key"], "path"].tolist()
        assert paths and all(f"/{old['key']}/" in p or p.endswith(old["key"]) for p in paths), paths
    finally:
        db.close()
    capsys.readouterr()
    assert main(["status", "stale", "--db", url, "--results", str(results)]) == 0
    assert "stale (done by code" not in capsys.readouterr().out

"""`ablate prepare` and `ablate run` end to end on real files: webdataset shards of a few
thousand `shapes` images, a tiny diffusers VQModel and a tiny CLIP text model, all written here.
Preparation runs as 2 parallel encode tasks; a killed preparation redoes only unfinished shards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scale_data import tiny_clip_text, tiny_vqmodel, write_shards

pytest.importorskip("webdataset")
pytest.importorskip("diffusers")

N_SHARDS, PER_SHARD = 8, 250


def _ablate(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    train, _, _ = write_shards(root / "shards", "train", N_SHARDS, PER_SHARD, seed=0)
    val, _, _ = write_shards(root / "shards", "val", 1, 100, seed=1)
    test, _, _ = write_shards(root / "shards", "test", 1, 100, seed=2)
    vq = tiny_vqmodel(root / "vq")
    clip = tiny_clip_text(root / "clip")
    text = {"encoder": f"hf:{clip}", "max_len": 8} if clip else {"encoder": "learned", "max_len": 8}
    grid = {
        "name": "wds-e2e",
        "base": {
            "data": {"name": "webdataset", "urls": train, "val_urls": val, "test_urls": test,
                     "image_size": 16, "n_train": N_SHARDS * PER_SHARD, "n_val": 100, "n_test": 100},
            "tokenizer": {"kind": "diffusers", "path": str(vq)},
            "text": text,
            "model": {"width": 32, "depth": 1, "heads": 2},
            "train": {"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3, "checkpoint_every": 6,
                      "warmup_steps": 2},
            "sample": {"steps": 3, "batch_size": 32},
            "eval": {"n_images": 32, "sheet_prompts": 0, "clip_steps": 150},
        },
        "axes": {"model.variant": ["transformer", "mamba-prefix"]},
        "seeds": [0],
        "launcher": {"executor": "local", "jobs": 2, "cpus_per_job": 1, "prepare_tasks": 2, "timeout_min": 15},
    }
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    return root


def _finished(root: Path) -> dict[str, int]:
    """Finished train shards -> inode of their codes file (a rewritten shard gets a new one)."""
    return {p.parent.name: p.stat().st_ino
            for p in root.glob("results/cache/store/*/train/shard-*/codes.npy")}


@pytest.mark.slow
def test_prepare_killed_resumes_only_unfinished_shards_then_run_trains_from_the_store(project):
    dry = _ablate("prepare", "grid.yaml", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert f"train {N_SHARDS}, val 1, test 1" in dry.stdout and not (project / "results" / "cache").exists()

    # 1. prepare as two encode tasks; kill everything once a few shards are finished
    proc = subprocess.Popen([sys.executable, "-m", "ablate.cli", "prepare", "grid.yaml"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while len(_finished(project)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(project)
    assert 2 <= len(before) < N_SHARDS, f"kill came too late to test a resume: {sorted(before)}"
    assert not list(project.glob("results/cache/store/*/train/shard-*/.*")), "a partial shard looks finished"

    # 2. preparing again finishes only what was missing; finished shards are not rewritten
    again = _ablate("prepare", "grid.yaml", cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "as 2 task(s)" in again.stdout
    after = _finished(project)
    assert len(after) == N_SHARDS
    assert {k: after[k] for k in before} == before, "a finished shard was encoded again"
    logs = "".join(p.read_text() for p in project.glob("results/submitit/wds-e2e/*/*_log.out"))
    assert logs.count("encoded train shard") >= N_SHARDS - len(before)

    status_dir = project / "results"
    # 3. run: training from the store, evaluation, the table; nothing left to encode
    run = _ablate("run", "grid.yaml", cwd=project)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| transformer" in run.stdout and "| mamba-prefix" in run.stdout
    assert _finished(project) == after
    status = _ablate("status", cwd=project)
    assert f"train {N_SHARDS}/{N_SHARDS}, val 1/1, test 1/1" in status.stdout, status.stdout
    assert (status_dir / "ablate.db").exists()
    # unlabelled web data still gets quality and alignment metrics: the domain CLIP judge's,
    # with their real-data references (ceiling, chance, same-n floors) recorded in every run
    from ablate.results import load

    runs = load(grid="wds-e2e", results=status_dir)
    want = {"fid_domain", "kid_domain", "clip_domain", "clip_domain_real", "clip_domain_shuffled",
            "fid_domain_real", "kid_domain_real", "tok_clip_domain"}
    assert len(runs) == 2 and want <= set(runs.columns), sorted(runs.columns)
    for _, r in runs.iterrows():
        assert r["clip_domain_real"] > r["clip_domain_shuffled"] + 20, "the CLIP judge does not tell pairs apart"
        print(f"wds-e2e {r['variant']}: " + ", ".join(f"{k} {r[k]:.3f}" for k in sorted(want)))

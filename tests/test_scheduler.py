"""Executor wiring without running jobs: auto resolution, Slurm parameters from the grid's
launcher, one GPU per local job on a multi-GPU machine, squeue parsing."""
from __future__ import annotations

import pytest

from ablate import scheduler
from ablate.config import LauncherSpec


def test_auto_executor_follows_sbatch_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert scheduler.resolve_executor("auto") == "local"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    assert scheduler.resolve_executor("auto") == "slurm"
    assert scheduler.resolve_executor("debug") == "debug"
    with pytest.raises(ValueError, match="unknown executor"):
        scheduler.resolve_executor("kubernetes")


SLURM_LAUNCHER = {"slurm": {
    "partition": "gpu", "gpus_per_job": 2, "cpus_per_job": 6, "mem_gb": 40, "time_min": 90,
    "account": "lab", "qos": "high", "constraint": "a100", "array_parallelism": 8,
    "extra": {"exclude": "node3"}}}


def test_slurm_parameters_come_from_the_launcher(tmp_path):
    """Our part, on any machine: the sbatch parameters computed from launcher.slurm."""
    p = scheduler.slurm_parameters(tmp_path / "grid", LauncherSpec.model_validate(SLURM_LAUNCHER))
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["mem"], p["time"]) == ("gpu", 2, 6, "40GB", 90)
    assert (p["account"], p["qos"], p["constraint"], p["array_parallelism"]) == ("lab", "high", "a100", 8)
    assert p["additional_parameters"] == {"exclude": "node3"} and p["signal_delay_s"] == 120
    assert "gpus_per_node" not in scheduler.slurm_parameters(
        tmp_path, LauncherSpec.model_validate({"slurm": {"gpus_per_job": 0}})), "CPU-only jobs ask for no GPU"


def test_slurm_executor_writes_them_into_sbatch(tmp_path, slurm):
    """submitit's real Slurm executor (it needs srun on PATH) renders them as sbatch flags."""
    ex = scheduler.make_executor("slurm", tmp_path / "grid", LauncherSpec.model_validate(SLURM_LAUNCHER))
    sbatch = ex._make_submission_file_text("python -c pass", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=6", "--mem=40GB", "--time=90",
                 "--account=lab", "--qos=high", "--constraint=a100", "--exclude=node3", "--signal=USR2@120"):
        assert flag in sbatch, flag


def test_one_gpu_per_local_job(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "local_gpus", lambda: 2)
    runner = scheduler._Runner("local", tmp_path, LauncherSpec(jobs=4), slots=4, db=None)
    assert runner.slots == 2  # never two jobs on one GPU
    assert [ex.parameters.get("visible_gpus") for ex in runner.executors] == [(0,), (1,)]
    assert all(ex.parameters.get("gpus_per_node") == 1 for ex in runner.executors)
    monkeypatch.setattr(scheduler, "local_gpus", lambda: 0)
    cpu = scheduler._Runner("local", tmp_path, LauncherSpec(jobs=3), slots=3, db=None)
    assert cpu.slots == 3 and len(cpu.executors) == 1 and "visible_gpus" not in cpu.executors[0].parameters


def test_squeue_states(monkeypatch):
    class Out:
        returncode, stderr = 0, ""
        stdout = "12_0 RUNNING\n12_1 PENDING\n12_2 COMPLETED\n13 RUNNING\n"

    monkeypatch.setattr(scheduler.subprocess, "run", lambda *a, **k: Out())
    assert scheduler.slurm_active(["12_0", "12_1", "12_2", "13"]) == {"12_0", "12_1", "13"}

    class Gone:
        returncode, stdout, stderr = 1, "", "slurm_load_jobs error: Invalid job id specified"

    monkeypatch.setattr(scheduler.subprocess, "run", lambda *a, **k: Gone())
    assert scheduler.slurm_active(["99_0"]) == set()
    assert scheduler.slurm_active([]) == set()

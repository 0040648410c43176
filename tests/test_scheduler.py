"""Executor wiring without running jobs: auto resolution, Slurm parameters from the grid's
launcher, one GPU per local job on a multi-GPU machine, squeue parsing, the task layout of a
cell over several ranks, job ids and cancellation per kind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from ablate import launch
from ablate.launch import local as launch_local, slurm as launch_slurm
from ablate.config import LauncherSpec


def test_auto_executor_follows_sbatch_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert launch.resolve("auto") == "local"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    assert launch.resolve("auto") == "slurm"
    assert launch.resolve("debug") == "debug"
    with pytest.raises(ValueError, match="unknown executor"):
        launch.resolve("kubernetes")


SLURM_LAUNCHER = {"slurm": {
    "partition": "gpu", "gpus_per_job": 2, "cpus_per_job": 6, "mem_gb": 40, "time_min": 90,
    "account": "lab", "qos": "high", "constraint": "a100", "array_parallelism": 8,
    "extra": {"exclude": "node3"}}}


def test_slurm_parameters_come_from_the_launcher(tmp_path):
    """Our part, on any machine: the sbatch parameters computed from launcher.slurm."""
    p = launch.slurm_parameters(tmp_path / "grid", LauncherSpec.model_validate(SLURM_LAUNCHER))
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["mem"], p["time"]) == ("gpu", 2, 6, "40GB", 90)
    assert (p["account"], p["qos"], p["constraint"], p["array_parallelism"]) == ("lab", "high", "a100", 8)
    assert p["additional_parameters"] == {"exclude": "node3"} and p["signal_delay_s"] == 120
    assert "gpus_per_node" not in launch.slurm_parameters(
        tmp_path, LauncherSpec.model_validate({"slurm": {"gpus_per_job": 0}})), "CPU-only jobs ask for no GPU"


def test_slurm_executor_writes_them_into_sbatch(tmp_path, slurm):
    """submitit's real Slurm executor (it needs srun on PATH) renders them as sbatch flags."""
    ex = launch.executor("slurm", tmp_path / "grid", LauncherSpec.model_validate(SLURM_LAUNCHER)).submitters[0]
    sbatch = ex._make_submission_file_text("python -c pass", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=6", "--mem=40GB", "--time=90",
                 "--account=lab", "--qos=high", "--constraint=a100", "--exclude=node3", "--signal=USR2@120"):
        assert flag in sbatch, flag


def test_one_gpu_per_local_job(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_local, "local_gpus", lambda: 2)
    runner = launch.executor("local", tmp_path, LauncherSpec(jobs=4), 4)
    assert runner.slots == 2  # never two jobs on one GPU
    assert [ex.parameters.get("visible_gpus") for ex in runner.submitters] == [(0,), (1,)]
    assert all(ex.parameters.get("gpus_per_node") == 1 for ex in runner.submitters)
    monkeypatch.setattr(launch_local, "local_gpus", lambda: 0)
    cpu = launch.executor("local", tmp_path, LauncherSpec(jobs=3), 3)
    assert cpu.slots == 3 and len(cpu.submitters) == 1 and "visible_gpus" not in cpu.submitters[0].parameters


def test_squeue_states(monkeypatch):
    class Out:
        returncode, stderr = 0, ""
        stdout = "12_0 RUNNING\n12_1 PENDING\n12_2 COMPLETED\n13 RUNNING\n"

    monkeypatch.setattr(launch_slurm.subprocess, "run", lambda *a, **k: Out())
    assert launch.slurm_active(["12_0", "12_1", "12_2", "13"]) == {"12_0", "12_1", "13"}

    class Gone:
        returncode, stdout, stderr = 1, "", "slurm_load_jobs error: Invalid job id specified"

    monkeypatch.setattr(launch_slurm.subprocess, "run", lambda *a, **k: Gone())
    assert launch.slurm_active(["99_0"]) == set()
    assert launch.slurm_active([]) == set()


def test_task_layout_per_kind(tmp_path):
    """A cell's processes: local from tasks_per_job, Slurm one per GPU on each node, debug one;
    the cells' stage holds whole cells in its slots."""
    two = LauncherSpec.model_validate({"jobs": 4, "tasks_per_job": 2,
                                       "slurm": {"nodes": 2, "gpus_per_job": 4}})
    assert launch.KINDS["local"].layout(two) == (1, 2)
    assert launch.KINDS["slurm"].layout(two) == (2, 4)
    assert launch.KINDS["debug"].layout(two) == (1, 1)
    cpu_only = LauncherSpec.model_validate({"tasks_per_job": 2, "slurm": {"gpus_per_job": 0}})
    assert launch.KINDS["slurm"].layout(cpu_only) == (1, 2), "no GPUs: tasks_per_job processes"
    stage = launch.executor("local", tmp_path, two)
    cells = stage.for_cells()
    assert (stage.slots, stage.ranks) == (4, 1) and (cells.slots, cells.tasks) == (2, (1, 2))
    assert cells.submitters[0].parameters["tasks_per_node"] == 2
    one = launch.executor("local", tmp_path, LauncherSpec(jobs=3))
    assert one.for_cells() is one
    assert launch.executor("debug", tmp_path, two, 8).slots == 1
    p = launch.executor("slurm", tmp_path, two).for_cells().submitters[0].parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"]) == (2, 4, 4)


def test_job_id_here_per_kind(monkeypatch):
    for k in ("SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert launch.job_id_here() == f"proc:{os.getpid()}"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert launch.job_id_here() == f"local:{os.getpid()}"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert launch.job_id_here() == "slurm:77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launch.job_id_here() == "slurm:70_3", "stable across a requeue: the array's id, not the job's"


def test_local_cancel_kills_only_running_jobs_of_this_host():
    here = socket.gethostname()
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        refs = [launch.JobRef("a", "running", f"local:{procs[0].pid}", here),
                launch.JobRef("b", "running", f"local:{procs[1].pid}", "another-host"),
                launch.JobRef("c", "pending", f"local:{procs[2].pid}", here),
                launch.JobRef("d", "pending", None, None)]
        ids = [str(p.pid) for p in procs]
        assert launch.KINDS["local"].active(ids) == set(ids)
        assert launch.cancel(refs) == 1
        assert procs[0].wait(timeout=10) == -signal.SIGKILL
        assert procs[1].poll() is None and procs[2].poll() is None
        assert launch.KINDS["local"].active(ids) == set(ids[1:])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_slurm_cancel_scancels_each_job_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch_slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch_slurm.subprocess, "run", lambda cmd, **k: calls.append(cmd))
    refs = [launch.JobRef("a", "running", "slurm:12_0"), launch.JobRef("b", "pending", "slurm:12_1"),
            launch.JobRef("c", "running", "slurm:12_0"), launch.JobRef("d", "running", "proc:1")]
    assert launch.cancel(refs) == 2
    assert calls == [["scancel", "12_0", "12_1"]]

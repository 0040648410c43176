"""The preparation stage compiles the Mamba cells' numba kernels once (ablate.kernels): which
grids get the job, and, with real processes and a real numba cache, that a cell run after it
compiles nothing while the same cell without it compiles exactly the kernels the job did."""
from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.grid import load_grid
from ablate.prep_jobs import kernel_specs

from jobgrid import cli, write_grid

numba = pytest.importorskip("numba")

ZIP = """zip:
  - model.variant: [mamba-prefix, mamba-prefix, transformer]
    model.paradigm: [masked, ar, masked]
    model.params: [{}, {scan: forward}, {}]
"""


def _specs(tmp_path: Path, extra: str = ZIP, *sets: str) -> list:
    grid = write_grid(tmp_path / "g.yaml", "kern", extra=extra)
    return [c.spec for c in load_grid(grid, sets).cells]


def test_one_kernel_job_per_distinct_mamba_model_on_the_cpu(tmp_path):
    specs = _specs(tmp_path, ZIP, "train.device=cpu")
    warm = kernel_specs(specs)
    # the two Mamba configurations (masked bidirectional, ar forward); the Transformer has no kernels
    assert sorted((s.model.paradigm, s.model.params.get("scan")) for s in warm) == [("ar", "forward"),
                                                                                    ("masked", "bidirectional")]
    assert kernel_specs(specs + specs) == warm  # seeds and repeats of one configuration: one warm-up
    assert kernel_specs(_specs(tmp_path, "axes:\n  model.variant: [transformer]\n")) == []
    assert kernel_specs(_specs(tmp_path, ZIP, "train.device=cuda")) == []  # on a GPU: mamba-ssm, not numba


def _cache(root: Path) -> tuple[collections.Counter, dict[str, str]]:
    """Compiled signatures per kernel (numba numbers a kernel's .nbc files in compile order) and
    the content of every index file."""
    per_kernel = collections.Counter(p.name.rsplit(".", 2)[0] for p in root.rglob("*.nbc"))
    index = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.nbi")}
    return per_kernel, index


# `ablate run` in this process (debug executor) with the kernel job left out of the preparation
RUN_WITHOUT_KERNEL_JOB = """
import sys
import ablate.prep_jobs as pj
pj.kernel_specs = lambda specs: []
from ablate.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_cell_after_the_kernel_job_compiles_nothing(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", "kern", steps=2, extra=ZIP)
    results = tmp_path / "results"

    def env(cache: Path) -> dict[str, str]:
        return {**os.environ, "NUMBA_CACHE_DIR": str(cache)}

    def run_cells(cache: Path, db: str) -> None:
        proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_KERNEL_JOB, "run", str(grid), "--results",
                               str(results), "--db", f"sqlite:///{tmp_path / db}", "--executor", "debug",
                               "--no-table"], env=env(cache), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # without the job: the cells compile their kernels themselves (this is what the check sees)
    cold = tmp_path / "cold"
    run_cells(cold, "a.db")
    needed, _ = _cache(cold)
    assert needed and sum(needed.values()) >= 4, needed  # scan forward and backward, conv, decoding step

    # the preparation stage alone, with its kernel job, into another cache
    warm = tmp_path / "warm"
    proc = subprocess.run(cli("prepare", str(grid), "--results", str(results), "--executor", "debug"),
                          env=env(warm), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels: 2 model configuration(s)" in proc.stdout + proc.stderr
    compiled, index = _cache(warm)
    assert compiled == needed  # exactly the signatures the cells compile, kernel by kernel

    # the same cells after it (a fresh database, so they run again): nothing compiled, no index touched
    run_cells(warm, "b.db")
    assert _cache(warm) == (compiled, index)

"""Shared fixtures: a tiny registry of fake variants for config tests, tmp results folders."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ablate.registry import Registry

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one torch thread (timings and float reductions comparable across
    machines), and a test that changes the count cannot leak it into the next."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = 0.5
    mode: str = "a"


class FakeVariant(nn.Module):
    """Mixes the mean text state into every image token (enough to test the plumbing)."""

    name = "fake"
    description = "a fake variant for tests"
    family = "transformer"
    Config = _Cfg
    scan_orders = ()

    def __init__(self, ctx, cfg):
        super().__init__()
        self.lin = nn.Linear(ctx.width, ctx.width)

    def forward(self, x, text, text_mask):
        pooled = (text * text_mask.unsqueeze(-1)).sum(1) / text_mask.sum(1, keepdim=True).clamp_min(1)
        return self.lin(x + pooled.unsqueeze(1))


class OtherVariant(FakeVariant):
    name = "other"
    description = "another fake"


@pytest.fixture
def fake_registry() -> Registry:
    return Registry({"fake": FakeVariant, "other": OtherVariant}, {"fake": "tests", "other": "tests"}, {})


# ------------------------------------------------------------------------- real services
# The cluster tests talk to a real PostgreSQL and a real single-node Slurm, both started by
# .ci/services.sh (which .ci/run calls). Outside CI a missing service skips those tests with the
# command that starts it; in CI (CI set) a missing service is a failure, never a skip.

PG_ADMIN_URL = os.environ.get("ABLATE_TEST_PG_URL",
                              "postgresql+psycopg://ablate:ablate@127.0.0.1:5432/ablate_test")


def unavailable(msg: str) -> None:
    """Skip a test whose service or tool is missing, saying how to get it; in CI (CI set) fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{msg} -- CI must run this test", pytrace=False)
    pytest.skip(msg)


def _service_missing(what: str, why: str) -> None:
    unavailable(f"{what} not available ({why}); start it with `bash .ci/services.sh`")


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # driver missing, server down, auth
        _service_missing("PostgreSQL", str(exc).strip().splitlines()[0][:200])
    name = f"ablate_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def slurm():
    """A responding Slurm controller with an idle (or busy) node; returns the partition name."""
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        _service_missing("Slurm", "sbatch is not on PATH")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _service_missing("Slurm", f"sinfo: {exc}")
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not any(st.rstrip("*") in ("idle", "mixed", "allocated") for _, st in rows):
        _service_missing("Slurm", f"sinfo: {(out.stderr or out.stdout).strip()[:200] or 'no usable node'}")
    return rows[0][0].rstrip("*")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path):
    """The test once on a fresh SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's chromium and chromium-driver, through Selenium) for a module."""
    from ablate.report import browser as chromium

    why = chromium.missing()
    if why:
        unavailable(f"headless Chromium not available: {why}")
    with chromium.chromium() as driver:
        yield driver

"""Schema migrations: a fresh database is built by the shipped Alembic migrations, the models and
the migrations agree, an older database is upgraded in place (never dropped), and concurrent
openers of a fresh database migrate it once. On SQLite and on a real PostgreSQL."""
from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import create_engine, inspect, text

from ablate.cli import main
from ablate.db import Database, schema
from ablate.db.models import Base


def _diff(url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


def _revision(url):
    engine = create_engine(url)
    with engine.connect() as conn:
        rev = schema.current_revision(conn)
    engine.dispose()
    return rev


def test_fresh_database_is_at_head_and_matches_the_models(any_db_url):
    Database(any_db_url).close()
    assert _revision(any_db_url) == schema.HEAD
    assert _diff(any_db_url) == [], "the migrations and ablate/db/models.py disagree"
    from alembic.script import ScriptDirectory
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(schema.MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == schema.HEAD


# a spec as session 1 stored it: no data.heldout (the field came later and changes keys)
OLD_SPEC = '{"model": {"variant": "transformer", "width": 48}, "data": {"name": "shapes"}, "seed": 0}'


def _old_database(url, versioned: bool):
    """A database as session 1 made it: revision 0001 tables, one finished run with metrics."""
    from alembic import command

    engine = create_engine(url)
    with engine.connect() as conn:
        command.upgrade(schema._config(conn), "0001")
        conn.commit()
        if not versioned:  # made by create_all before migrations shipped: no version table
            conn.execute(text(f"DROP TABLE {schema.VERSION_TABLE}"))
        conn.execute(text(
            "INSERT INTO runs (id, key, grid, variant, seed, spec, overrides, status, created_at, attempts) "
            "VALUES (1, 'k1', 'g', 'transformer', 0, :spec, '{}', 'done', CURRENT_TIMESTAMP, 1)"),
            {"spec": OLD_SPEC})
        conn.execute(text("INSERT INTO metrics (run_id, name, step, value) VALUES (1, 'fid_domain', NULL, 12.5)"))
        conn.execute(text("INSERT INTO grid_runs (grid, run_id, overrides) VALUES ('g', 1, '{}')"))
        conn.commit()
    engine.dispose()


@pytest.mark.parametrize("versioned", [True, False], ids=["at-0001", "pre-migrations"])
def test_old_database_is_upgraded_in_place(any_db_url, versioned):
    _old_database(any_db_url, versioned)
    assert _revision(any_db_url) == "0001"
    db = Database(any_db_url)
    try:
        assert db.final_metrics("k1") == {"fid_domain": 12.5} and db.grids() == ["g"]
        run = db.run("k1")
        assert run.status == "done" and run.fingerprint is None, "the code of an old run is unknown"
        # 0004 backfills the configuration key from the stored spec, as stored (not filled in)
        import json
        from ablate.config import RunSpec, config_key, stored_config_key
        assert run.config_key == stored_config_key(json.loads(OLD_SPEC)) != config_key(RunSpec())
        db.record_bench("ops", [{"x": 1}])  # the table 0002 added
        assert inspect(db.engine).has_table(schema.VERSION_TABLE)
    finally:
        db.close()
    assert _revision(any_db_url) == schema.HEAD and _diff(any_db_url) == []


def test_cli_db_upgrade_and_current(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_database(url, versioned=False)
    assert main(["db", "current", "--db", url]) == 0
    assert "schema 0001" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"schema 0001 -> {schema.HEAD}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert "already at" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "no database at" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["table"], ["status"], ["plot", "--out", "PLOT"]])
def test_reading_an_old_database_names_the_upgrade_and_changes_nothing(any_db_url, tmp_path, capsys, command):
    """The read-only commands never migrate: on an older schema they say which and how to upgrade
    (one line, exit 2), and the database stays as it was; after `ablate db upgrade` they read it."""
    _old_database(any_db_url, versioned=True)
    command = [str(tmp_path / "p.png") if a == "PLOT" else a for a in command]
    assert main([*command, "--db", any_db_url]) == 2
    err = capsys.readouterr().err.strip()
    assert "has schema 0001, older than" in err and "ablate db upgrade --db" in err and len(err.splitlines()) == 1
    assert _revision(any_db_url) == "0001"
    assert main(["db", "upgrade", "--db", any_db_url]) == 0
    capsys.readouterr()
    if command[0] == "table":
        assert main(["table", "--db", any_db_url, "--out", str(tmp_path / "R.md")]) == 0
        assert "12.5" in capsys.readouterr().out


def _open(url):
    Database(url).close()
    return True


def test_concurrent_openers_migrate_a_fresh_database_once(any_db_url):
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:
        assert all(pool.map(_open, [any_db_url] * 8))
    assert _revision(any_db_url) == schema.HEAD and _diff(any_db_url) == []

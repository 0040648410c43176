"""Trustworthy rows: each run's configuration key (its spec's hash without the seed), the code
fingerprint of the job that produced it, and the claim token of the attempt that owns it.

Existing runs get their configuration key computed from their stored spec; their fingerprint
stays NULL (the code that made them is unknown) and so does their attempt.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("config_key", sa.String(64)))
        batch.add_column(sa.Column("fingerprint", sa.String(64)))
        batch.add_column(sa.Column("attempt", sa.String(32)))
        batch.create_index("ix_runs_config_key", ["config_key"])
    from ablate.config import stored_config_key

    conn = op.get_bind()
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("spec", sa.JSON),
                    sa.column("config_key", sa.String))
    for rid, spec in conn.execute(sa.select(runs.c.id, runs.c.spec)).all():
        conn.execute(sa.update(runs).where(runs.c.id == rid).values(config_key=stored_config_key(spec)))


def downgrade() -> None:
    raise NotImplementedError("ablate never drops results: there is no downgrade")

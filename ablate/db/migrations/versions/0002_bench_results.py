"""Benchmark tables (`ablate bench ...`) stored next to the runs.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bench_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("suite", sa.String(50), nullable=False, index=True),
        sa.Column("session", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("host", sa.String(200)),
        sa.Column("device", sa.String(200)),
        sa.Column("code_rev", sa.String(64)),
        sa.Column("row", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("ablate never drops results: there is no downgrade")

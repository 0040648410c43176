"""Optuna studies (`ablate study`): which run each trial trained or reused.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study", sa.String(200), nullable=False, index=True),
        sa.Column("trial", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("study", "trial", name="uq_study_trial"),
    )


def downgrade() -> None:
    raise NotImplementedError("ablate never drops results: there is no downgrade")

"""The first schema: runs, grid_runs, metrics, artifacts.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True),
        sa.Column("grid", sa.String(200), nullable=False, index=True),
        sa.Column("variant", sa.String(100), nullable=False, index=True),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("overrides", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("host", sa.String(200)),
        sa.Column("job_id", sa.String(100)),
        sa.Column("code_rev", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "grid_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("grid", sa.String(200), nullable=False, index=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("overrides", sa.JSON, nullable=False),
        sa.UniqueConstraint("grid", "run_id", name="uq_grid_run"),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("value", sa.Float, nullable=False),
        sa.UniqueConstraint("run_id", "name", "step", name="uq_metric_step"),
    )
    op.create_index("uq_metric_final", "metrics", ["run_id", "name"], unique=True,
                    sqlite_where=sa.text("step IS NULL"), postgresql_where=sa.text("step IS NULL"))
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.UniqueConstraint("run_id", "kind", "path", name="uq_artifact"),
    )


def downgrade() -> None:
    raise NotImplementedError("ablate never drops results: there is no downgrade")

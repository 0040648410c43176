"""Alembic environment: always runs on the connection ablate.db.schema hands over.

The version table is ``ablate_schema_version``, not Alembic's default ``alembic_version``: Optuna
keeps its own Alembic-managed tables (and its own ``alembic_version``) in the same database.
"""
from alembic import context

from ablate.db.models import Base

VERSION_TABLE = "ablate_schema_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

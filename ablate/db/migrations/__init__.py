"""Alembic migrations of the results schema, shipped in the package (see ablate.db.schema)."""

"""Alembic migrations of the ledger (`ipbatch db upgrade`)."""

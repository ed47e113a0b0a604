"""The ledger (SQLAlchemy), the object stores (S3, local folder) and the embedding cache."""

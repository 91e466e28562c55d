"""Durable storage: validated UIDs, the atomic file store and the SQLAlchemy index."""

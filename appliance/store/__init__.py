"""Durable storage: the SQLite index, instance files and quarantine."""

"""The durable job queue (rows in SQLite) and the worker that runs analyses."""

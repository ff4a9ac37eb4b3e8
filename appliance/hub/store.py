"""The hub database: SQLite by default, PostgreSQL by URL; one small adapter, one portable schema.

Concurrent imports: on PostgreSQL each import holds a transaction-scoped advisory lock on its own site and
month only (:meth:`HubDB.lock`), so imports of different sites run side by side and two imports of the same
month queue; on SQLite a write transaction is exclusive and a writer waits (busy timeout) for the one before it.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

SCHEMA = [
    ("CREATE TABLE IF NOT EXISTS sites (site_id TEXT PRIMARY KEY, name TEXT, public_key TEXT UNIQUE NOT NULL, "
     "added_at TEXT NOT NULL)"),
    ("CREATE TABLE IF NOT EXISTS bundles (sha256 TEXT PRIMARY KEY, site_id TEXT NOT NULL, month TEXT NOT NULL, "
     "revision INTEGER NOT NULL, created_at TEXT NOT NULL, imported_at TEXT NOT NULL, superseded INTEGER NOT NULL)"),
    ("CREATE TABLE IF NOT EXISTS results (site_id TEXT NOT NULL, month TEXT NOT NULL, revision INTEGER NOT NULL, "
     "study TEXT NOT NULL, patient TEXT NOT NULL, study_date TEXT, series TEXT NOT NULL, model TEXT NOT NULL, "
     "model_version TEXT, validated INTEGER, backend TEXT, model_precision TEXT, score DOUBLE PRECISION, "
     "threshold DOUBLE PRECISION, flagged INTEGER NOT NULL, review TEXT, turnaround_seconds DOUBLE PRECISION)"),
    "CREATE INDEX IF NOT EXISTS results_site_month ON results (site_id, month)",
    "CREATE UNIQUE INDEX IF NOT EXISTS bundles_site_month_revision ON bundles (site_id, month, revision)",
    ("CREATE TABLE IF NOT EXISTS stats (site_id TEXT NOT NULL, month TEXT NOT NULL, revision INTEGER NOT NULL, "
     "name TEXT NOT NULL, value DOUBLE PRECISION)"),
    "CREATE INDEX IF NOT EXISTS stats_site_month ON stats (site_id, month)",
    ("CREATE TABLE IF NOT EXISTS models (site_id TEXT NOT NULL, month TEXT NOT NULL, revision INTEGER NOT NULL, "
     "model TEXT NOT NULL, version TEXT, validated INTEGER, backend TEXT, model_precision TEXT, model_sha256 TEXT)"),
    "CREATE INDEX IF NOT EXISTS models_site_month ON models (site_id, month)",
    # a recall's state as each month's bundle saw it (recalls.csv); the report keeps the latest row of each
    ("CREATE TABLE IF NOT EXISTS recalls (site_id TEXT NOT NULL, month TEXT NOT NULL, revision INTEGER NOT NULL, "
     "study TEXT NOT NULL, patient TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT, "
     "screened_month TEXT NOT NULL, state TEXT NOT NULL, outcome_code TEXT, outcome_system TEXT, "
     "diagnosis INTEGER NOT NULL, malignant INTEGER NOT NULL, days_to_outcome DOUBLE PRECISION)"),
    "CREATE INDEX IF NOT EXISTS recalls_site_month ON recalls (site_id, month)",
]
SQLITE_BUSY_SECONDS = 300.0  # a writer waits this long for the one before it (a large month takes seconds)


class HubDB:
    """A DB-API connection with ``?`` placeholders whatever the server, and explicit transactions."""

    conn: psycopg.Connection[tuple[Any, ...]] | sqlite3.Connection

    def __init__(self, url: str):
        self.url = url
        if url.startswith(("postgresql://", "postgres://")):
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)  # transactions only where transaction() says
            self.postgres = True
        else:
            path = url.removeprefix("sqlite:///")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_SECONDS)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.postgres = False
        if not self._schema_present():
            with self.transaction():
                self.lock("schema")  # two processes creating the schema at once on PostgreSQL would collide
                for statement in SCHEMA:
                    self.execute(statement)

    def _schema_present(self) -> bool:
        """Every table and index exists (PostgreSQL: then no DDL runs, which would wait for running imports)."""
        if not self.postgres:
            return False
        names = [re.search(r"IF NOT EXISTS (\w+)", statement)[1] for statement in SCHEMA]  # type: ignore[index]
        return all(self.rows("SELECT to_regclass(?) IS NOT NULL AS present", [name])[0]["present"] for name in names)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self.postgres:
            sql = sql.replace("?", "%s")
        cursor = self.conn.cursor()
        cursor.execute(sql, tuple(params))
        return cursor

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows (pipelined on PostgreSQL: one round trip, not one per row)."""
        if self.postgres:
            sql = sql.replace("?", "%s")
        self.conn.cursor().executemany(sql, [tuple(p) for p in params])

    def lock(self, key: str) -> None:
        """Inside a transaction: wait for, then hold until it ends, the lock named ``key``.

        PostgreSQL: a transaction-scoped advisory lock, so only transactions naming the same key wait for
        each other. SQLite: nothing to do, its write transaction already excludes every other writer."""
        if self.postgres:
            self.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", [key])

    def size_bytes(self) -> int:
        """The database's size on disk (pg_database_size, or the SQLite file with its write-ahead log)."""
        if self.postgres:
            return int(self.rows("SELECT pg_database_size(current_database()) AS n")[0]["n"])
        path = Path(self.url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One writer at a time; everything inside commits together or not at all."""
        if not isinstance(self.conn, sqlite3.Connection):
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def default_url(hub_dir: Path) -> str:
    return f"sqlite:///{hub_dir / 'hub.sqlite'}"

"""The database connection of one request, as in Flask's tutorial: opened on first use, closed at teardown."""

from __future__ import annotations

import sqlite_utils
from flask import Flask, g

from appliance.store.database import DATABASE_NAME, connect
from appliance.web.context import settings_of


def get_db() -> sqlite_utils.Database:
    """This request's database connection (durable: reviews and audit entries survive a power cut)."""
    if "db" not in g:
        g.db = connect(settings_of().home_path / DATABASE_NAME)
    return g.db


def close_db(e: BaseException | None = None) -> None:
    """Close this request's connection, if one was opened (registered as a teardown)."""
    db = g.pop("db", None)
    if db is not None:
        db.conn.close()


def init_app(app: Flask) -> None:
    """Close the request's connection when its app context ends."""
    app.teardown_appcontext(close_db)

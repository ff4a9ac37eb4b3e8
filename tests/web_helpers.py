"""Helpers for the web tests: a fresh app over a throw-away data directory, accounts, CSRF tokens."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from appliance import config
from appliance.store import users
from appliance.store.database import open_database

PASSWORDS = {"admin": "brass lantern orbit 94", "tech": "quiet harbour kettle 27", "rad": "violet summit ferry 58"}
ROLES = {"admin": "admin", "tech": "technician", "rad": "radiologist"}
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def make_accounts(home: Path) -> None:
    db = open_database(home)
    for name, role in ROLES.items():
        users.add_user(db, name, PASSWORDS[name], role, actor="test")
    db.conn.close()


def web_settings(tmp_path: Path, **overrides) -> config.Settings:
    """Settings of a fresh data directory in demonstration mode (every pack runs, with its banner)."""
    return config.load(environ={}, home=str(tmp_path / "home"), **{"demonstration": True, **overrides})


def csrf(client, path: str = "/login") -> str:
    match = TOKEN.search(client.get(path).get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def login(client, name: str):
    token = csrf(client)
    return client.post("/login", data={"username": name, "password": PASSWORDS[name], "csrf_token": token})


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_listening(proc: subprocess.Popen, port: int, log: Path, what: str) -> None:
    """Wait (30 s at most) for ``proc`` to accept connections on ``port``; fail with the end of its log."""
    import pytest

    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{what} did not open its port: " + log.read_text()[-2000:])


def rows(home: Path, sql: str, args=()) -> list[dict]:
    """The rows ``sql`` selects from the database of the data directory ``home``."""
    db = open_database(home)
    try:
        return list(db.query(sql, args))
    finally:
        db.conn.close()

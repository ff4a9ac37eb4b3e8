"""Helpers for the web tests: a fresh app over a throw-away data directory, accounts, CSRF tokens."""

from __future__ import annotations

import re
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

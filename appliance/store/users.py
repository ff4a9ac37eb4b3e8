"""Accounts of the web UI: roles, password hashes and the wrong-password ledger.

Passwords are hashed with Werkzeug's scrypt; no account exists until the site
admin makes the first one, so a fresh install never runs with a default password.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import sqlite_utils
from werkzeug.security import check_password_hash, generate_password_hash

from appliance.errors import ApplianceError
from appliance.store.database import audit, utcnow, write_transaction

ROLES = ("technician", "radiologist", "admin")
MIN_PASSWORD_LENGTH = 10
USERNAME = re.compile(r"^[A-Za-z0-9._-]{2,64}$")
# verifying against this keeps a wrong user name as slow as a wrong password
_DUMMY_HASH = generate_password_hash("not a password of anyone")


class AccountError(ApplianceError):
    """An account could not be made or changed (bad name, role or password)."""


def check_password_rules(password: str) -> None:
    """Raise :class:`AccountError` when ``password`` is too weak to protect patient data."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password.strip() != password or len(set(password)) < 4:
        raise AccountError("the password must not start or end with spaces, nor repeat a few characters")


def add_user(db: sqlite_utils.Database, username: str, password: str, role: str, actor: str) -> None:
    """Create an account; raises :class:`AccountError` when the name is taken or malformed."""
    if not USERNAME.match(username):
        raise AccountError("user names are 2-64 letters, digits, dots, dashes or underscores")
    if role not in ROLES:
        raise AccountError(f"the role must be one of {', '.join(ROLES)}")
    check_password_rules(password)
    with write_transaction(db):
        if db.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
            raise AccountError(f"the user {username} already exists")
        now = utcnow()
        db.table("users").insert({"username": username, "password_hash": generate_password_hash(password), "role": role,
                            "disabled": 0, "language": None, "created_at": now, "password_changed_at": now})
        audit(db, actor, "user_added", username, role=role)


def set_password(db: sqlite_utils.Database, username: str, password: str, actor: str) -> None:
    check_password_rules(password)
    with write_transaction(db):
        db.execute("UPDATE users SET password_hash = ?, password_changed_at = ? WHERE username = ?",
                   [generate_password_hash(password), utcnow(), username])
        audit(db, actor, "password_changed", username)


def set_user(db: sqlite_utils.Database, username: str, actor: str, *, role: str | None = None,
             disabled: bool | None = None) -> None:
    """Change an account's role or disable it; the last enabled admin cannot be demoted or disabled."""
    if role is not None and role not in ROLES:
        raise AccountError(f"the role must be one of {', '.join(ROLES)}")
    with write_transaction(db):
        user = get_user(db, username)
        if user is None:
            raise AccountError(f"no user {username}")
        losing_admin = user["role"] == "admin" and ((role and role != "admin") or disabled)
        if losing_admin and admin_count(db) <= 1:
            raise AccountError("the last admin account cannot be demoted or disabled")
        changes: dict[str, Any] = {}
        if role is not None:
            changes["role"] = role
        if disabled is not None:
            changes["disabled"] = int(disabled)
        db.table("users").update(username, changes)
        audit(db, actor, "user_changed", username, **changes)


def get_user(db: sqlite_utils.Database, username: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM users WHERE username = ?", [username]))
    return rows[0] if rows else None


def admin_count(db: sqlite_utils.Database) -> int:
    return int(db.execute("SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0").fetchone()[0])


def has_users(db: sqlite_utils.Database) -> bool:
    return db.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None


def verify(db: sqlite_utils.Database, username: str, password: str) -> dict[str, Any] | None:
    """The enabled account whose password this is, else None (in about the same time either way)."""
    user = get_user(db, username)
    if user is None or user["disabled"]:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user["password_hash"], password) else None


def recent_failures(db: sqlite_utils.Database, username: str, address: str, seconds: float = 60.0) -> int:
    """Wrong passwords in the last ``seconds`` for this account or from this address, whichever is more."""
    since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)).isoformat()
    by_user, by_address = db.execute(
        "SELECT sum(username = ?), sum(address = ?) FROM login_failures WHERE at >= ?",
        [username, address, since]).fetchone()
    return max(by_user or 0, by_address or 0)


def record_failure(db: sqlite_utils.Database, username: str, address: str) -> None:
    """Note a wrong password (kept one hour) and audit it."""
    old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)).isoformat()
    with write_transaction(db):
        db.execute("DELETE FROM login_failures WHERE at < ?", [old])
        db.table("login_failures").insert({"username": username, "address": address, "at": utcnow()})
        audit(db, username or "-", "login_failed", address)

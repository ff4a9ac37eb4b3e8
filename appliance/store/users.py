"""Accounts of the web UI: roles, password hashes, session generations and the wrong-password ledger.

Passwords are hashed with Werkzeug's scrypt; no account exists until the site
admin makes the first one, so a fresh install never runs with a default password.
A password must not be one of the common passwords zxcvbn ships (30,000, from
leaked password lists) and must score at least :data:`MIN_PASSWORD_SCORE` on
zxcvbn's estimate, made offline.

Each account has a session generation: a web session carries the generation it
was opened under and ends once the account's generation moves on (logout,
a password change or reset, disabling the account).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import re
from typing import Any

import sqlite_utils
from werkzeug.security import check_password_hash, generate_password_hash

from appliance.errors import ApplianceError
from appliance.store.database import audit, utcnow, write_transaction

ROLES = ("technician", "radiologist", "admin")
MIN_PASSWORD_LENGTH = 10
# zxcvbn's 0-4 scale; 3: "safely unguessable", about 10^8 guesses or more
MIN_PASSWORD_SCORE = 3
# zxcvbn's own limit on what it scores; a longer password is scored on its beginning
ZXCVBN_MAX_LENGTH = 72
# words of this product a password should not lean on, as zxcvbn's user inputs
PRODUCT_WORDS = ("appliance", "screening", "scanner", "clinic", "radiology", *ROLES)
USERNAME = re.compile(r"^[A-Za-z0-9._-]{2,64}$")
# verifying against this keeps a wrong user name as slow as a wrong password
_DUMMY_HASH = generate_password_hash("not a password of anyone")


class AccountError(ApplianceError):
    """An account could not be made or changed (bad name, role or password)."""


@functools.cache
def _common_passwords() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def check_password_rules(password: str, username: str = "") -> None:
    """Raise :class:`AccountError` when ``password`` is too weak to protect patient data.

    Refused: a common password (zxcvbn's list, any case), fewer than :data:`MIN_PASSWORD_LENGTH`
    characters, spaces around it, a few characters repeated, or a zxcvbn score below
    :data:`MIN_PASSWORD_SCORE` (with the user name and this product's words as known inputs).
    """
    from zxcvbn import zxcvbn

    if password.lower() in _common_passwords():
        raise AccountError("this is one of the most common passwords: choose another")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password.strip() != password or len(set(password)) < 4:
        raise AccountError("the password must not start or end with spaces, nor repeat a few characters")
    inputs = [username, *PRODUCT_WORDS] if username else list(PRODUCT_WORDS)
    estimate = zxcvbn(password[:ZXCVBN_MAX_LENGTH], user_inputs=inputs)
    if estimate["score"] < MIN_PASSWORD_SCORE:
        warning = estimate["feedback"].get("warning")
        why = f" ({warning.rstrip('.')})" if warning else ""
        raise AccountError(f"the password is too easy to guess{why}; a few unrelated words make a strong one")


def add_user(db: sqlite_utils.Database, username: str, password: str, role: str, actor: str) -> None:
    """Create an account; raises :class:`AccountError` when the name is taken or malformed."""
    if not USERNAME.match(username):
        raise AccountError("user names are 2-64 letters, digits, dots, dashes or underscores")
    if role not in ROLES:
        raise AccountError(f"the role must be one of {', '.join(ROLES)}")
    check_password_rules(password, username)
    with write_transaction(db):
        if db.execute("SELECT 1 FROM users WHERE username = ?", [username]).fetchone():
            raise AccountError(f"the user {username} already exists")
        now = utcnow()
        db.table("users").insert({"username": username, "password_hash": generate_password_hash(password), "role": role,
                            "disabled": 0, "language": None, "created_at": now, "password_changed_at": now})
        audit(db, actor, "user_added", username, role=role)


def set_password(db: sqlite_utils.Database, username: str, password: str, actor: str) -> int:
    """Change the account's password and end every session of it; returns the new session generation."""
    check_password_rules(password, username)
    with write_transaction(db):
        changed = db.execute("UPDATE users SET password_hash = ?, password_changed_at = ?, "
                             "session_generation = session_generation + 1 WHERE username = ?",
                             [generate_password_hash(password), utcnow(), username]).rowcount
        if not changed:
            raise AccountError(f"no user {username}")
        audit(db, actor, "password_changed", username)
        return session_generation(db, username)


def end_sessions(db: sqlite_utils.Database, username: str) -> None:
    """End every web session of the account (they carry an older generation from now on)."""
    with write_transaction(db):
        db.execute("UPDATE users SET session_generation = session_generation + 1 WHERE username = ?", [username])


def session_generation(db: sqlite_utils.Database, username: str) -> int:
    """The generation a session of this account must carry to be valid (0 for an unknown account)."""
    row = db.execute("SELECT session_generation FROM users WHERE username = ?", [username]).fetchone()
    return int(row[0]) if row else 0


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
        if disabled:
            db.execute("UPDATE users SET session_generation = session_generation + 1 WHERE username = ?", [username])
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


@dataclasses.dataclass(frozen=True)
class LoginLimits:
    """Wrong passwords allowed within ``window_seconds`` before an attempt gets 429.

    ``per_browser``: one account from one browser, that is from one of its known devices, or,
    for a browser that is not, from one address. ``per_account``: one account from every
    browser that is not a known device of it. ``per_address``: one address over every account,
    counting only browsers that are not a known device of the account tried. A known device
    is held back by its own failures only, so nobody elsewhere can lock an account's owner out.
    """

    per_browser: int = 5
    per_account: int = 20
    per_address: int = 30
    window_seconds: float = 60.0


def _since(seconds: float) -> str:
    return (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)).isoformat(
        timespec="milliseconds")


def _wait(times: list[str], limit: int, window_seconds: float) -> int:
    """Seconds until fewer than ``limit`` of these failure times (oldest first) lie in the window."""
    if len(times) < max(limit, 1):
        return 0
    frees_at = datetime.datetime.fromisoformat(times[len(times) - max(limit, 1)])
    left = (frees_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + window_seconds
    return max(1, math.ceil(left))


# failure times (oldest first) since a moment, for one browser of an account, the account, an address
_FROM_DEVICE = "SELECT at FROM login_failures WHERE username = ? AND known_device = ? AND at >= ? ORDER BY at"
_FROM_ADDRESS_TO_ACCOUNT = ("SELECT at FROM login_failures WHERE username = ? AND address = ? "
                            "AND known_device IS NULL AND at >= ? ORDER BY at")
_TO_ACCOUNT = "SELECT at FROM login_failures WHERE username = ? AND known_device IS NULL AND at >= ? ORDER BY at"
_FROM_ADDRESS = "SELECT at FROM login_failures WHERE address = ? AND known_device IS NULL AND at >= ? ORDER BY at"


def login_wait(db: sqlite_utils.Database, username: str, address: str, known_device: str | None,
               limits: LoginLimits) -> int:
    """Seconds before this sign-in attempt may be tried (0: now).

    ``known_device`` is the id of the browser's device cookie when that browser signed in to
    ``username`` before, else None.
    """
    since = _since(limits.window_seconds)

    def wait(sql: str, args: list[str], limit: int) -> int:
        return _wait([r[0] for r in db.execute(sql, [*args, since])], limit, limits.window_seconds)

    if known_device is not None:
        return wait(_FROM_DEVICE, [username, known_device], limits.per_browser)
    return max(wait(_FROM_ADDRESS_TO_ACCOUNT, [username, address], limits.per_browser),
               wait(_TO_ACCOUNT, [username], limits.per_account),
               wait(_FROM_ADDRESS, [address], limits.per_address))


def record_failure(db: sqlite_utils.Database, username: str, address: str, known_device: str | None = None) -> None:
    """Note a wrong password (kept one hour) and audit it; ``known_device`` as for :func:`login_wait`."""
    with write_transaction(db):
        db.execute("DELETE FROM login_failures WHERE at < ?", [_since(3600)])
        db.table("login_failures").insert({"username": username, "address": address, "at": utcnow(),
                                           "known_device": known_device})
        audit(db, username or "-", "login_failed", address, known_device=known_device is not None)

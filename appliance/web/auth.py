"""Log in and out, first-run admin set-up, roles, idle timeout, sessions that end, the login rate limit.

Sessions live in a signed cookie, checked on every request against the account's session
generation in the database: logout, a password change or reset and disabling the account move
the generation on, so every session of that account ends, a copied cookie included.

Wrong passwords are throttled per browser: a browser that signed in to an account before carries
a signed device cookie naming it, and only its own failures hold it back, so nobody can keep an
account's owner out by guessing from elsewhere. Other browsers are throttled per account and
address, per account and per address (:class:`appliance.store.users.LoginLimits`), with 429 and
``Retry-After``.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from itsdangerous import BadData, URLSafeTimedSerializer
from werkzeug.exceptions import TooManyRequests

from appliance.store import users
from appliance.store.database import audit, write_transaction
from appliance.web.context import settings_of
from appliance.web.db import get_db
from appliance.web.i18n import LANGUAGES
from appliance.web.params import same_site_path

bp = Blueprint("auth", __name__)
PUBLIC_ENDPOINTS = {"auth.login", "auth.setup", "auth.language", "static"}
DEVICE_COOKIE = "appliance_device"
DEVICE_SALT = "appliance-known-device"
# accounts one browser is remembered for (a shared workstation at the scanner)
MAX_DEVICE_ACCOUNTS = 20


def load_user() -> Any:
    """Before each request: the signed-in user in ``g.user``; idle and ended sessions end; others go to log in."""
    g.user = None
    username = session.get("user")
    if username:
        user = users.get_user(get_db(), username)
        idle_limit = settings_of().web_idle_timeout_minutes * 60
        if user is None or user["disabled"] or session.get("generation") != user["session_generation"]:
            session.clear()
            flash(_("Your session has ended (signed out, or the password or account changed): sign in again."))
        elif time.time() - session.get("seen", 0) > idle_limit:
            session.clear()
            flash(_("You were signed out after a period of inactivity."))
        else:
            g.user = user
            if not request.path.startswith("/api/"):  # the worklist's own polling is not activity
                session["seen"] = time.time()
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.path.startswith("/api/"):
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path if request.method == "GET" else None))
    return None


def role_required(*roles: str) -> Callable:
    """The view answers 403 to a signed-in user whose role is not in ``roles``."""
    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if g.user is None or g.user["role"] not in roles:
                abort(403)
            return view(*args, **kwargs)
        return wrapped
    return decorate


def keep_session(generation: int) -> None:
    """Keep this browser's session across a change that ended every session of its account."""
    session["generation"] = generation


def _client_address() -> str:
    return request.remote_addr or "-"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _safe_next(target: str | None) -> str:
    return same_site_path(target, url_for("worklist.index"))


def _limits() -> users.LoginLimits:
    settings = settings_of()
    return users.LoginLimits(per_browser=settings.web_login_attempts_per_minute,
                             per_account=settings.web_login_attempts_per_account_per_minute,
                             per_address=settings.web_login_attempts_per_address_per_minute)


def _device_signer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=DEVICE_SALT)


def _device() -> dict[str, Any]:
    """This browser's device cookie (``id``, ``accounts``), or {} when it has none that is valid and unexpired."""
    raw = request.cookies.get(DEVICE_COOKIE)
    if not raw:
        return {}
    try:
        doc = _device_signer().loads(raw, max_age=settings_of().web_known_device_days * 86400)
    except BadData:
        return {}
    valid = isinstance(doc, dict) and isinstance(doc.get("id"), str) and isinstance(doc.get("accounts"), list)
    return doc if valid else {}


def _known_device(username: str) -> str | None:
    """The device id of this browser when it signed in to ``username`` before, else None."""
    doc = _device()
    return doc["id"] if username in doc.get("accounts", []) else None


def _remember_device(response: Any, username: str) -> Any:
    """Name ``username`` in this browser's device cookie (made now if it has none); renewed at each login."""
    doc = _device() or {"id": secrets.token_urlsafe(18), "accounts": []}
    accounts = [a for a in doc["accounts"] if isinstance(a, str) and a != username][-(MAX_DEVICE_ACCOUNTS - 1):]
    days = settings_of().web_known_device_days
    response.set_cookie(DEVICE_COOKIE, _device_signer().dumps({"id": doc["id"], "accounts": [*accounts, username]}),
                        max_age=days * 86400, httponly=True, samesite="Lax",
                        secure=bool(settings_of().web_secure_cookies))
    return response


def _throttle(username: str, known_device: str | None) -> None:
    """429 with Retry-After when this browser has had too many wrong passwords for ``username`` lately."""
    wait = users.login_wait(get_db(), username, _client_address(), known_device, _limits())
    if wait:
        raise TooManyRequests(retry_after=wait)


@bp.route("/login", methods=["GET", "POST"])
def login():
    db = get_db()
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        known_device = _known_device(username)
        _throttle(username, known_device)
        user = users.verify(db, username, request.form.get("password", ""))
        if user is None:
            users.record_failure(db, username, _client_address(), known_device)
            flash(_("Wrong user name or password."))
            return render_template("login.html", first_run=False), 401
        session.clear()  # nothing of an earlier session carries over (no fixation)
        session.update(user=user["username"], seen=time.time(), generation=user["session_generation"])
        with write_transaction(db):
            audit(db, user["username"], "login", _client_address(), known_device=known_device is not None)
        return _remember_device(redirect(_safe_next(request.args.get("next"))), user["username"])
    return render_template("login.html", first_run=not users.has_users(db))


@bp.route("/logout", methods=["POST"])
def logout():
    """Sign out: every session of the account ends, on every browser."""
    db = get_db()
    users.end_sessions(db, g.user["username"])
    with write_transaction(db):
        audit(db, g.user["username"], "logout", _client_address())
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
def change_password():
    """Change one's own password (the current one first); the account's other sessions end."""
    if request.method == "POST":
        db, username, form = get_db(), g.user["username"], request.form
        known_device = _known_device(username)
        _throttle(username, known_device)
        if users.verify(db, username, form.get("current", "")) is None:
            users.record_failure(db, username, _client_address(), known_device)
            flash(_("The current password is wrong."))
        elif form.get("password", "") != form.get("confirm", ""):
            flash(_("The two passwords differ."))
        else:
            try:
                generation = users.set_password(db, username, form.get("password", ""), actor=username)
            except users.AccountError as exc:
                flash(str(exc))
            else:
                keep_session(generation)
                flash(_("Password changed; every other session of your account has ended."))
                return redirect(url_for("worklist.index"))
    return render_template("password.html", min_length=users.MIN_PASSWORD_LENGTH)


@bp.route("/setup", methods=["GET", "POST"])
def setup():
    """The first admin account, made from this box only, once."""
    db = get_db()
    if users.has_users(db):
        return redirect(url_for("auth.login"))
    if not _is_loopback(_client_address()):
        abort(403)
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        if password != request.form.get("confirm", ""):
            flash(_("The two passwords differ."))
        else:
            try:
                users.add_user(db, username, password, "admin", actor="first-run set-up")
            except users.AccountError as exc:
                flash(str(exc))
            else:
                flash(_("Admin account created: sign in."))
                return redirect(url_for("auth.login"))
    return render_template("setup.html", min_length=users.MIN_PASSWORD_LENGTH)


@bp.route("/language", methods=["POST"])
def language():
    lang = request.form.get("lang")
    if lang in LANGUAGES:
        session["lang"] = lang
    return redirect(_safe_next(request.form.get("next")))

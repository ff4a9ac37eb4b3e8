"""Log in and out, first-run admin set-up, roles, idle timeout and the login rate limit."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _

from appliance.store import users
from appliance.store.database import audit, write_transaction
from appliance.web.context import settings_of
from appliance.web.db import get_db
from appliance.web.i18n import LANGUAGES

bp = Blueprint("auth", __name__)
PUBLIC_ENDPOINTS = {"auth.login", "auth.setup", "auth.language", "static"}


def load_user() -> Any:
    """Before each request: the signed-in user in ``g.user``; idle sessions end; others go to the login page."""
    g.user = None
    username = session.get("user")
    if username:
        idle_limit = settings_of().web_idle_timeout_minutes * 60
        if time.time() - session.get("seen", 0) > idle_limit:
            session.clear()
            flash(_("You were signed out after a period of inactivity."))
        else:
            user = users.get_user(get_db(), username)
            if user and not user["disabled"]:
                g.user = user
                if not request.path.startswith("/api/"):  # the worklist's own polling is not activity
                    session["seen"] = time.time()
            else:
                session.clear()
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


def _client_address() -> str:
    return request.remote_addr or "-"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _safe_next(target: str | None) -> str:
    # only paths on this box: never an absolute or scheme-relative address
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("worklist.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    db = get_db()
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        address = _client_address()
        limit = settings_of().web_login_attempts_per_minute
        if users.recent_failures(db, username, address) >= limit:
            abort(429)
        user = users.verify(db, username, request.form.get("password", ""))
        if user is None:
            users.record_failure(db, username, address)
            flash(_("Wrong user name or password."))
            return render_template("login.html", first_run=False), 401
        session.clear()  # a new session id on login (no fixation)
        session.update(user=user["username"], seen=time.time())
        with write_transaction(db):
            audit(db, user["username"], "login", address)
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", first_run=not users.has_users(db))


@bp.route("/logout", methods=["POST"])
def logout():
    db = get_db()
    with write_transaction(db):
        audit(db, g.user["username"], "logout", _client_address())
    session.clear()
    return redirect(url_for("auth.login"))


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

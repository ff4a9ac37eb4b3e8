"""The web UI: worklist, study page and viewer, report, import and admin pages (Flask app factory).

The web process reads the database, stores uploads and reviews and queues work; it never runs a model.
Every asset is served from the box; every state-changing request carries a CSRF token.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from pathlib import Path
from typing import Any

from flask import Flask, g, jsonify, make_response, redirect, render_template, request, url_for
from flask_babel import Babel, get_locale
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from appliance.config import Settings
from appliance.outputs import findings_text, opacity_figures
from appliance.outputs.report import is_reviewed, score_and_threshold, verdict
from appliance.store.database import open_database
from appliance.store.datadir import DataDirectory
from appliance.store.users import admin_count
from appliance.web import db
from appliance.web.context import settings_of
from appliance.web.i18n import LANGUAGES, compile_catalogues, select_locale
from appliance.web.params import BoundedIntConverter

# many files per request in the single-request path; the browser page sends batches well below this
MAX_FORM_PARTS = 5000


def _secret_key(home: Path) -> bytes:
    """The key that signs session cookies: made once per box, readable by its owner only."""
    path = DataDirectory(home).web_secret
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes()


def create_app(settings: Settings, environ: dict[str, str] | None = None) -> Flask:
    """A fresh app over the data directory of ``settings`` (migrated on creation).

    ``environ`` is where ``APPLIANCE_*`` variables came from (``os.environ`` by default), to tell the
    admin which settings the environment fixes.
    """
    home = settings.home_path
    open_database(home).conn.close()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=_secret_key(home),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(settings.web_secure_cookies),
        SESSION_COOKIE_NAME="appliance_session",
        MAX_CONTENT_LENGTH=int(settings.max_upload_bytes),
        MAX_FORM_PARTS=MAX_FORM_PARTS,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session (idle timeout applies)
        APPLIANCE_SETTINGS=settings,
        APPLIANCE_ENVIRON=dict(os.environ if environ is None else environ),
        SITE_LANGUAGE=settings.web_language if settings.web_language in LANGUAGES else "en",
        BABEL_TRANSLATION_DIRECTORIES=str(compile_catalogues(DataDirectory(home).cache / "translations")),
    )
    app.url_map.converters["int"] = BoundedIntConverter  # before the blueprints' rules are made
    if settings.web_behind_proxy:
        app.wsgi_app = ForwardedByLoopbackProxy(app.wsgi_app)  # type: ignore[method-assign]
    CSRFProtect(app)
    Babel(app, locale_selector=select_locale)
    _register(app)
    return app


HSTS = "max-age=31536000"  # a year, as the nginx proxy of `appliance https setup` sends it


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class ForwardedByLoopbackProxy:
    """Take the client's address and scheme from X-Forwarded-For/-Proto (one proxy), but only when the peer
    is the proxy on this box (a loopback address); any other peer's X-Forwarded-* headers are ignored."""

    def __init__(self, wsgi_app):
        self.direct = wsgi_app
        self.proxied = ProxyFix(wsgi_app, x_for=1, x_proto=1)

    def __call__(self, environ, start_response):
        if _is_loopback(environ.get("REMOTE_ADDR", "")):
            return self.proxied(environ, start_response)
        return self.direct(environ, start_response)


def _register(app: Flask) -> None:
    from appliance.web import admin, auth, importing, models, pacs, recalls, report, study, worklist

    for module in (auth, worklist, study, report, importing, admin, pacs, models, recalls):
        app.register_blueprint(module.bp)
    db.init_app(app)
    app.before_request(_open_request)
    app.after_request(_security_headers)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    app.context_processor(lambda: {"languages": LANGUAGES, "get_locale": get_locale,
                                   "site_name": settings_of(app).site_name, "user": g.get("user"),
                                   "demonstration": settings_of(app).demonstration,
                                   "research_notice": _research_notice,
                                   "opacity_zone_table": opacity_figures.zone_table,
                                   "score_and_threshold": score_and_threshold, "is_reviewed": is_reviewed,
                                   "finding_sentences": lambda result: findings_text.result_sentences(result, _),
                                   "model_name": lambda model: findings_text.model_name(model, _),
                                   "verdict": lambda result: verdict(result, _),
                                   "skipped_sentence": lambda entry: findings_text.skipped_sentence(entry, _),
                                   "opacity_profile_svg": lambda result: opacity_figures.profile_svg(result, _)})


def _open_request() -> Any:
    from appliance.web.auth import load_user

    g.started = time.perf_counter()
    return load_user()


def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                "script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'self'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.is_secure and settings_of().web_behind_proxy:
        response.headers["Strict-Transport-Security"] = HSTS
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"  # patient data stays off shared caches and back buttons
    return response


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def _csrf_error(error: CSRFError):
    message = _("This form expired or did not come from this appliance; reload the page and try again.")
    if wants_json():
        return jsonify(error="CSRF", message=message), 400
    return render_template("error.html", code=400, message=message), 400


def _http_error(error: HTTPException):
    messages = {
        403: _("Your account's role does not allow this."),
        404: _("Not found."),
        413: _("The upload is larger than this appliance accepts (%(mib)d MiB).",
               mib=settings_of().max_upload_bytes // 2**20),
        429: _("Too many wrong passwords: wait a minute, then try again."),
    }
    message = messages.get(error.code or 500, error.description)
    if wants_json() or request.path.startswith("/import/upload"):
        response = jsonify(error=error.name, message=message)
    else:
        response = make_response(render_template("error.html", code=error.code, message=message))
    response.status_code = error.code or 500
    # what the error says in its headers stays: Retry-After of a 429, Allow of a 405
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _research_notice(result: dict[str, Any]) -> str | None:
    from appliance.outputs.report import model_notice

    return model_notice(result, _)


def bind_address(settings: Settings) -> tuple[str, str | None]:
    """Where the UI listens: ``web_host`` once an admin exists and no HTTPS proxy fronts it, else loopback
    (and why, for the log)."""
    host = settings.web_host
    loopback = _is_loopback(host) or host == "localhost"
    if settings.web_behind_proxy and not loopback:
        return "127.0.0.1", (f"web_host {host} is not used behind the HTTPS proxy (web_behind_proxy): "
                             "browsers reach the UI through it, the UI listens on 127.0.0.1 only")
    if loopback:
        return host, None
    database = open_database(settings.home_path)
    try:
        admins = admin_count(database)
    finally:
        database.conn.close()
    if admins:
        return host, None
    return "127.0.0.1", (f"web_host {host} is not used until the first admin account exists "
                         "(create it at this address, or with `appliance users add NAME --role admin`)")


def redirect_to(endpoint: str, **values: Any):
    return redirect(url_for(endpoint, **values))

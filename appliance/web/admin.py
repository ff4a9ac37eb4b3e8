"""Admin pages: model packs and engines, disk, results the PACS refused (retry, discard), DICOM nodes (with
C-ECHO), users, audit log, settings (in force at once, but for those a process takes only when it starts)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, make_response, redirect, render_template, request, url_for
from flask_babel import gettext as _

from appliance import backup, config, https
from appliance.errors import ApplianceError
from appliance.export import keys
from appliance.export import run as export_run
from appliance.inference.registry import inventory
from appliance.outputs import outbox
from appliance.outputs.outbox import parse_destinations
from appliance.store import model_switches, users
from appliance.store.database import audit, write_transaction
from appliance.store.datadir import DataDirectory
from appliance.web.auth import keep_session, role_required
from appliance.web.context import settings_of
from appliance.web.db import get_db
from appliance.web.params import bounded_int, page_number

bp = Blueprint("admin", __name__, url_prefix="/admin")
AUDIT_PAGE = 100
DICOM_SETTINGS = ("dicom_ae_title", "dicom_port", "dicom_allowed_callers", "pacs_destinations")


@bp.before_request
@role_required("admin")
def _admins_only() -> None:
    return None


def _audit(action: str, obj: str = "", **detail: Any) -> None:
    db = get_db()
    with write_transaction(db):
        audit(db, g.user["username"], action, obj, **detail)


def _config_file():
    return config.config_path(settings_of().home_path, current_app.config["APPLIANCE_ENVIRON"])


@bp.route("/")
def index():
    settings = settings_of()
    home = settings.home_path
    disk = shutil.disk_usage(home)
    db = get_db()
    stored = db.execute("SELECT coalesce(sum(size_bytes), 0), count(*) FROM instances").fetchone()
    rows, refused, availability = inventory(settings)
    for row in rows:
        row["switch"] = model_switches.switch(db, row["id"], row["version"])
        row["evaluated_here"] = model_switches.operating_point_id(db, row["id"], row["version"]) is not None
    return render_template("admin/index.html", packs=rows, refused=refused, tensorrt=availability,
                           demonstration=settings.demonstration,
                           exports=export_run.recent(db), site_key=_fingerprint(keys.site_public_key(home)),
                           hub_key=_hub_fingerprint(settings.hub_public_key), last_month=export_run.previous_month(),
                           disk={"total": disk.total, "free": disk.free, "used": disk.used,
                                 "watermark": settings.disk_low_watermark_mb * 2**20, "instances_bytes": stored[0],
                                 "instances": stored[1]},
                           outbox=dict(db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()),
                           site_ca=https.site_ca_pem(home) is not None,
                           certificate_days=https.days_left(https.TLSFiles.of(home).certificate),
                           set_aside=outbox.set_aside_rows(db), last_backup=backup.last_backup(db))


@bp.route("/https/site-ca.pem")
def site_ca():
    """The site CA certificate (PEM), for the radiologists' computers to trust; 404 before `appliance https setup`."""
    pem = https.site_ca_pem(settings_of().home_path)
    if pem is None:
        abort(404)
    response = make_response(pem)
    response.headers["Content-Type"] = "application/x-pem-file"
    response.headers["Content-Disposition"] = "attachment; filename=site-ca.pem"
    return response


@bp.route("/outbox", methods=["POST"])
def outbox_action():
    """Retry (queue again, with a fresh count of tries) or discard one object the PACS refused; audited."""
    action, row = request.form.get("action", ""), bounded_int(request.form.get("outbox_id"))
    if action not in ("retry", "discard") or row is None:
        abort(400)
    db = get_db()
    found = db.execute("SELECT destination, sop_instance_uid, state FROM outbox WHERE id = ?", [row]).fetchone()
    done = found is not None and (outbox.retry(db, row) if action == "retry" else outbox.discard(db, row))
    if not done:
        flash(_("Nothing changed: that object is no longer set aside."))
        return redirect(url_for("admin.index") + "#outbox")
    _audit(f"outbox_{action}", found[1], destination=found[0], was=found[2])
    flash(_("Queued again for %(dest)s.", dest=found[0]) if action == "retry"
          else _("Discarded: it will not be sent to %(dest)s.", dest=found[0]))
    return redirect(url_for("admin.index") + "#outbox")


def _fingerprint(key) -> str | None:
    return keys.fingerprint(key) if key is not None else None


def _hub_fingerprint(text: str) -> str | None:
    try:
        return keys.fingerprint(keys.parse_x25519_public(text)) if text else None
    except keys.KeyProblem:
        return None


@bp.route("/models/switch", methods=["POST"])
def switch_model():
    """Switch a classifier version on (only after the site's recorded evaluation) or off; audited."""
    model, version = request.form.get("model", ""), request.form.get("version", "")
    enabled = request.form.get("enabled") == "1"
    known = {(row["id"], row["version"]): row for row in inventory(settings_of())[0]}
    row = known.get((model, version))
    if row is None or row["kind"] != "classifier":
        abort(404)
    try:
        model_switches.set_switch(get_db(), model, version, enabled, g.user["username"])
    except model_switches.NotEvaluatedHere as exc:
        flash(_("Not switched on: %(why)s", why=str(exc)))
    else:
        flash(_("%(model)s %(version)s switched on.", model=model, version=version) if enabled
              else _("%(model)s %(version)s switched off.", model=model, version=version))
    return redirect(url_for("admin.index"))


@bp.route("/export", methods=["POST"])
def export():
    """Write a month's bundle into the export folder now (the monthly timer does the same)."""
    settings = settings_of()
    month = request.form.get("month", "").strip() or export_run.previous_month()
    out = Path(settings.export_dir) if settings.export_dir else DataDirectory(settings.home_path).exports
    try:
        result = export_run.export_month(settings, month, out, images=settings.export_images)
    except ApplianceError as exc:
        flash(_("Export not written: %(why)s", why=str(exc)))
    else:
        flash(_("Export of %(month)s written and verified: %(path)s", month=month, path=str(result.path)))
    return redirect(url_for("admin.index"))


@bp.route("/dicom", methods=["GET", "POST"])
def dicom():
    settings = settings_of()
    if request.method == "POST":
        changes = {name: request.form.get(name, "").strip() for name in DICOM_SETTINGS}
        try:
            parse_destinations(changes["pacs_destinations"])
            path = config.save_overrides(changes, _config_file())
        except (ValueError, config.SettingsError) as exc:
            flash(_("Not saved: %(why)s", why=str(exc)))
        else:
            _audit("settings_changed", "dicom", **changes)
            flash(_("Saved to %(path)s; in force now (the DICOM receiver restarts itself with it).", path=str(path)))
        return redirect(url_for("admin.dicom"))
    saved = config.saved_values(_config_file())
    return render_template("admin/dicom.html", settings=settings, saved=saved, names=DICOM_SETTINGS,
                           destinations=parse_destinations(settings.pacs_destinations))


@bp.route("/dicom/echo", methods=["POST"])
def echo():
    """C-ECHO one configured PACS destination and say how it answered."""
    from pynetdicom import AE

    settings = settings_of()
    wanted = request.form.get("destination", "")
    destination = next((d for d in parse_destinations(settings.pacs_destinations) if str(d) == wanted), None)
    if destination is None:
        abort(400)
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        ok = bool(status) and status.Status == 0x0000
        message = _("C-ECHO to %(dest)s succeeded.", dest=wanted) if ok else \
            _("C-ECHO to %(dest)s answered with an error status.", dest=wanted)
    else:
        ok, message = False, _("No association with %(dest)s: it refused, or nothing answers there.", dest=wanted)
    _audit("dicom_echo", wanted, ok=ok)
    flash(message)
    return redirect(url_for("admin.dicom"))


@bp.route("/users", methods=["GET", "POST"])
def users_page():
    db = get_db()
    if request.method == "POST":
        form = request.form
        try:
            if form.get("action") == "add":
                users.add_user(db, form.get("username", "").strip(), form.get("password", ""), form.get("role", ""),
                               actor=g.user["username"])
            elif form.get("action") == "password":  # ends every session of that account
                generation = users.set_password(db, form["username"], form.get("password", ""),
                                                actor=g.user["username"])
                if form["username"] == g.user["username"]:
                    keep_session(generation)
            elif form.get("action") == "change":
                users.set_user(db, form["username"], g.user["username"], role=form.get("role") or None,
                               disabled=form.get("disabled") == "1")
            else:
                abort(400)
        except users.AccountError as exc:
            flash(str(exc))
        else:
            flash(_("Saved."))
        return redirect(url_for("admin.users_page"))
    rows = list(db.query("SELECT username, role, disabled, created_at, password_changed_at FROM users "
                         "ORDER BY username"))
    return render_template("admin/users.html", users=rows, roles=users.ROLES, min_length=users.MIN_PASSWORD_LENGTH)


@bp.route("/audit")
def audit_log():
    db = get_db()
    page = page_number(request.args.get("page"))
    action, actor = request.args.get("action", "").strip(), request.args.get("actor", "").strip()
    # an empty filter matches every row: one fixed statement, whichever filters are set
    rows = list(db.query("SELECT * FROM audit_log WHERE (? = '' OR action = ?) AND (? = '' OR actor = ?) "
                         "ORDER BY id DESC LIMIT ? OFFSET ?",
                         [action, action, actor, actor, AUDIT_PAGE, (page - 1) * AUDIT_PAGE]))
    actions = [r[0] for r in db.execute("SELECT DISTINCT action FROM audit_log ORDER BY action")]
    return render_template("admin/audit.html", rows=rows, page=page, action=action, actor=actor, actions=actions,
                           more=len(rows) == AUDIT_PAGE)


@bp.route("/settings", methods=["GET", "POST"])
def settings_page():
    environ = current_app.config["APPLIANCE_ENVIRON"]
    if request.method == "POST":
        name, value = request.form.get("name", ""), request.form.get("value", "")
        try:
            path = config.save_overrides({name: value}, _config_file())
        except config.SettingsError as exc:
            flash(_("Not saved: %(why)s", why=str(exc)))
        else:
            _audit("settings_changed", name, value=value)
            flash(_saved_message(name, str(path), environ))
        return redirect(url_for("admin.settings_page"))
    saved = config.saved_values(_config_file())
    rows = [{"setting": s, "in_force": settings_of().values[s.name], "saved": saved[s.name],
             "from_environment": s.env_var in environ, "restart": _process_name(s.name)}
            for s in config.SETTINGS if s.name != "home"]
    return render_template("admin/settings.html", rows=rows)


def _saved_message(name: str, path: str, environ: dict[str, str]) -> str:
    """What saving ``name`` does now: nothing while the environment sets it, a restart for a fixed one."""
    env_var = config.Setting(name, None, "", str).env_var
    if env_var in environ:
        return _("Saved to %(path)s, but %(var)s is set in the environment: the saved value is not used.",
                 path=path, var=env_var)
    process = _process_name(name)
    if process:
        return _("Saved to %(path)s; takes effect when %(process)s restarts.", path=path, process=process)
    return _("Saved to %(path)s; in force now.", path=path)


def _process_name(name: str) -> str | None:
    """Which process must restart before setting ``name`` takes effect, in the reader's language (None: none)."""
    names = {"every service": _("every service"), "the web UI": _("the web UI"), "the worker": _("the worker")}
    process = config.FIXED_WHILE_RUNNING.get(name)
    return names.get(process, process) if process else None

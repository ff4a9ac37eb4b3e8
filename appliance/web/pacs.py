"""Results and the PACS on the study page: what was sent, what the PACS refused, and "send results again"."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, url_for
from flask_babel import gettext as _

from appliance.jobs.runner import send_again
from appliance.outputs import outbox
from appliance.store.database import audit, write_transaction
from appliance.web.auth import role_required
from appliance.web.context import settings_of
from appliance.web.db import get_db

bp = Blueprint("pacs", __name__)
SENDERS = ("technician", "admin")


def pacs_of_study(study_instance_uid: str) -> dict[str, Any]:
    """What ``_pacs.html`` shows for one study: its outbox rows by state, the set-aside ones, the destinations."""
    rows = outbox.study_rows(get_db(), study_instance_uid)
    counts = {state: sum(r["state"] == state for r in rows) for state in outbox.STATES}
    user = g.get("user")
    return {"rows": rows, "counts": counts, "set_aside": [r for r in rows if r["state"] == outbox.SET_ASIDE],
            "destinations": outbox.parse_destinations(settings_of().pacs_destinations),
            "can_send_again": bool(user) and user["role"] in SENDERS,
            "can_manage": bool(user) and user["role"] == "admin"}


@bp.app_context_processor
def _pacs_helpers() -> dict[str, Any]:
    return {"pacs_of_study": pacs_of_study}


@bp.route("/study/<uid>/send-again", methods=["POST"])
@role_required(*SENDERS)
def send_results_again(uid: str):
    """Queue every output of the study's current analyses for every PACS again (built first when missing)."""
    db = get_db()
    if db.execute("SELECT 1 FROM studies WHERE study_instance_uid = ?", [uid]).fetchone() is None:
        abort(404)
    settings = settings_of()
    if not settings.pacs_destinations.strip():
        flash(_("Not sent: no PACS destination is configured (Admin, DICOM)."))
        return redirect(url_for("study.page", uid=uid))
    try:
        queued = send_again(db, settings.home_path, settings, uid)
    except (LookupError, ValueError, OSError) as exc:
        flash(_("Not sent: the results could not be prepared (%(why)s).", why=str(exc)))
        return redirect(url_for("study.page", uid=uid))
    with write_transaction(db):
        audit(db, g.user["username"], "results_sent_again", uid, queued=queued)
    if queued:
        flash(_("%(n)d object(s) queued for the PACS again.", n=queued))
    else:
        flash(_("Nothing to send: this study has no analysed series."))
    return redirect(url_for("study.page", uid=uid))

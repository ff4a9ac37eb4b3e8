"""The recall list: patients a confirmed flag called back, earliest due first (overdue ones lead), and the
form that records what happened to them, here and on the study page (``_recall.html``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_babel import gettext as _

from appliance.store import recalls
from appliance.store.database import write_transaction
from appliance.web.auth import role_required
from appliance.web.db import get_db
from appliance.web.params import same_site_path

bp = Blueprint("recalls", __name__)
RECORDERS = ("technician", "radiologist")


def outcome_words() -> dict[str, str]:
    """Each outcome the form offers, in the reader's language."""
    return {"imaging": _("Further imaging"), "biopsy": _("Biopsy"), "malignant": _("Malignancy confirmed"),
            "benign": _("Benign finding, no malignancy"), "no-abnormality": _("No abnormality found"),
            "other-diagnosis": _("Other diagnosis, not malignant"), "lost": _("Lost to follow-up"),
            "declined": _("Patient declined further investigation")}


def recall_of_study(study_instance_uid: str) -> dict[str, Any]:
    """What ``_recall.html`` shows for one study: its recalls with their outcomes, and whether the reader may
    record one."""
    user = g.get("user")
    return {"recalls": recalls.study_recalls(get_db(), study_instance_uid),
            "can_record": bool(user) and user["role"] in RECORDERS}


@bp.app_context_processor
def _recall_helpers() -> dict[str, Any]:
    return {"recall_of_study": recall_of_study, "outcome_words": outcome_words}


@bp.route("/recalls")
def index():
    """Open recalls, earliest due first, each with its outcomes so far and the outcome form."""
    return render_template("recalls.html", recalls=recalls.open_recalls(get_db()), today=recalls.today().isoformat(),
                           can_record=g.user["role"] in RECORDERS)


@bp.route("/recalls/<int:recall_id>/outcome", methods=["POST"])
@role_required(*RECORDERS)
def record(recall_id: int):
    """Record one coded outcome on an open recall (a final one closes it); audited."""
    db = get_db()
    row = db.execute("SELECT study_instance_uid FROM recalls WHERE id = ?", [recall_id]).fetchone()
    if row is None:
        abort(404)
    back = same_site_path(request.form.get("next"), url_for("recalls.index"))
    try:
        with write_transaction(db):
            recalls.record_outcome(db, recall_id, request.form.get("outcome", ""), request.form.get("detail", ""),
                                   g.user["username"])
    except recalls.RecallRefused as refused:
        if refused.reason_code == "UNKNOWN_OUTCOME":
            abort(400)
        flash(_("This recall was already closed: nothing was recorded."))
        return redirect(back)
    flash(_("Outcome recorded."))
    return redirect(back)

"""The printable A4 report page and its PDF download."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, abort, g, render_template
from flask_babel import get_locale
from flask_babel import gettext as _

from appliance.outputs import report
from appliance.store.database import audit, write_transaction
from appliance.store.studies import latest_reviews, study
from appliance.web.context import settings_of
from appliance.web.db import get_db

bp = Blueprint("report", __name__)


def _study_or_404(uid: str) -> dict[str, Any]:
    doc = study(get_db(), uid)
    if doc is None:
        abort(404)
    return doc


@bp.route("/study/<uid>/report")
def page(uid: str):
    doc = _study_or_404(uid)
    return render_template("report.html", study=doc, reviews=latest_reviews(doc["reviews"]), report=report,
                           gettext=_)


@bp.route("/study/<uid>/report.pdf")
def pdf(uid: str):
    doc = _study_or_404(uid)
    data = report.render_pdf(doc, latest_reviews(doc["reviews"]), settings_of().site_name, _,
                             report.key_image_finder(settings_of().home_path))
    db = get_db()
    with write_transaction(db):
        audit(db, g.user["username"], "report_exported", uid, language=str(get_locale()), bytes=len(data))
    name = json.dumps(f"report-{doc.get('accession_number') or uid[-12:]}.pdf")
    return Response(data, mimetype="application/pdf",
                    headers={"Content-Disposition": f"attachment; filename={name}"})

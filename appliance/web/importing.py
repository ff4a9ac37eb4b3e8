"""The import page: browser upload (many files or zip archives), USB status, recent imports, quarantine."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, abort, flash, g, jsonify, redirect, render_template, request, url_for
from flask_babel import gettext as _

from appliance.errors import DiskLow, Rejected
from appliance.ingest.upload import UploadTooLarge, receive_upload
from appliance.jobs import queue
from appliance.store import imports, quarantine
from appliance.store.database import audit, utcnow, write_transaction
from appliance.store.instances import open_store
from appliance.web.auth import role_required
from appliance.web.context import settings_of
from appliance.web.db import get_db
from appliance.web.params import bounded_int

log = logging.getLogger(__name__)
bp = Blueprint("importing", __name__)
QUARANTINE_PAGE = 100


@bp.route("/import")
@role_required("technician", "admin")
def page():
    db = get_db()
    rows = list(db.query("SELECT * FROM quarantine ORDER BY id DESC LIMIT ?", [QUARANTINE_PAGE]))
    total = int(db.execute("SELECT count(*) FROM quarantine").fetchone()[0])
    return render_template("import.html", imports=imports.recent(db), quarantine=rows, quarantine_total=total,
                           usb=imports.read_usb_status(settings_of().home_path),
                           max_mib=settings_of().max_upload_bytes // 2**20)


def _upload_ledger(db, upload_id: int | None) -> int:
    """This upload's row in the import ledger: the one the page's first batch started, or a new one."""
    if upload_id:
        row = db.execute("SELECT actor, state FROM imports WHERE id = ?", [upload_id]).fetchone()
        if row and row[0] == g.user["username"] and row[1] == "running":
            return upload_id
    return imports.start(db, "upload", g.user["username"])


@bp.route("/import/upload", methods=["POST"])
@role_required("technician", "admin")
def upload():
    """One batch of files (field ``files``). ``final=1`` queues the series of every batch of this upload."""
    settings = settings_of()
    store = open_store(settings)
    try:
        import_id = _upload_ledger(store.db, bounded_int(request.form.get("upload_id")))
        parts = [(f.filename or "", f.stream) for f in request.files.getlist("files")]
        try:
            summary = receive_upload(parts, store, settings)
        except UploadTooLarge as exc:
            return jsonify(error="UPLOAD_TOO_LARGE", message=str(exc)), UploadTooLarge.http_status
        except DiskLow as exc:
            return jsonify(error=exc.reason_code.value, message=exc.reason), DiskLow.http_status
        except Exception:  # a file the import path did not foresee: the batch fails, the service goes on
            log.exception("upload %d: a file in this batch could not be imported", import_id)
            _fail(store, import_id)
            return jsonify(error="IMPORT_FAILED", upload_id=import_id,
                           message=_("A file in this batch could not be imported, for a reason this appliance "
                                     "did not foresee; the files before it were kept. The web service's log "
                                     "says which error it was.")), 422
        with write_transaction(store.db):
            row = store.db.table("imports").get(import_id)
            store.db.table("imports").update(import_id, {
                "files_read": row["files_read"] + len(parts), "stored": row["stored"] + summary.stored,
                "duplicates": row["duplicates"] + summary.duplicates,
                "quarantined": row["quarantined"] + len(summary.quarantined)})
        queued = _finish(store, import_id) if request.form.get("final") == "1" else 0
        return jsonify(upload_id=import_id, stored=summary.stored, duplicates=summary.duplicates,
                       quarantined=summary.quarantined, series=len(summary.series), queued_series=queued)
    finally:
        store.db.conn.close()


def _fail(store, import_id: int) -> None:
    """Close this upload's ledger row as failed, and audit it."""
    with write_transaction(store.db):
        store.db.table("imports").update(import_id, {"state": "failed", "finished_at": utcnow()})
        audit(store.db, g.user["username"], "import_failed", "upload", import_id=import_id)


def _finish(store, import_id: int) -> int:
    """Queue every series this upload touched (an explicit import is complete) and close its ledger row."""
    with write_transaction(store.db):
        row = store.db.table("imports").get(import_id)
        started = row["started_at"]
    series = list(store.db.execute(
        "SELECT DISTINCT series_instance_uid, study_instance_uid FROM instances WHERE source = 'upload' "
        "AND received_at >= ?", [started]))
    for series_uid, study_uid in series:
        queue.enqueue_series(store.db, series_uid, study_uid, priority=1)
    with write_transaction(store.db):
        store.db.table("imports").update(import_id, {"state": "done", "series": len(series),
                                               "finished_at": utcnow()})
        audit(store.db, g.user["username"], "import", "upload", import_id=import_id, series=len(series),
              stored=row["stored"], duplicates=row["duplicates"], quarantined=row["quarantined"])
    return len(series)


@bp.route("/quarantine/<int:row_id>/retry", methods=["POST"])
@role_required("admin")
def retry(row_id: int):
    store = open_store(settings_of())
    try:
        accepted = quarantine.retry(store, row_id)
    except LookupError:
        abort(404)
    except Rejected as exc:
        flash(_("Still refused: %(code)s, %(reason)s", code=exc.reason_code.value, reason=exc.reason))
    else:
        header = accepted.header
        queue.enqueue_series(store.db, header.series_instance_uid, header.study_instance_uid, priority=1)
        flash(_("The file was accepted and its series queued for analysis."))
    finally:
        with write_transaction(store.db):
            audit(store.db, g.user["username"], "quarantine_retry", str(row_id))
        store.db.conn.close()
    return redirect(url_for("importing.page"))


@bp.route("/quarantine/<int:row_id>/delete", methods=["POST"])
@role_required("admin")
def delete(row_id: int):
    db = get_db()
    row: dict[str, Any] | None = quarantine.delete(db, settings_of().home_path, row_id)
    if row is None:
        abort(404)
    with write_transaction(db):
        audit(db, g.user["username"], "quarantine_delete", str(row_id), original_name=row["original_name"],
              reason_code=row["reason_code"])
    flash(_("Quarantined file deleted."))
    return redirect(url_for("importing.page"))

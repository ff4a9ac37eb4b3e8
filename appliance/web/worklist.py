"""The worklist: every study with its state, live progress and per-model flags; filters, search, paging."""

from __future__ import annotations

import re

from flask import Blueprint, jsonify, render_template, request

from appliance.web.db import get_db
from appliance.web.params import page_number
from appliance.web.queries import PAGE_SIZE, STATUSES, WorklistFilter, progress, worklist

bp = Blueprint("worklist", __name__)
DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")
FILTER_ARGS = ("q", "status", "flagged", "unreviewed", "recall", "from", "to")  # kept across pages


def _date(text: str) -> str:
    text = text.strip()
    return text.replace("-", "") if DATE.match(text) else ""


def _filter() -> WorklistFilter:
    args = request.args
    return WorklistFilter(text=args.get("q", "").strip()[:100], status=args.get("status", ""),
                          flagged=args.get("flagged") == "1", unreviewed=args.get("unreviewed") == "1",
                          recall_overdue=args.get("recall") == "overdue",
                          date_from=_date(args.get("from", "")),
                          date_to=_date(args.get("to", "")), page=page_number(args.get("page")),
                          sort="study_date" if args.get("sort") == "study_date" else "arrival")


@bp.route("/")
def index():
    flt = _filter()
    rows, total = worklist(get_db(), flt)
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    query = {k: v for k, v in request.args.items() if k in FILTER_ARGS and v}
    return render_template("worklist.html", rows=rows, total=total, flt=flt, pages=pages, statuses=STATUSES,
                           query=query)


@bp.route("/api/progress")
def api_progress():
    """Status of the studies on the technician's screen (polled every few seconds)."""
    return jsonify(progress(get_db(), request.args.getlist("study")))

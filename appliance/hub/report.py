"""The hub's summary across sites: volumes, flag rates, rejection reasons, turnaround, model versions, and
recall rate, positive predictive value and detection rate per site, model and month with 95% intervals;
an HTML page with inline SVG charts (nothing loaded from elsewhere) and the same tables as CSV and JSON."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.hub.store import HubDB
from appliance.metrics import wilson_interval


def summary(db: HubDB) -> dict[str, list[dict[str, Any]]]:
    """The report's tables, from the current (not superseded) revision of every site and month."""
    volumes = db.rows(
        "SELECT r.site_id, s.name, r.month, count(DISTINCT r.study) AS studies, count(*) AS results, "
        "sum(r.flagged) AS flagged, sum(CASE WHEN r.review <> '' THEN 1 ELSE 0 END) AS reviewed "
        "FROM results r JOIN sites s ON s.site_id = r.site_id GROUP BY r.site_id, s.name, r.month "
        "ORDER BY r.month, r.site_id")
    flag_rates = db.rows(
        "SELECT model, model_version, count(*) AS results, sum(flagged) AS flagged, "
        "sum(CASE WHEN review = 'confirmed' THEN 1 ELSE 0 END) AS confirmed, "
        "sum(CASE WHEN review = 'rejected' THEN 1 ELSE 0 END) AS rejected "
        "FROM results GROUP BY model, model_version ORDER BY model, model_version")
    for row in flag_rates:
        row["flag_rate"] = round(row["flagged"] / row["results"], 4) if row["results"] else None
    stats = db.rows("SELECT site_id, month, name, value FROM stats ORDER BY site_id, month, name")
    rejections = [{"site_id": r["site_id"], "month": r["month"], "reason": r["name"].split(":", 1)[1],
                   "kind": r["name"].split(":", 1)[0], "count": int(r["value"])}
                  for r in stats if ":" in r["name"]]
    turnaround = [{"site_id": r["site_id"], "month": r["month"], "name": r["name"], "seconds": r["value"]}
                  for r in stats if r["name"].startswith("turnaround")]
    received = [{"site_id": r["site_id"], "month": r["month"], "studies_received": int(r["value"])}
                for r in stats if r["name"] == "studies_received"]
    models = db.rows("SELECT DISTINCT site_id, model, version, validated, backend, model_precision FROM models "
                     "ORDER BY site_id, model")
    return {"volumes": volumes, "flag_rates": flag_rates, "rejections": rejections, "turnaround": turnaround,
            "received": received, "models": models, "outcomes": outcome_rates(db)}


def latest_recalls(db: HubDB) -> list[dict[str, Any]]:
    """Each recall (site, study, model) as the latest month's bundle that mentions it saw it."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in db.rows("SELECT * FROM recalls ORDER BY month, revision"):
        latest[(row["site_id"], row["study"], row["model"])] = row
    return list(latest.values())


def _rate(successes: int, n: int, scale: int = 1) -> dict[str, Any]:
    """A proportion with its Wilson 95% interval, times ``scale`` (1000: per 1000); None when ``n`` is 0."""
    ci = wilson_interval(successes, n)
    if ci is None:
        return {"value": None, "ci_low": None, "ci_high": None}
    return {"value": round(scale * successes / n, 4), "ci_low": round(scale * ci[0], 4),
            "ci_high": round(scale * ci[1], 4)}


def outcome_rates(db: HubDB) -> list[dict[str, Any]]:
    """Per site, model and month of screening: the recall rate (recalls / screened studies), the positive
    predictive value (recalls with a malignancy confirmed / recalls with a diagnosis) and the detection rate
    (malignancies confirmed per 1000 screened studies), each with its Wilson 95% interval. A cancelled recall
    (its flag rejected) is no recall; lost to follow-up and declined are in no PPV denominator."""
    screened = {(r["site_id"], r["model"], r["month"]): int(r["n"]) for r in db.rows(
        "SELECT site_id, model, month, count(DISTINCT study) AS n FROM results GROUP BY site_id, model, month")}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for recall in latest_recalls(db):
        if recall["state"] != "cancelled":
            groups.setdefault((recall["site_id"], recall["model"], recall["screened_month"]), []).append(recall)
    rows = []
    for key in sorted(set(groups) | {k for k, n in screened.items() if n}, key=lambda k: (k[2], k[0], k[1])):
        site, model, month = key
        mine, n = groups.get(key, []), screened.get(key, 0)
        diagnosed = sum(bool(r["diagnosis"]) for r in mine)
        malignant = sum(bool(r["malignant"]) for r in mine)
        rows.append({"site_id": site, "model": model, "month": month, "screened": n, "recalls": len(mine),
                     "open": sum(r["state"] == "open" for r in mine), "diagnosed": diagnosed, "malignant": malignant,
                     **{f"recall_rate_{k}": v for k, v in _rate(len(mine), n).items()},
                     **{f"ppv_{k}": v for k, v in _rate(malignant, diagnosed).items()},
                     **{f"detection_per_1000_{k}": v for k, v in _rate(malignant, n, 1000).items()}})
    return rows


def _bars(rows: Sequence[tuple[str, float]], unit: str, width: int = 560) -> str:
    """A horizontal bar chart as inline SVG."""
    if not rows:
        return "<p>No data.</p>"
    top = max(v for _, v in rows) or 1.0
    height = 22 * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (label, value) in enumerate(rows):
        y, w = 5 + 22 * i, (width - 260) * value / top
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label)}</text>'
                     f'<rect x="200" y="{y}" width="{w:.1f}" height="16" fill="#0b5cad"/>'
                     f'<text x="{205 + w:.1f}" y="{y + 13}" font-size="11">{value:g} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No data.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(tables: dict[str, list[dict[str, Any]]]) -> str:
    volumes = [(f"{r['name'] or r['site_id']} {r['month']}", float(r["studies"])) for r in tables["volumes"]]
    rates = [(f"{r['model']} {r['model_version']}", round(100 * (r["flag_rate"] or 0), 2))
             for r in tables["flag_rates"]]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Screening programme report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left}}</style></head><body>
<h1>Screening programme report</h1>
<p>Results of AI screening models; models marked not validated are for research use only.</p>
<h2>Studies per site and month</h2>{_bars(volumes, "studies")}{_table(tables["volumes"])}
<h2>Flag rate per model version</h2>{_bars(rates, "%")}{_table(tables["flag_rates"])}
<h2>Rejected series and quarantined files by reason</h2>{_table(tables["rejections"])}
<h2>Turnaround (received to analysed)</h2>{_table(tables["turnaround"])}
<h2>Model versions in use</h2>{_table(tables["models"])}
<h2>Recalls and outcomes per site, model and month of screening (95% Wilson intervals)</h2>
<p>Recall rate: recalls / screened studies. Positive predictive value: recalls with a malignancy confirmed / recalls
with a diagnosis (lost to follow-up, declined and open recalls are left out). Detection rate: malignancies confirmed
per 1000 screened studies.</p>{_table(tables["outcomes"])}
</body></html>
"""


def write_report(db: HubDB, out_dir: Path) -> list[Path]:
    """report.html and one CSV per table in ``out_dir``; returns the paths."""
    tables = summary(db)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.html", out_dir / "report.json"]
    paths[0].write_text(render_html(tables))
    paths[1].write_text(json.dumps(tables, indent=1, sort_keys=True, default=str))
    for name, rows in tables.items():
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        path = out_dir / f"{name}.csv"
        path.write_text(buffer.getvalue())
        paths.append(path)
    return paths

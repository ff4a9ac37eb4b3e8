"""Generated programme data for sizing and load tests of the hub: sites with real keys, months of result
rows at the sizes a clinic with one CT scanner produces, sealed into monthly bundles by the same content
and bundle functions as ``appliance export`` (only the rows are generated instead of analysed).

A site's month: 150 to 900 studies (5 to 30 CTs a working day), one or two series each, one or two
screening models per series: a few hundred to a few thousand result rows.
"""

from __future__ import annotations

import datetime
import hashlib
import random
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from appliance.export import bundle, content, keys

MODELS = [  # (id, version, validated, backend, precision, threshold, flag rate)
    ("chest-covid19", "1.2.0", True, "onnxruntime", "int8", 0.5, 0.06),
    ("abdomen-pancreas", "0.9.1", False, "onnxruntime", "fp32", 0.62, 0.02),
]
REJECTION_REASONS = ("NOT_CT", "TOO_FEW_SLICES", "INCONSISTENT_SPACING", "DUPLICATE_POSITIONS", "LOCALIZER")
QUARANTINE_REASONS = ("NOT_DICOM", "TRUNCATED", "NO_PIXEL_DATA")


@dataclass(frozen=True)
class Site:
    site_id: str
    name: str
    signer: Ed25519PrivateKey

    @property
    def public_text(self) -> str:
        return keys.encode_public(self.signer.public_key())


def make_site(n: int) -> Site:
    """A site with its own Ed25519 key; its id derived from the key as a real appliance derives it."""
    signer = Ed25519PrivateKey.generate()
    return Site("site-" + keys.fingerprint(signer.public_key()).replace(":", "")[:12], f"Clinic {n:03d}", signer)


def past_months(count: int, today: datetime.date | None = None) -> list[str]:
    """The ``count`` months before this one, oldest first."""
    today = today or datetime.date.today()
    year, month, out = today.year, today.month, []
    for _ in range(count):
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        out.append(f"{year:04d}-{month:02d}")
    return out[::-1]


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(122)}"


def month_rows(rng: random.Random, month: str, studies: int) -> list[dict[str, Any]]:
    """Result rows as :func:`content.study_results` gives them (pseudonyms, shifted dates), ``studies`` studies."""
    year, mon = (int(v) for v in month.split("-"))
    rows = []
    for _ in range(studies):
        study, patient = _uid(rng), hashlib.sha256(rng.randbytes(16)).hexdigest()[:16]
        date = datetime.date(year, mon, rng.randint(1, 28)) - datetime.timedelta(days=rng.randint(1, 365))
        for _ in range(rng.choice((1, 1, 2))):
            series = _uid(rng)
            models = rng.sample(MODELS, rng.choice((1, 2)))
            for model, version, validated, backend, precision, threshold, rate in models:
                flagged = rng.random() < rate
                score = round(rng.uniform(threshold, 1.0) if flagged else rng.uniform(0.0, threshold - 0.01), 4)
                review = rng.choice(("confirmed", "rejected", "")) if flagged else ""
                rows.append({"study": study, "patient": patient, "study_date_shifted": f"{date:%Y%m%d}",
                             "series": series, "model": model, "model_version": version, "validated": validated,
                             "backend": backend, "precision": precision, "score": score, "threshold": threshold,
                             "flagged": flagged, "review": review,
                             "turnaround_seconds": round(rng.lognormvariate(4.5, 0.5), 1)})
    return rows


def statistics_doc(rng: random.Random, month: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The month's usage and QA statistics, shaped as :func:`content.statistics_doc` writes them."""
    turnarounds = sorted(r["turnaround_seconds"] for r in rows)
    studies, series = len({r["study"] for r in rows}), len({r["series"] for r in rows})
    return {"month": month, "studies_received": studies, "synthetic_studies_left_out": 0,
            "instances_received": series * rng.randint(150, 450), "series_analysed": series,
            "series_rejected_by_reason": {r: rng.randint(0, 12) for r in rng.sample(REJECTION_REASONS, 3)},
            "files_quarantined_by_reason": {r: rng.randint(0, 5) for r in rng.sample(QUARANTINE_REASONS, 2)},
            "jobs_failed": rng.randint(0, 3),
            "turnaround_seconds": {"count": len(turnarounds),
                                   "median": turnarounds[len(turnarounds) // 2] if turnarounds else None,
                                   "p90": turnarounds[int(len(turnarounds) * 0.9)] if turnarounds else None}}


def inventory_doc() -> dict[str, Any]:
    return {"appliance_version": "0.1.0", "tensorrt": "not installed", "refused": [],
            "models": [{"id": m, "version": v, "validated": ok, "backend": b, "precision": p, "why": "",
                        "model_sha256": hashlib.sha256(f"{m}/{v}".encode()).hexdigest()}
                       for m, v, ok, b, p, _, _ in MODELS]}


def month_bundle(site: Site, month: str, revision: int, rows: list[dict[str, Any]], stats: dict[str, Any],
                 hub: X25519PublicKey, validate: bool = True) -> bytes:
    """The sealed bundle file of one site's month, as ``appliance export`` writes it.

    ``validate=False`` skips only the FHIR R4 validation (the slowest step; sizing runs check a sample)."""
    fhir = content.fhir_bundle(rows, site.site_id, month)
    members = {"results.fhir.json": content.json_bytes(content.validate_fhir(fhir) if validate else fhir, compact=True),
               "results.csv": content.results_csv(rows), "statistics.json": content.json_bytes(stats),
               "inventory.json": content.json_bytes(inventory_doc()),
               "audit-summary.json": content.json_bytes({"login": 40, "export": 1})}
    year, mon = (int(v) for v in month.split("-"))
    created = datetime.datetime(year + mon // 12, mon % 12 + 1, 1, 2, revision, tzinfo=datetime.timezone.utc)
    created_at = created.isoformat(timespec="seconds")
    manifest = {"site_id": site.site_id, "site_name": site.name, "month": month, "revision": revision,
                "created_at": created_at, "appliance_version": "0.1.0", "deidentification": "generated",
                "counts": {"studies": len({r["study"] for r in rows}), "results": len(rows),
                           "flagged": sum(r["flagged"] for r in rows), "images": 0, "images_left_out_burned_in": 0}}
    inner = bundle.pack_members(members, manifest, site.signer)
    return bundle.seal(inner, {"site_id": site.site_id, "month": month, "revision": revision,
                               "created_at": created_at}, site.signer, hub)

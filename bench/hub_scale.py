"""The programme hub at scale: 300 sites x 12 months of signed, encrypted monthly bundles imported into PostgreSQL.

Bundles are made by the export's own content and bundle functions from generated result rows
(appliance/hub/generate.py: 150-900 studies a site-month, a few hundred to a few thousand results), one key
pair per site; each site's first month is also validated as FHIR R4 (validating all of them would dominate
the generation time). A real PostgreSQL server is started on loopback (tests/postgres.py). The bundles are
imported by --processes processes at once, each its own sites; about 5% of the months come twice (a corrected
revision 2, imported by another process than revision 1). Printed: generation and import throughput
(bundles/s, results/s), the report's time over every site and month, the hub FHIR export of one month, the
database size (pg_database_size), and the check that every site and month is there once at its newest revision.

Run: .venv/bin/python bench/hub_scale.py [--sites 300] [--months 12] [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.export import keys  # noqa: E402
from appliance.hub import fhir, generate, merge, report  # noqa: E402
from appliance.hub.store import HubDB  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402


def make_site(task: tuple[int, list[str], str, str, float]) -> dict:
    """One site's months as bundle files; returns its key and what each month should hold at the hub."""
    n, months, hub_text, out, revised = task
    rng = random.Random(n)
    hub = keys.parse_x25519_public(hub_text)
    site = generate.make_site(n)
    files, expected, rows_made = [], {}, 0
    for k, month in enumerate(months):
        for revision in range(1, 3 if rng.random() < revised else 2):
            rows = generate.month_rows(rng, month, rng.randint(150, 900))
            data = generate.month_bundle(site, month, revision, rows, generate.statistics_doc(rng, month, rows), hub,
                                         validate=k == 0 and revision == 1)
            path = Path(out) / f"{site.site_id}-{month}-r{revision}.ctx"
            path.write_bytes(data)
            files.append((revision, str(path)))
            expected[month] = (revision, len(rows))
            rows_made += len(rows)
    return {"n": n, "site_id": site.site_id, "name": site.name, "public": site.public_text, "files": files,
            "expected": expected, "rows": rows_made}


def import_share(task: tuple[str, str, list[str]]) -> dict:
    """One importing process: its files in order; counts what merged and what was refused, by reason."""
    url, hub_dir, paths = task
    db = HubDB(url)
    merged = results = 0
    refused: dict[str, int] = {}
    for path in paths:
        try:
            results += merge.import_bundle(db, Path(hub_dir), Path(path))["results"]
            merged += 1
        except merge.bundle.BundleRefused as exc:
            refused[exc.reason_code] = refused.get(exc.reason_code, 0) + 1
    db.close()
    return {"merged": merged, "results": results, "refused": refused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=300)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--processes", type=int, default=4, help="concurrent importing processes")
    parser.add_argument("--revised", type=float, default=0.05, help="share of months sent twice (revision 2)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hub-scale-"))
    root.chmod(0o755)
    url, stop = start_postgres(root / "pg")
    ctx = multiprocessing.get_context("spawn")
    try:
        hub_dir, out = root / "hub", root / "bundles"
        out.mkdir()
        hub_text = keys.encode_public(keys.init_hub_keys(hub_dir))
        months = generate.past_months(args.months)
        t0 = time.perf_counter()
        with ctx.Pool(os.cpu_count() or 1) as pool:
            sites = pool.map(make_site, [(n, months, hub_text, str(out), args.revised) for n in range(args.sites)])
        made = time.perf_counter() - t0
        n_files = sum(len(s["files"]) for s in sites)
        n_rows = sum(s["rows"] for s in sites)
        size = sum(Path(p).stat().st_size for s in sites for _, p in s["files"])
        print(f"generated {n_files} bundles ({n_rows} results, {size / 1e6:.0f} MB, mean "
              f"{size / n_files / 1e3:.0f} kB) in {made:.0f} s: {n_files / made:.1f} bundles/s", flush=True)

        db = HubDB(url)
        for s in sites:
            merge.add_site(db, s["public"], s["name"], s["site_id"])
        shares: list[list[str]] = [[] for _ in range(args.processes)]
        for s in sites:
            for revision, path in s["files"]:
                shares[(s["n"] + revision - 1) % args.processes].append(path)
        t0 = time.perf_counter()
        with ctx.Pool(args.processes) as pool:
            done = pool.map(import_share, [(url, str(hub_dir), share) for share in shares])
        took = time.perf_counter() - t0
        merged = sum(d["merged"] for d in done)
        refused: dict[str, int] = {}
        for d in done:
            for code, count in d["refused"].items():
                refused[code] = refused.get(code, 0) + count
        results = db.rows("SELECT count(*) AS n FROM results")[0]["n"]
        print(f"imported by {args.processes} processes in {took:.0f} s: {merged} merged, refused {refused}; "
              f"{n_files / took:.1f} bundles/s, {sum(d['results'] for d in done) / took:.0f} results/s", flush=True)

        held = {(r["site_id"], r["month"]): (int(r["revision"]), int(r["n"])) for r in db.rows(
            "SELECT site_id, month, max(revision) AS revision, count(*) AS n FROM results GROUP BY site_id, month")}
        want = {(s["site_id"], m): e for s in sites for m, e in s["expected"].items()}
        current = db.rows("SELECT count(*) AS n FROM bundles WHERE superseded = 0")[0]["n"]
        complete = held == want and current == len(want)
        print(f"every site and month once at its newest revision: {complete} ({len(held)} of {len(want)})")

        t0 = time.perf_counter()
        tables = report.summary(db)
        summary_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report.write_report(db, root / "report")
        report_s = time.perf_counter() - t0
        print(f"report over {len(tables['volumes'])} site-months: summary {summary_s:.1f} s, "
              f"HTML and CSV {report_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        entries = fhir.write_month(db, months[-1], root / "month.fhir.json")
        fhir_s = time.perf_counter() - t0
        print(f"hub FHIR export of {months[-1]} (every site, validated as R4): {entries} entries in {fhir_s:.0f} s")
        size_db = db.size_bytes()
        print(f"database size: {size_db / 1e6:.0f} MB for {results} results "
              f"({size_db / max(results, 1):.0f} bytes a result, bundles {size / 1e6:.0f} MB)")
        print(json.dumps({"sites": args.sites, "months": args.months, "bundles": n_files, "results": results,
                          "generate_s": round(made, 1), "import_s": round(took, 1),
                          "bundles_per_s": round(n_files / took, 2), "results_per_s": round(results / took),
                          "report_summary_s": round(summary_s, 2), "report_write_s": round(report_s, 2),
                          "fhir_month_s": round(fhir_s, 1), "db_bytes": size_db, "bundle_bytes": size,
                          "complete": complete}))
        db.close()
        return 0 if complete else 1
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

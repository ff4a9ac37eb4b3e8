"""The hub holding a programme: many sites' signed monthly bundles imported by concurrent processes, into a real
PostgreSQL server and into SQLite; every site and month present once at its newest revision, the report's
totals equal to what was generated; imports of different sites do not wait for each other; the hub's merged
month exported as a validated FHIR R4 Bundle."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.export import keys
from appliance.hub import fhir, generate, merge, report
from appliance.hub.store import HubDB
from tests.postgres import start_or_skip

pytestmark = pytest.mark.slow

SITES, MONTHS, PROCESSES = 20, 3, 4


@dataclass
class Programme:
    hub_dir: Path
    sites: list[generate.Site]
    months: list[str]
    files: list[tuple[int, int, Path]]  # (site index, revision, bundle file)
    expected: dict[tuple[str, str], tuple[int, int, int]]  # (site, month) -> (newest revision, results, flagged)


@pytest.fixture(scope="module")
def programme(tmp_path_factory: pytest.TempPathFactory) -> Programme:
    """20 sites x 3 months of sealed bundles; about a quarter of the months also have a corrected revision 2."""
    tmp = tmp_path_factory.mktemp("programme")
    hub_dir = tmp / "hub"
    hub_public = keys.init_hub_keys(hub_dir)
    rng = random.Random(11)
    sites = [generate.make_site(n) for n in range(SITES)]
    months = generate.past_months(MONTHS)
    files, expected = [], {}
    (tmp / "bundles").mkdir()
    for i, site in enumerate(sites):
        for month in months:
            for revision in range(1, 3 if rng.random() < 0.25 else 2):
                rows = generate.month_rows(rng, month, rng.randint(5, 30))
                data = generate.month_bundle(site, month, revision, rows, generate.statistics_doc(rng, month, rows),
                                             hub_public)
                path = tmp / "bundles" / f"{site.site_id}-{month}-r{revision}.ctx"
                path.write_bytes(data)
                files.append((i, revision, path))
                expected[(site.site_id, month)] = (revision, len(rows), sum(r["flagged"] for r in rows))
    return Programme(hub_dir, sites, months, files, expected)


def _register(db: HubDB, programme: Programme) -> None:
    for site in programme.sites:
        merge.add_site(db, site.public_text, site.name, site.site_id)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "hub", *args]


def _import_concurrently(programme: Programme, url: str) -> list[str]:
    """PROCESSES processes, each importing its own sites; a month's revision 2 goes to another process than its
    revision 1, so the two may race. Returns every line the processes printed."""
    shares: list[list[str]] = [[] for _ in range(PROCESSES)]
    for site, revision, path in programme.files:
        shares[(site + revision - 1) % PROCESSES].append(str(path))
    procs = [subprocess.Popen(_cli("import", *share, "--hub", str(programme.hub_dir), "--db", url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for share in shares]
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), err
        assert "Traceback" not in err, err
        lines += out.splitlines()
    return lines


def _check_hub(db: HubDB, programme: Programme, lines: list[str]) -> None:
    merged = [line for line in lines if line.startswith("merged ")]
    refused = [line for line in lines if line.startswith("refused ")]
    assert len(merged) + len(refused) == len(programme.files)
    assert all(": STALE: " in line and "-r1.ctx" in line for line in refused), refused  # r1 after its r2
    current = db.rows("SELECT site_id, month, revision FROM bundles WHERE superseded = 0")
    assert sorted((r["site_id"], r["month"]) for r in current) == sorted(programme.expected)  # each month once
    for r in current:
        assert r["revision"] == programme.expected[(r["site_id"], r["month"])][0]
    counted = {(r["site_id"], r["month"]): (int(r["revision"]), int(r["n"]), int(r["flagged"])) for r in db.rows(
        "SELECT site_id, month, max(revision) AS revision, count(*) AS n, sum(flagged) AS flagged, "
        "count(DISTINCT revision) AS revisions FROM results GROUP BY site_id, month")}
    assert counted == programme.expected  # no month lost, none doubled, only its newest revision's rows
    volumes = report.summary(db)["volumes"]
    assert sum(v["results"] for v in volumes) == sum(n for _, n, _ in programme.expected.values())
    assert sum(v["flagged"] for v in volumes) == sum(f for _, _, f in programme.expected.values())
    assert len(volumes) == SITES * MONTHS


def test_concurrent_imports_into_postgresql_lose_no_month(programme, tmp_path):
    pg_root = Path(tempfile.mkdtemp(prefix="hub-scale-pg-"))  # outside pytest's 0700 folders: the server's user
    url, stop = start_or_skip(pg_root)
    try:
        db = HubDB(url)
        _register(db, programme)
        t0 = time.perf_counter()
        lines = _import_concurrently(programme, url)
        seconds = time.perf_counter() - t0
        _check_hub(db, programme, lines)
        rows = db.rows("SELECT count(*) AS n FROM results")[0]["n"]
        print(f"\n{len(programme.files)} bundles, {rows} results by {PROCESSES} processes into PostgreSQL in "
              f"{seconds:.1f} s ({len(programme.files) / seconds:.1f} bundles/s); "
              f"database {db.size_bytes() / 1e6:.1f} MB")
        out = tmp_path / "month.fhir.json"
        hub = subprocess.run(_cli("fhir", "--db", url, "--hub", str(programme.hub_dir), "--month",
                                  programme.months[-1], "--out", str(out)), capture_output=True, text=True)
        assert hub.returncode == 0 and "validated" in hub.stdout, hub.stderr
        doc = json.loads(out.read_text())
        kinds = [e["resource"]["resourceType"] for e in doc["entry"]]
        month_results = sum(n for (_, m), (_, n, _) in programme.expected.items() if m == programme.months[-1])
        month_studies = db.rows("SELECT count(DISTINCT study) AS n FROM results WHERE month = ?",
                                [programme.months[-1]])[0]["n"]
        assert kinds.count("Observation") == month_results
        assert kinds.count("ImagingStudy") == kinds.count("DiagnosticReport") == month_studies
        assert fhir.month_bundle(db, programme.months[-1]) == doc
        db.close()
    finally:
        stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def test_an_import_waits_only_for_its_own_site_and_month_on_postgresql(programme, tmp_path):
    """While a transaction holds site 0's month, site 1's import goes through and site 0's waits, then merges."""
    pg_root = Path(tempfile.mkdtemp(prefix="hub-lock-pg-"))
    url, stop = start_or_skip(pg_root)
    try:
        db = HubDB(url)
        _register(db, programme)
        month = programme.months[0]
        first = {i: path for i, revision, path in programme.files if revision == 1 and month in path.name}
        holder = HubDB(url)
        with holder.transaction():
            holder.lock(f"month:{programme.sites[0].site_id}/{month}")
            other = subprocess.run(_cli("import", str(first[1]), "--hub", str(programme.hub_dir), "--db", url),
                                   capture_output=True, text=True, timeout=60)
            assert other.returncode == 0 and other.stdout.startswith("merged "), other.stdout + other.stderr
            same = subprocess.Popen(_cli("import", str(first[0]), "--hub", str(programme.hub_dir), "--db", url),
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(3)
            assert same.poll() is None  # waiting for the month's lock
        out, _ = same.communicate(timeout=60)
        assert same.returncode == 0 and out.startswith("merged ")
        assert db.rows("SELECT count(*) AS n FROM bundles")[0]["n"] == 2
        holder.close()
        db.close()
    finally:
        stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def test_concurrent_imports_into_sqlite_lose_no_month(programme, tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    db = HubDB(url)
    _register(db, programme)
    _check_hub(db, programme, _import_concurrently(programme, url))
    assert db.size_bytes() > 0
    db.close()
    bad = subprocess.run(_cli("fhir", "--db", url, "--month", "2026-13", "--out", str(tmp_path / "x.json")),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "BAD_MONTH" in bad.stderr and "Traceback" not in bad.stderr


def test_generated_bundles_are_refused_like_real_ones(programme, tmp_path):
    """The generated bundles go through the same checks: a flipped byte is TAMPERED, an unregistered site unknown."""
    db = HubDB(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    _i, _revision, path = programme.files[0]
    with pytest.raises(merge.bundle.BundleRefused) as refused:
        merge.import_bundle(db, programme.hub_dir, path)
    assert refused.value.reason_code == "UNKNOWN_SITE"
    _register(db, programme)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (tmp_path / "bad.ctx").write_bytes(bytes(damaged))
    with pytest.raises(merge.bundle.BundleRefused) as refused:
        merge.import_bundle(db, programme.hub_dir, tmp_path / "bad.ctx")
    assert refused.value.reason_code == "TAMPERED"
    assert merge.import_bundle(db, programme.hub_dir, path)["results"] > 0
    assert os.path.getsize(path) > 1000
    db.close()

"""Web UI latency with 50,000 studies: worklist and study page p95 over real HTTP (waitress), on this box.

Fills a fresh database with synthetic index rows (patients, studies, series, analyses, results, jobs,
reviews: no pixel data is needed for these pages), starts `appliance web` on a free port, signs in,
and times each page. Targets (issue: web UI): worklist p95 <= 150 ms, study page p95 <= 300 ms.

    python bench/web_pages.py [--studies 50000] [--requests 200]
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from appliance.store import users
from appliance.store.database import open_database, refresh_all_studies, utcnow, write_transaction

TARGETS_MS = {"worklist": 150.0, "worklist, search": 150.0, "worklist, flagged only": 150.0,
              "worklist, status filter": 150.0, "worklist, page 500": 150.0, "study page": 300.0}
MODELS = [("chest-covid19", 0.6665, 0), ("abdomen-pancreas", 0.9996, 0), ("lungs-classical", None, 1)]


def _uid(*parts: int) -> str:
    return "2.25." + "".join(f"{p:08d}" for p in parts)


def fill(home: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` studies with one or two series each, results for most, a few queued/running/failed."""
    rng = random.Random(seed)
    db = open_database(home)
    now = utcnow()
    names = ["MARTIN^ANNE", "JOSEPH^PAUL", "SAMUEL^GRACE", "HENRY^LUCIA", "BROWNE^KEISHA", "WILLIAMS^DEVON"]
    patients, studies, series, analyses, results, jobs = [], [], [], [], [], []
    for i in range(n):
        study, key = _uid(1, i), f"P{i:07d}"
        patients.append((key, f"ID{i:07d}", f"{rng.choice(names)}{i}", "19600101", rng.choice("MF")))
        date = f"20{rng.randint(20, 26):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        studies.append((study, key, date, f"{rng.randint(0, 235959):06d}", "CT CHEST ABDOMEN", f"ACC{i:07d}", now, now))
        state = rng.choices(["done", "queued", "running", "failed"], [0.97, 0.01, 0.01, 0.01])[0]
        for s in range(rng.choice([1, 1, 2])):
            uid = _uid(2, i, s)
            status = "analyzed" if state == "done" else "received"
            series.append((uid, study, "CT", s + 1, "AXIAL 1.25", 300, status, now, now))
            if state == "done":
                aid = len(analyses) + 1
                analyses.append((aid, uid, study, "analyzed", "[]", 300, now, 0))
                for model, threshold, validated in MODELS:
                    score = rng.random()
                    results.append((aid, uid, model, "1.0.0", validated, "onnxruntime", "fp32", score, threshold,
                                    int(threshold is not None and score >= threshold), "[]", 1.0, now))
            jobs.append(("analyze", study, uid, state, 0, 1, now, 0.5 if state == "running" else 0.0,
                         "RuntimeError('out of memory')" if state == "failed" else None, now, now))
    with write_transaction(db):
        db.conn.executemany("INSERT INTO patients VALUES (?,?,?,?,?)", patients)
        db.conn.executemany("INSERT INTO studies (study_instance_uid, patient_key, study_date, study_time, "
                            "study_description, accession_number, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                            studies)
        db.conn.executemany("INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number, "
                            "series_description, instance_count, status, last_received_at, updated_at) "
                            "VALUES (?,?,?,?,?,?,?,?,?)", series)
        db.conn.executemany("INSERT INTO analyses (id, series_instance_uid, study_instance_uid, status, problems, "
                            "slices, created_at, superseded) VALUES (?,?,?,?,?,?,?,?)", analyses)
        db.conn.executemany("INSERT INTO results (analysis_id, series_instance_uid, model, model_version, validated, "
                            "backend, precision, score, threshold, flagged, findings, seconds, created_at) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", results)
        db.conn.executemany("INSERT INTO jobs (kind, study_instance_uid, series_instance_uid, state, priority, "
                            "attempts, not_before, progress, error, created_at, updated_at) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?)", jobs)
        refresh_all_studies(db)
    db.execute("ANALYZE")
    users.add_user(db, "bench", "bench password 1", "radiologist", actor="bench")
    db.conn.close()
    return [s[0] for s in studies]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(url: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = opener.open(url + "/login").read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    body = urllib.parse.urlencode({"username": "bench", "password": "bench password 1", "csrf_token": token})
    opener.open(url + "/login", body.encode()).read()
    return opener


def _time(opener, url: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        with opener.open(url) as response:
            response.read()
            assert response.status == 200
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[94]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        t0 = time.perf_counter()
        uids = fill(home, args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - t0:.1f} s")
        port = _free_port()
        env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_WEB_PORT": str(port),
               "APPLIANCE_LOG_LEVEL": "ERROR"}
        server = subprocess.Popen([sys.executable, "-m", "appliance.cli", "web"], env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            opener = _session(url)
            rng = random.Random(1)
            pages = {"worklist": "/", "worklist, search": "/?q=grace12", "worklist, flagged only": "/?flagged=1",
                     "worklist, status filter": "/?status=failed", "worklist, page 500": "/?page=500"}
            report = {}
            for name, path in pages.items():
                _time(opener, url + path, 5)  # warm
                report[name] = _time(opener, url + path, args.requests)
            report["study page"] = []
            for uid in rng.sample(uids, args.requests):
                report["study page"] += _time(opener, f"{url}/study/{uid}", 1)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{'page':28s} {'median ms':>10s} {'p95 ms':>8s} {'target':>7s} {'p95/target':>10s}")
    doc = {}
    for name, values in report.items():
        p95 = _p95(values)
        doc[name] = {"median_ms": round(statistics.median(values), 1), "p95_ms": round(p95, 1),
                     "target_ms": TARGETS_MS[name]}
        print(f"{name:28s} {statistics.median(values):10.1f} {p95:8.1f} {TARGETS_MS[name]:7.0f} "
              f"{p95 / TARGETS_MS[name]:10.2f}")
    print(json.dumps({"studies": args.studies, "requests": args.requests, "pages": doc}))
    return 0 if all(v["p95_ms"] <= v["target_ms"] for v in doc.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

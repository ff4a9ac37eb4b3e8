"""``appliance batch screen``: an archive of generated studies, a zipped one, a broken series and a non-DICOM
file, screened by real worker processes (and a real local Ray cluster): the results table, the summary, resuming,
a worker killed mid-run, a poison series and a series over its time budget."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from appliance import cli, config
from appliance.batch import results
from appliance.batch.screen import BatchOptions, OutNotEmpty, default_workers, screen_archive
from appliance.batch.task import FAULT_VARIABLE
from appliance.synth.writer import SynthOptions, write_series
from tests.conftest import CT

pytestmark = pytest.mark.slow

BROKEN = CT / "broken" / "duplicate-positions"
COMPARED = [c for c in results.COLUMNS if c not in (*results.TIMING_COLUMNS, "attempts")]


def _settings(root: Path) -> config.Settings:
    return config.load(environ={}, home=str(root / "appliance-home"), demonstration=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three generated studies in folders, a fourth zipped, the broken series when present, a text file."""
    root = tmp_path_factory.mktemp("archive")
    source = root / "source"
    uids = [write_series(source / f"study{seed}", SynthOptions(slices=40, size=128, seed=seed))["series_instance_uid"]
            for seed in (11, 12, 13)]
    zipped = write_series(root / "zipped", SynthOptions(slices=40, size=128, seed=14))
    with zipfile.ZipFile(source / "study14.zip", "w") as zf:
        for path in sorted((root / "zipped").iterdir()):
            zf.write(path, f"CT/{path.name}")
    uids.append(zipped["series_instance_uid"])
    (source / "notes.txt").write_text("not an image\n")
    if BROKEN.exists():
        shutil.copytree(BROKEN, source / "broken")
    return {"source": source, "uids": uids, "broken": BROKEN.exists()}


@pytest.fixture(scope="module")
def local_run(archive: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("local")
    out = root / "out"
    run = screen_archive(archive["source"], out, _settings(root), BatchOptions(workers=2))
    return {"run": run, "out": out, "root": root}


def _csv(out: Path) -> list[dict[str, str]]:
    with (out / results.CSV_NAME).open(newline="") as f:
        return list(csv.DictReader(f))


def _by_series(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(row["series_instance_uid"], []).append(row)
    return grouped


def test_every_series_has_rows_and_the_broken_one_is_rejected(archive, local_run):
    rows = _csv(local_run["out"])
    series = _by_series(rows)
    assert set(archive["uids"]) <= set(series)  # the zipped study included
    for uid in archive["uids"]:
        assert all(r["status"] == "analyzed" and r["model"] for r in series[uid]), series[uid]
        assert len({r["model"] for r in series[uid]}) == len(series[uid])  # one row per series and model
        assert all(r["score"] != "" and r["flagged"] in ("True", "False") for r in series[uid])
    assert series[archive["uids"][3]][0]["source"].endswith("study14.zip")
    if archive["broken"]:
        broken = [rs for uid, rs in series.items() if uid not in archive["uids"]]
        assert len(broken) == 1 and len(broken[0]) == 1
        assert broken[0][0]["status"] == "rejected" and broken[0][0]["reason_code"] == "DUPLICATE_POSITIONS"
        assert broken[0][0]["model"] == ""
    run = local_run["run"]
    assert run["series"] == len(series) == run["screened"] and run["skipped"] == 0
    assert run["rows"] == len(rows)


def test_parquet_holds_the_same_rows(local_run):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs appliance[scale] (pyarrow)")
    table = pq.read_table(local_run["out"] / results.PARQUET_NAME).to_pylist()
    rows = _csv(local_run["out"])
    assert len(table) == len(rows)
    for got, want in zip(table, rows):
        assert (got["series_instance_uid"], got["model"], got["status"]) == (
            want["series_instance_uid"], want["model"], want["status"])
        assert got["score"] == (float(want["score"]) if want["score"] else None)


def test_refused_files_and_the_summary(archive, local_run):
    out = local_run["out"]
    refused = json.loads((out / results.REFUSED_NAME).read_text())
    assert any(r["file"].endswith("notes.txt") and r["reason_code"] == "NOT_DICOM" for r in refused)
    page = (out / results.SUMMARY_NAME).read_text()
    counts = local_run["run"]["counts"]
    assert counts["status"]["analyzed"] == 4
    assert f"<td>analyzed</td><td>{counts['status']['analyzed']}</td>" in page
    assert "series/min" in page and "notes.txt" in page
    if archive["broken"]:
        assert "<td>DUPLICATE_POSITIONS</td><td>1</td>" in page


def test_resume_skips_what_was_screened_and_a_second_run_needs_resume(archive, local_run):
    out, root = local_run["out"], local_run["root"]
    with pytest.raises(OutNotEmpty, match="OUT_NOT_EMPTY"):
        screen_archive(archive["source"], out, _settings(root), BatchOptions(workers=2))
    before = {p.name: p.stat().st_mtime_ns for p in (out / results.RECORDS).iterdir()}
    table = _csv(out)
    run = screen_archive(archive["source"], out, _settings(root), BatchOptions(workers=2, resume=True))
    assert run["screened"] == 0 and run["skipped"] == local_run["run"]["series"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / results.RECORDS).iterdir()} == before  # nothing ran
    assert _csv(out) == table


def test_a_killed_worker_loses_no_series(archive, tmp_path, monkeypatch):
    victim = archive["uids"][1]
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(FAULT_VARIABLE, f"{victim}:{marker}")
    source = _one_series(archive, tmp_path)
    shutil.copytree(archive["source"] / "study12", source / "study12")
    run = screen_archive(source, tmp_path / "out", _settings(tmp_path), BatchOptions(workers=2))
    assert marker.exists()  # a worker process really died on it
    rows = _by_series(_csv(tmp_path / "out"))
    assert set(rows) == set(archive["uids"][:2]) and run["screened"] == run["series"] == 2
    assert all(r["status"] == "analyzed" and r["attempts"] == "2" for r in rows[victim])
    assert all(r["attempts"] == "1" for uid, rs in rows.items() if uid != victim for r in rs)


def _one_series(archive: dict[str, Any], root: Path) -> Path:
    source = root / "one"
    shutil.copytree(archive["source"] / "study11", source / "study11")
    return source


def test_a_poison_series_ends_with_its_reason_after_bounded_retries(archive, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, f"{archive['uids'][0]}:always")
    run = screen_archive(_one_series(archive, tmp_path), tmp_path / "out", _settings(tmp_path),
                         BatchOptions(workers=1, retries=1))
    (row,) = _csv(tmp_path / "out")
    assert (row["status"], row["reason_code"], row["attempts"]) == ("failed", "WORKER_CRASHED", "2")
    assert run["counts"]["reason_code"] == {"WORKER_CRASHED": 1}


def test_a_series_over_its_time_budget_is_stopped(archive, tmp_path):
    screen_archive(_one_series(archive, tmp_path), tmp_path / "out", _settings(tmp_path),
                   BatchOptions(workers=1, series_timeout=0.2))
    (row,) = _csv(tmp_path / "out")
    assert (row["status"], row["reason_code"]) == ("failed", "TIME_BUDGET_EXCEEDED")


def test_the_summary_escapes_what_it_shows(tmp_path):
    row = dict.fromkeys(results.COLUMNS) | {"series_instance_uid": "1.2.3", "status": "failed",
                                            "reason_code": "ANALYSIS_FAILED", "reason": "<script>x</script>"}
    refused = [{"file": "<img src=x onerror=alert(1)>.dcm", "reason_code": "NOT_DICOM", "reason": "a & b"}]
    path = tmp_path / "summary.html"
    results.write_summary(path, [row], refused, {"source": "/archive/<b>", "runner": "2 local worker process(es)"})
    page = path.read_text()
    assert "<script>" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "a &amp; b" in page and "/archive/&lt;b&gt;" in page


def test_without_pyarrow_no_parquet_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where appliance[scale] is not installed
    assert not results.parquet_available()
    assert results.write_parquet(tmp_path / results.PARQUET_NAME, []) is False
    assert not (tmp_path / results.PARQUET_NAME).exists()


def test_an_unreachable_ray_cluster_is_a_reason_not_a_hang(archive, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ct-screening-appliance[scale]')")
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    started = time.monotonic()
    assert cli.main(["batch", "screen", str(_one_series(archive, tmp_path)), "--out", str(tmp_path / "out"),
                     "--ray", f"127.0.0.1:{_free_port()}"]) == 1
    assert "RAY_UNAVAILABLE" in capsys.readouterr().err and time.monotonic() - started < 60


def test_workers_are_sized_from_free_memory():
    assert default_workers(free_bytes=100 * 1024**3, cpus=4) == 4
    assert default_workers(free_bytes=3 * 1024**3 + 1, cpus=16) == 2
    assert default_workers(free_bytes=10 * 1024**2, cpus=16) == 1


def test_the_command_line(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    source = _one_series(archive, tmp_path)
    (source / "readme.txt").write_text("x")
    assert cli.main(["batch", "screen", str(source), "--out", str(tmp_path / "out"), "--workers", "1",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["series"] == 1 and doc["counts"]["status"] == {"analyzed": 1} and doc["refused_files"] == 2
    assert cli.main(["batch", "screen", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert cli.main(["batch", "screen", str(source), "--out", str(tmp_path / "out")]) == 1  # not --resume
    assert "OUT_NOT_EMPTY" in capsys.readouterr().err


# --- a local Ray cluster: a head node and a second node, on loopback ------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_node(args: list[str], temp: Path) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([str(ray), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--disable-usage-stats", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=(temp / f"ray-{len(args)}.log").open("wb"))


def _stop(node: subprocess.Popen[bytes]) -> None:
    """Stop a node and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ct-screening-appliance[scale]')")
    temp = Path("/tmp") / f"ray-{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _ray_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                     tmp_path_factory.mktemp("ray"))
    second = None
    try:
        time.sleep(5)
        second = _ray_node([f"--address={address}"], tmp_path_factory.mktemp("ray2"))
        deadline = time.monotonic() + 90
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert ray.cluster_resources().get("CPU", 0) >= 2, "the second Ray node did not join"
        yield address
    finally:
        ray.shutdown()
        for node in (second, head):
            if node is not None:
                _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_rows_equal_the_local_pool(archive, local_run, ray_cluster, tmp_path):
    run = screen_archive(archive["source"], tmp_path / "out", _settings(tmp_path), BatchOptions(ray=ray_cluster))
    assert run["runner"].startswith("Ray cluster")
    got, want = _csv(tmp_path / "out"), _csv(local_run["out"])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {c: g[c] for c in COMPARED} == {c: w[c] for c in COMPARED}
    workers = {r["worker"] for r in got}
    assert workers  # where each series ran, for the record


def test_ray_loses_no_series_when_a_worker_dies(archive, ray_cluster, tmp_path, monkeypatch):
    victim = archive["uids"][2]
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(FAULT_VARIABLE, f"{victim}:{marker}")
    run = screen_archive(archive["source"], tmp_path / "out", _settings(tmp_path), BatchOptions(ray=ray_cluster))
    assert marker.exists()
    rows = _by_series(_csv(tmp_path / "out"))
    assert run["screened"] == run["series"] and set(archive["uids"]) <= set(rows)
    assert all(r["status"] == "analyzed" for r in rows[victim])

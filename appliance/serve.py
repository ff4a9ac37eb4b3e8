"""``appliance serve``: the supervisor that runs the receiver, the worker, the drop folder and the web UI together.

Nothing here analyses: the drop folder and the first-start sample store and queue, like every other
way in, and the worker's job runner analyses and publishes. One process, one registry, one writer lock.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from appliance.config import LiveSettings, Settings
from appliance.errors import DiskLow
from appliance.ingest import dicom_server
from appliance.jobs.intake import import_and_queue
from appliance.jobs.notify import sd_notify
from appliance.jobs.worker import Worker
from appliance.store.datadir import DataDirectory
from appliance.store.instances import InstanceStore, open_store

log = logging.getLogger(__name__)

SAMPLE = "synthetic-chest"
DISK_LOW_RETRY_SECONDS = 60.0  # a drop waiting for disk space is tried again this often


def ensure_sample(settings: Settings) -> Path:
    """The bundled synthetic sample study (a phantom, not a patient), written once into the data directory."""
    from appliance.synth.writer import SynthOptions, write_series

    sample = DataDirectory(settings.home_path).samples / SAMPLE
    if not (sample / "ground_truth.json").exists():
        write_series(sample, SynthOptions(slices=120, size=512, region="chest", seed=7))
    return sample


def queue_sample(settings: Settings, store: InstanceStore | None = None) -> int:
    """Store the sample study and queue it, like any import; returns how many series were queued."""
    store = store or open_store(settings)
    intake = import_and_queue(store, sorted(ensure_sample(settings).glob("*.dcm")), settings, source="sample",
                              priority=0)
    return len(intake.job_ids)


def drain_incoming(store: InstanceStore, settings: Settings, entries: list[Path]) -> bool:
    """Store and queue what was dropped in, then empty the drop. An unexpected failure keeps the files
    in ``incoming-failed/`` for the admin instead of retrying them forever; below the low-disk watermark
    they stay in the drop folder, to be imported once space is freed (returns False then)."""
    try:
        intake = import_and_queue(store, entries, settings, source="incoming")
    except DiskLow as exc:
        print(f"error: {exc} The dropped files stay in {DataDirectory(settings.home_path).incoming}.", flush=True)
        return False
    except Exception as exc:
        log.exception("import of the incoming folder failed")
        kept = DataDirectory(settings.home_path).incoming_failed
        kept.mkdir(exist_ok=True)
        for entry in entries:
            shutil.move(str(entry), kept / entry.name)
        print(f"error: IMPORT_FAILED: {exc}; the files were moved to {kept}", flush=True)
        return True
    s = intake.summary
    print(f"Imported {s.stored} new image(s), {s.duplicates} already stored, {len(s.quarantined)} quarantined; "
          f"{len(intake.job_ids)} series queued for analysis.", flush=True)
    for q in s.quarantined[:20]:
        print(f"  quarantined {q['file']}: {q['reason_code']} - {q['reason']}", flush=True)
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return True


def poll_incoming(store: InstanceStore, settings: Settings, stop: threading.Event, poll_seconds: float = 2.0) -> None:
    """Store and queue what appears in the drop folder until ``stop`` is set (less often while the disk is low)."""
    incoming = DataDirectory(settings.home_path).incoming
    while not stop.is_set():
        entries = sorted(incoming.iterdir())
        imported = drain_incoming(store, settings, entries) if entries else True
        stop.wait(poll_seconds if imported else DISK_LOW_RETRY_SECONDS)


def _receiver_started(settings: Settings, problem: OSError | None) -> None:
    if problem is not None:
        print(f"error: DICOM_PORT_UNAVAILABLE: cannot listen on port {settings.dicom_port} ({problem}); "
              "studies can still be dropped into the incoming folder", flush=True)
        return
    print(f"DICOM receiver {settings.dicom_ae_title} on port {settings.dicom_port} "
          f"(allowed callers: {settings.dicom_allowed_callers})", flush=True)


def _receiver_thread(live: LiveSettings, stop: threading.Event, poll_seconds: float) -> threading.Thread:
    """The receiver, restarted in this process when its settings change in the site's file."""
    return threading.Thread(target=dicom_server.serve_receiver, args=(live, stop),
                            kwargs={"poll_seconds": poll_seconds, "started": _receiver_started},
                            name="dicom-supervisor", daemon=True)


def _first_start(store: InstanceStore, settings: Settings) -> bool:
    return bool(settings.first_start_sample) and not store.db.execute("SELECT 1 FROM studies LIMIT 1").fetchone()


def serve_once(settings: Settings) -> None:
    """Store and queue the drop folder (and, on a first start, the sample), run every job, send the outbox."""
    store = open_store(settings)
    incoming = DataDirectory(settings.home_path).incoming
    incoming.mkdir(parents=True, exist_ok=True)
    if _first_start(store, settings):
        print("First start: the synthetic sample study is queued for analysis.", flush=True)
        queue_sample(settings, store)
    entries = sorted(incoming.iterdir())
    if entries:
        drain_incoming(store, settings, entries)
    worker = Worker(settings)
    try:
        while worker.run_once():
            pass
        worker.runner.forward()
    finally:
        worker.runner.close()


def serve(settings: Settings, poll_seconds: float = 2.0) -> None:
    """Run the receiver, the worker, the drop folder and the web UI until interrupted.

    Settings saved in the site's file apply at once: the web UI reads them at each request, the worker at
    each loop and the receiver restarts itself when one of its own changes; only those of
    :data:`config.FIXED_WHILE_RUNNING` wait for the next start.
    """
    live = LiveSettings.following(settings)
    store = open_store(settings)
    incoming = DataDirectory(settings.home_path).incoming
    incoming.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    threads = []
    if _first_start(store, settings):
        print("First start: the synthetic sample study is queued for analysis.", flush=True)
        threads.append(threading.Thread(target=queue_sample, args=(settings,), name="sample", daemon=True))
    worker = Worker(settings, live)
    threads.append(_receiver_thread(live, stop, poll_seconds))
    threads.append(threading.Thread(target=worker.run, args=(stop,), name="worker", daemon=True))
    threads.append(threading.Thread(target=poll_incoming, args=(store, settings, stop, poll_seconds),
                                    name="incoming", daemon=True))
    for thread in threads:
        thread.start()
    print(f"Drop DICOM files, folders or zip archives into {incoming}.", flush=True)
    try:
        run_web(settings)
    except KeyboardInterrupt:
        print("stopped")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def run_web(settings: Settings) -> None:
    """Serve the web UI with waitress in this thread until interrupted."""
    from waitress.server import create_server

    from appliance.web import bind_address, create_app

    host, why = bind_address(settings)
    if why:
        print(f"note: {why}")
    server = create_server(create_app(settings), host=host, port=settings.web_port, threads=settings.web_threads,
                           ident="appliance")
    shown = f"[{host}]" if ":" in host else host
    print(f"Web UI on http://{shown}:{settings.web_port}/  (Ctrl-C stops the appliance)", flush=True)
    sd_notify("READY=1")
    try:
        server.run()
    finally:
        server.close()

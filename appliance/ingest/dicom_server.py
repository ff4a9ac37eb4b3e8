"""The DICOM receiver: C-ECHO and C-STORE of CT images into the instance store.

The received bytes are stored as sent (pynetdicom's encoded dataset behind a
new file meta header), never decoded or re-encoded; success is answered only
after the file is fsynced and its row committed. Under the disk's low
watermark, or when the disk fills while writing, the answer is Out of
Resources; a file that cannot be accepted gets a Cannot Understand status with
its reason.

Who may connect, for how long and with PDUs how long is checked in front of
pynetdicom (:mod:`appliance.ingest.dicom_guard`): callers not on the
allow-list get an association reject, and every refusal is counted into a few
audit rows per caller and minute (:class:`RefusalAudit`).
"""

from __future__ import annotations

import errno
import io
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable

import sqlite_utils
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from appliance.config import RECEIVER_SETTINGS, LiveSettings, Settings
from appliance.errors import DiskLow, InstanceRejected
from appliance.ingest.dicom_guard import (
    WAITING_PER_ASSOCIATION,
    ConnectionLimits,
    Guard,
    GuardedRequestHandler,
    GuardedServer,
    RefusalLedger,
    RefusalRow,
    parse_allowed_callers,
)
from appliance.store.database import audit, open_database, write_transaction
from appliance.store.instances import InstanceStore, open_store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SQLITE_FULL = getattr(sqlite3, "SQLITE_FULL", 13)  # "database or disk is full"

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
STORAGE_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
# what the loader decodes; never Deflated (a zip bomb on the wire) nor big endian
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEG2000, JPEGLosslessSV1,
                     JPEGLossless, JPEGLSLossless, RLELossless)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Receiver:
    """pynetdicom event handlers over the instance store; one store (and database connection) per thread."""

    def __init__(self, settings: Settings, live: LiveSettings | None = None):
        self._settings = settings
        self.live = live
        self._local = threading.local()

    @property
    def settings(self) -> Settings:
        """The settings in force (the low-disk watermark follows the site's file as it changes)."""
        return self.live.current() if self.live is not None else self._settings

    def _store(self) -> InstanceStore:
        if not hasattr(self._local, "store"):
            self._local.store = open_store(self.settings)
        return self._local.store

    def handle_echo(self, event) -> int:
        return SUCCESS

    def handle_store(self, event) -> int | Dataset:
        """Store the instance durably, then answer; Out of Resources under the low watermark or on a full disk."""
        home = self.settings.home_path
        free_mb = shutil.disk_usage(home).free / 2**20
        if free_mb < self.settings.disk_low_watermark_mb:
            log.error("refusing C-STORE: %.0f MiB free, below the %d MiB watermark", free_mb,
                      self.settings.disk_low_watermark_mb)
            return _status(OUT_OF_RESOURCES, "Disk full on the receiving appliance")
        caller = f"{event.assoc.requestor.ae_title.strip()}@{event.assoc.requestor.address}"
        try:
            data = event.encoded_dataset(include_meta=True)
            self._store().accept(io.BytesIO(data), source=f"dicom:{caller}",
                                 original_name=str(event.request.AffectedSOPInstanceUID))
        except DiskLow as exc:  # the disk filled while this image was written
            log.error("refusing C-STORE from %s: %s", caller, exc.reason)
            return _status(OUT_OF_RESOURCES, "Disk full on the receiving appliance")
        except InstanceRejected as exc:
            log.warning("C-STORE from %s refused: %s", caller, exc)
            return _status(CANNOT_UNDERSTAND, f"{exc.reason_code.value}: {exc.reason}")
        except (OSError, sqlite3.Error) as exc:
            if not is_out_of_space(exc):
                raise
            log.error("refusing C-STORE from %s: the disk is full (%s)", caller, exc)
            return _status(OUT_OF_RESOURCES, "Disk full on the receiving appliance")
        return SUCCESS


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the data owner's quota) is full: a write's ENOSPC or SQLite's."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


class RefusalAudit:
    """Writes a :class:`RefusalLedger`'s rows to the audit log, and their log lines, from its own thread.

    A flood of refusals costs a counter increment each; the database and the log see at most two
    rows per caller, reason and minute. ``stop()`` writes what is still counted.
    """

    def __init__(self, settings: Settings, ledger: RefusalLedger):
        self.home = settings.home_path
        self.object = settings.dicom_ae_title
        self.ledger = ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-refusal-audit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.ledger.wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            db = open_database(self.home)
        except (OSError, sqlite3.Error):  # the receiver still refuses callers; only the audit rows are lost
            log.exception("cannot open the database: refusals will not be audited")
            return
        try:
            while True:
                stopping = self._stop.is_set()
                self.ledger.wake.clear()
                self._write(db, self.ledger.due(final=stopping))
                if stopping:
                    return
                self.ledger.wake.wait(self.ledger.seconds_left())
        finally:
            db.conn.close()

    def _write(self, db: sqlite_utils.Database, rows: list[RefusalRow]) -> None:
        if not rows:
            return
        window = int(self.ledger.window_s)
        for row in rows:
            if row.first:
                log.warning("refused %s: %s (%s)", row.caller, row.refusal.value, row.action)
            else:
                log.warning("refused %s %d more times in the last %d s: %s (%s)", row.caller, row.count, window,
                            row.refusal.value, row.action)
        try:
            with write_transaction(db):
                for row in rows:
                    audit(db, row.caller, row.action, self.object, count=row.count, reason=row.refusal.name,
                          why=row.refusal.value, window_s=window)
        except (OSError, sqlite3.Error):
            log.exception("could not write %d refusal rows to the audit log", len(rows))


def make_ae(settings: Settings):
    """The Application Entity with our SOP classes, transfer syntaxes, limits and timeouts."""
    # pynetdicom generates its SOP class names at import, so its types cannot list them
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=settings.dicom_ae_title)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.maximum_associations = settings.dicom_max_associations
    ae.acse_timeout = settings.dicom_acse_timeout
    ae.dimse_timeout = settings.dicom_dimse_timeout
    ae.network_timeout = settings.dicom_network_timeout
    ae.maximum_pdu_size = settings.dicom_max_pdu
    ae.require_called_aet = True
    return ae


def make_guard(settings: Settings, refusals: RefusalLedger) -> Guard:
    """The allow-list, connection limits, first-PDU timeout and PDU limit of ``settings``."""
    limits = ConnectionLimits(per_address=settings.dicom_max_associations_per_address,
                              waiting=WAITING_PER_ASSOCIATION * settings.dicom_max_associations)
    return Guard(callers=parse_allowed_callers(settings.dicom_allowed_callers), limits=limits,
                 first_pdu_timeout=settings.dicom_first_pdu_timeout, max_pdu=settings.dicom_max_pdu,
                 refusals=refusals)


def start(settings: Settings, *, block: bool = False, port: int | None = None,
          address: str | None = None, live: LiveSettings | None = None) -> Callable[[], None] | None:
    """Start the receiver; returns a function that stops it (when not blocking).

    Blocking, it serves until interrupted (KeyboardInterrupt is raised on to the caller), restarting
    itself in this process whenever a setting of :data:`config.RECEIVER_SETTINGS` changes in the site's
    file (:func:`serve_receiver`).
    """
    if block:
        stop = threading.Event()
        try:
            serve_receiver(live or LiveSettings.following(settings), stop, port=port, address=address)
        finally:
            stop.set()
        return None
    return _start(settings, port=port, address=address, live=live)


def _start(settings: Settings, *, port: int | None, address: str | None,
           live: LiveSettings | None) -> Callable[[], None]:
    from pynetdicom import evt

    receiver = Receiver(settings, live)
    ae = make_ae(settings)
    handlers = [(evt.EVT_C_ECHO, receiver.handle_echo), (evt.EVT_C_STORE, receiver.handle_store)]
    where = (address or settings.dicom_bind_address, port or settings.dicom_port)
    refusal_audit = RefusalAudit(settings, RefusalLedger())
    server = ae.make_server(where, evt_handlers=handlers, server_class=GuardedServer,
                            request_handler=GuardedRequestHandler, guard=make_guard(settings, refusal_audit.ledger))
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown() and server.shutdown() expect it there
    refusal_audit.start()
    log.info("DICOM receiver %s listening on %s:%d", settings.dicom_ae_title, *where)
    threading.Thread(target=server.serve_forever, name="dicom-receiver", daemon=True).start()

    def stop() -> None:
        server.shutdown()  # closes the socket too
        refusal_audit.stop()

    return stop


def receiver_changed(before: Settings, after: Settings) -> list[str]:
    """The receiver's settings (AE title, port, address, callers, limits, timeouts) that differ."""
    return [name for name in RECEIVER_SETTINGS if getattr(before, name) != getattr(after, name)]


def serve_receiver(live: LiveSettings, stop: threading.Event, *, poll_seconds: float = 2.0,
                   port: int | None = None, address: str | None = None,
                   started: Callable[[Settings, OSError | None], None] | None = None) -> None:
    """Run the receiver until ``stop`` is set; when a receiver setting changes in the site's file, stop it
    and start it again with the new ones (associations in progress finish first). A port that cannot be
    opened is reported through ``started`` (or raised, on the first start without one) and tried again
    at the next change."""
    settings = live.current()
    stop_receiver = _try_start(settings, port, address, live, started, first=True)
    try:
        while not stop.wait(poll_seconds):
            fresh = live.current()
            changed = receiver_changed(settings, fresh)
            if not changed:
                continue
            log.warning("DICOM settings changed (%s): restarting the receiver", ", ".join(changed))
            if stop_receiver is not None:
                stop_receiver()
            settings = fresh
            stop_receiver = _try_start(fresh, port, address, live, started, first=False)
    finally:
        if stop_receiver is not None:
            stop_receiver()


def _try_start(settings: Settings, port: int | None, address: str | None, live: LiveSettings,
               started: Callable[[Settings, OSError | None], None] | None, first: bool) -> Callable[[], None] | None:
    try:
        stop_receiver = _start(settings, port=port, address=address, live=live)
    except OSError as exc:
        if started is None and first:
            raise
        if started is not None:
            started(settings, exc)
        else:
            log.error("DICOM_PORT_UNAVAILABLE: cannot listen on port %d (%s)", port or settings.dicom_port, exc)
        return None
    if started is not None:
        started(settings, None)
    return stop_receiver

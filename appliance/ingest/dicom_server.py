"""The DICOM receiver: C-ECHO and C-STORE of CT images into the instance store.

The received bytes are stored as sent (pynetdicom's encoded dataset behind a
new file meta header), never decoded or re-encoded; success is answered only
after the file is fsynced and its row committed. Callers not on the
allow-list get an association reject and an audit entry; under the disk's low
watermark the answer is Out of Resources before anything is written; a file
that cannot be accepted gets a Cannot Understand status with its reason.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import threading
from collections.abc import Callable

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

from appliance.config import Settings
from appliance.errors import InstanceRejected
from appliance.store.database import audit, write_transaction
from appliance.store.instances import InstanceStore, open_store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised
REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
STORAGE_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
# what the loader decodes; never Deflated (a zip bomb on the wire) nor big endian
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEG2000, JPEGLosslessSV1,
                     JPEGLossless, JPEGLSLossless, RLELossless)


@dataclasses.dataclass(frozen=True)
class Caller:
    """One allow-list entry: an AE title and an address, either may be ``*``."""

    ae_title: str
    address: str

    def admits(self, ae_title: str, address: str) -> bool:
        return self.ae_title in ("*", ae_title.strip()) and self.address in ("*", address)


def parse_allowed_callers(text: str) -> tuple[Caller, ...]:
    """``"CT1@10.0.0.5, *@127.0.0.1"`` -> callers; an entry without ``@`` means that AE from anywhere."""
    callers = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        ae, _, address = entry.rpartition("@") if "@" in entry else (entry, "", "*")
        callers.append(Caller(ae.strip() or "*", address.strip() or "*"))
    return tuple(callers)


def is_allowed(callers: tuple[Caller, ...], ae_title: str, address: str) -> bool:
    return any(c.admits(ae_title, address) for c in callers)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Receiver:
    """pynetdicom event handlers over the instance store; one store (and database connection) per thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.callers = parse_allowed_callers(settings.dicom_allowed_callers)
        self._local = threading.local()

    def _store(self) -> InstanceStore:
        if not hasattr(self._local, "store"):
            self._local.store = open_store(self.settings)
        return self._local.store

    def handle_requested(self, event) -> None:
        """Refuse callers not on the allow-list with an association reject, and audit it."""
        ae_title = event.assoc.requestor.primitive.calling_ae_title.strip()
        address = event.assoc.requestor.address
        if is_allowed(self.callers, ae_title, address):
            return
        log.warning("refused association from %s@%s: not on the allow-list", ae_title, address)
        db = self._store().db
        with write_transaction(db):
            audit(db, f"{ae_title}@{address}", "dicom_association_refused", self.settings.dicom_ae_title)
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)

    def handle_echo(self, event) -> int:
        return SUCCESS

    def handle_store(self, event) -> int | Dataset:
        """Store the instance durably, then answer; Out of Resources under the low watermark."""
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
        except InstanceRejected as exc:
            log.warning("C-STORE from %s refused: %s", caller, exc)
            return _status(CANNOT_UNDERSTAND, f"{exc.reason_code.value}: {exc.reason}")
        return SUCCESS


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


def start(settings: Settings, *, block: bool = False, port: int | None = None,
          address: str | None = None) -> Callable[[], None] | None:
    """Start the receiver; returns a function that stops it (when not blocking)."""
    from pynetdicom import evt

    receiver = Receiver(settings)
    ae = make_ae(settings)
    handlers = [(evt.EVT_REQUESTED, receiver.handle_requested), (evt.EVT_C_ECHO, receiver.handle_echo),
                (evt.EVT_C_STORE, receiver.handle_store)]
    where = (address or settings.dicom_bind_address, port or settings.dicom_port)
    log.info("DICOM receiver %s listening on %s:%d", settings.dicom_ae_title, *where)
    server = ae.start_server(where, block=block, evt_handlers=handlers)
    if block:
        return None
    return server.shutdown

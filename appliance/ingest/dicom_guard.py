"""The DICOM receiver's front door: who may connect, for how long, and with PDUs how long.

pynetdicom, left alone, gives every TCP connection an association thread that waits
``dicom_acse_timeout`` for an A-ASSOCIATE-RQ while counting against ``dicom_max_associations``,
checks the allow-list only after that request, and reads every PDU whole, whatever length its
header claims. In front of it, in order:

1. at accept, before any thread (:meth:`GuardedServer.verify_request`): an address that no
   allow-list entry can admit is closed, and so is one more connection from an address that
   already holds ``dicom_max_associations_per_address``, or beyond the connections allowed to
   wait for their first PDU (``WAITING_PER_ASSOCIATION`` per association);
2. in the connection's thread (:class:`GuardedRequestHandler`): the whole A-ASSOCIATE-RQ (at most
   ``MAX_CONTROL_PDU``) must arrive within ``dicom_first_pdu_timeout``. It is peeked, not read, so
   pynetdicom still reads it; its calling AE title and the address are checked against the
   allow-list here, and a refused caller gets its A-ASSOCIATE-RJ before pynetdicom makes an
   association of it;
3. for the association's life (:class:`PDULimitSocket`, the socket pynetdicom reads): each PDU
   header is checked before its body is read; a P-DATA-TF longer than the ``dicom_max_pdu`` we
   advertised, or any other PDU over ``MAX_CONTROL_PDU``, ends the association with an A-ABORT.

Each refusal is counted in a :class:`RefusalLedger`, which the receiver writes to the audit log as
at most two rows per caller, reason and minute, so a flood of refusals cannot flood the log.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

# PDU types, PS3.8 section 9.3
PDU_TYPES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
A_ASSOCIATE_RQ_TYPE, P_DATA_TF_TYPE = 0x01, 0x04
PDU_HEADER = struct.Struct(">BxI")  # PDU-type, reserved, PDU-length (of what follows the header)
MAX_CONTROL_PDU = 64 * 1024  # every PDU but P-DATA-TF: A-ASSOCIATE-RQ/AC are a few KiB, the others 4 bytes
# peers differ on whether the Maximum Length Received counts the PDV item headers: allow a few of them
P_DATA_SLACK = 1024
WAITING_PER_ASSOCIATION = 4  # connections that may wait for their first PDU, per allowed association
PEEK_POLL_SECONDS = 0.01  # how often a partly arrived A-ASSOCIATE-RQ is looked at again

# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised
REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
# A-ABORT: from the service provider, invalid PDU parameter value
SERVICE_PROVIDER, INVALID_PDU_PARAMETER_VALUE = 0x02, 0x06

CONNECTION_REFUSED = "dicom_connection_refused"
ASSOCIATION_REFUSED = "dicom_association_refused"
ASSOCIATION_ABORTED = "dicom_association_aborted"


class Refusal(enum.Enum):
    """Why a connection or an association was refused: the code goes to the audit log with its sentence."""

    ADDRESS_NOT_ALLOWED = "No allow-list entry admits this address."
    TOO_MANY_FROM_ADDRESS = "This address already holds as many connections as one address may."
    TOO_MANY_WAITING = "Too many connections were already waiting to send their association request."
    NO_ASSOCIATION_REQUEST = "No complete A-ASSOCIATE-RQ arrived within the first-PDU timeout."
    NOT_AN_ASSOCIATION_REQUEST = "The first PDU was not a well-formed A-ASSOCIATE-RQ."
    CALLER_NOT_ALLOWED = "The calling AE title is not on the allow-list for this address."
    PDU_TOO_LONG = "A PDU claimed more bytes than this receiver accepts."
    UNKNOWN_PDU = "A PDU of no known type arrived."


# --- the allow-list ------------------------------------------------------------------------------------------

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
    """Whether an entry admits ``ae_title`` calling from ``address``."""
    return any(c.admits(ae_title, address) for c in callers)


def may_connect(callers: tuple[Caller, ...], address: str) -> bool:
    """Whether some entry could admit a caller from ``address`` (any AE title): checked at accept."""
    return any(c.address in ("*", address) for c in callers)


# --- PDU headers ---------------------------------------------------------------------------------------------

def p_data_limit(max_pdu: int) -> int | None:
    """Longest P-DATA-TF (its PDU-length field, bytes) accepted when we advertise ``max_pdu``; 0: no limit."""
    return max_pdu + P_DATA_SLACK if max_pdu > 0 else None


def check_pdu_header(pdu_type: int, length: int, max_p_data: int | None) -> Refusal | None:
    """Why a PDU with this header is refused before its body is read, or None."""
    if pdu_type not in PDU_TYPES:
        return Refusal.UNKNOWN_PDU
    limit = max_p_data if pdu_type == P_DATA_TF_TYPE else MAX_CONTROL_PDU
    if limit is not None and length > limit:
        return Refusal.PDU_TOO_LONG
    return None


class PDUStream:
    """Follows PDU boundaries in the bytes read from a connection and checks each header as it completes."""

    def __init__(self, max_p_data: int | None):
        self.max_p_data = max_p_data
        self._header = bytearray()
        self._body_left = 0

    def feed(self, data: bytes) -> Refusal | None:
        """Account for ``data``, just read; returns why a PDU whose header it completes is refused, or None."""
        view = memoryview(data)
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                view = view[taken:]
                continue
            missing = PDU_HEADER.size - len(self._header)
            self._header += view[:missing]
            view = view[missing:]
            if len(self._header) == PDU_HEADER.size:
                pdu_type, length = PDU_HEADER.unpack(self._header)
                self._header.clear()
                refusal = check_pdu_header(pdu_type, length, self.max_p_data)
                if refusal:
                    return refusal
                self._body_left = length
        return None


def abort_pdu() -> bytes:
    """An A-ABORT from the service provider: invalid PDU parameter value."""
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = SERVICE_PROVIDER, INVALID_PDU_PARAMETER_VALUE
    return pdu.encode()


def reject_pdu() -> bytes:
    """An A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised."""
    pdu = A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED
    return pdu.encode()


class PDULimitSocket(socket.socket):
    """The connected socket pynetdicom reads an association from, refusing PDUs longer than we accept.

    pynetdicom's ``AssociationSocket.recv`` reads a PDU's 6-byte header, then as many bytes as it
    claims; here every byte read passes :class:`PDUStream`, so a header over the limits ends the
    association (A-ABORT, then the connection is shut) before one byte of its body is read.
    """

    def __init__(self, connected: socket.socket, max_p_data: int | None, refused: Callable[[Refusal], None]):
        super().__init__(connected.family, connected.type, connected.proto, fileno=connected.detach())
        self._stream = PDUStream(max_p_data)
        self._refused = refused

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if flags & socket.MSG_PEEK:
            return data
        refusal = self._stream.feed(data)
        if refusal:
            self._refused(refusal)
            with contextlib.suppress(OSError):
                self.sendall(abort_pdu())
                self.shutdown(socket.SHUT_RDWR)
            # pynetdicom takes an OSError from recv for a closed transport (Evt17) and ends the association
            raise ConnectionAbortedError(refusal.value)
        return data


# --- the first PDU -------------------------------------------------------------------------------------------

class Refused(Exception):
    """A connection refused by the guard; never leaves this module."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.value)
        self.refusal = refusal


def peek_association_request(sock: socket.socket, timeout: float) -> bytes | None:
    """The whole first PDU of ``sock``, an A-ASSOCIATE-RQ, left unread for pynetdicom; None if the peer left.

    Waits at most ``timeout`` seconds for all of it; raises :class:`Refused` when it does not come in
    time, is not an A-ASSOCIATE-RQ or claims more than ``MAX_CONTROL_PDU``.
    """
    deadline = time.monotonic() + timeout
    length: int | None = None  # what the header claims, once it is in
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused(Refusal.NO_ASSOCIATION_REQUEST)
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        wanted = PDU_HEADER.size + (length or 0)
        data = sock.recv(wanted, socket.MSG_PEEK)
        if not data:
            return None
        if len(data) < wanted:
            time.sleep(PEEK_POLL_SECONDS)  # part of it is here, and select would not wait for the rest
            continue
        if length is not None:
            return data
        pdu_type, length = PDU_HEADER.unpack(data)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise Refused(Refusal.NOT_AN_ASSOCIATION_REQUEST)
        if length > MAX_CONTROL_PDU:
            raise Refused(Refusal.PDU_TOO_LONG)


def calling_ae_title(request: bytes) -> str:
    """The calling AE title of an encoded A-ASSOCIATE-RQ, decoded by pynetdicom; Refused if malformed."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(request)
    except Exception as exc:  # pynetdicom raises whatever its decoder meets
        raise Refused(Refusal.NOT_AN_ASSOCIATION_REQUEST) from exc
    return str(pdu.calling_ae_title).strip()


def _consume(sock: socket.socket, nbytes: int) -> None:
    """Read ``nbytes`` already received, so that closing sends a FIN after our answer rather than a reset."""
    while nbytes > 0:
        data = sock.recv(min(nbytes, 65536))
        if not data:
            return
        nbytes -= len(data)


# --- limits and the refusal ledger ---------------------------------------------------------------------------

class ConnectionLimits:
    """Connections open per address, and how many still wait for their first PDU (thread-safe)."""

    def __init__(self, per_address: int, waiting: int):
        self.per_address = per_address
        self.waiting_limit = waiting
        self._open: collections.Counter[str] = collections.Counter()
        self._waiting = 0
        self._lock = threading.Lock()

    def open(self, address: str) -> Refusal | None:
        """Count a new connection from ``address`` as waiting; returns why it is refused instead, or None."""
        with self._lock:
            if self._open[address] >= self.per_address:
                return Refusal.TOO_MANY_FROM_ADDRESS
            if self._waiting >= self.waiting_limit:
                return Refusal.TOO_MANY_WAITING
            self._open[address] += 1
            self._waiting += 1
        return None

    def associating(self) -> None:
        """A waiting connection sent its A-ASSOCIATE-RQ."""
        with self._lock:
            self._waiting -= 1

    def close(self, address: str, *, waiting: bool) -> None:
        """A connection from ``address`` ended (``waiting``: before its A-ASSOCIATE-RQ)."""
        with self._lock:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]
            if waiting:
                self._waiting -= 1


REFUSAL_WINDOW_SECONDS = 60.0  # refusals of one caller for one reason: one row at once, one with the rest
MAX_CALLERS_PER_WINDOW = 64  # callers counted apart in one window; the rest are counted together as "*"


@dataclasses.dataclass(frozen=True)
class RefusalRow:
    """One audit row: ``count`` refusals of ``caller`` for ``refusal``; ``first`` for a window's first one."""

    action: str
    caller: str
    refusal: Refusal
    count: int
    first: bool


@dataclasses.dataclass
class _Tally:
    unwritten: int = 0
    announced: bool = False


class RefusalLedger:
    """Refusals counted per (action, caller, reason) in windows of ``window_s`` seconds (thread-safe).

    :meth:`due` gives the rows to write: a key's first refusal in a window at once (who was refused;
    its count includes any that came before it was written), the rest of the window as one row with
    its count (how often), so at most two rows per key and window. ``wake`` is set when a row is due
    before the window ends.
    """

    def __init__(self, window_s: float = REFUSAL_WINDOW_SECONDS, max_callers: int = MAX_CALLERS_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.max_callers = max_callers
        self.clock = clock
        self.wake = threading.Event()
        self._tallies: dict[tuple[str, str, Refusal], _Tally] = {}
        self._window_start = clock()
        self._lock = threading.Lock()

    def refused(self, action: str, caller: str, refusal: Refusal) -> None:
        """Count one refusal of ``caller`` (``AE@address`` or an address)."""
        with self._lock:
            key = (action, caller, refusal)
            if key not in self._tallies and len(self._tallies) >= self.max_callers:
                key = (action, "*", refusal)
            tally = self._tallies.setdefault(key, _Tally())
            tally.unwritten += 1
            if not tally.announced:
                self.wake.set()

    def due(self, *, final: bool = False) -> list[RefusalRow]:
        """Rows to write now: first refusals, and every count when the window is over (or ``final``)."""
        with self._lock:
            rows = []
            for (action, caller, refusal), tally in self._tallies.items():
                if not tally.announced and tally.unwritten:
                    rows.append(RefusalRow(action, caller, refusal, tally.unwritten, first=True))
                    tally.announced, tally.unwritten = True, 0
            if final or self.clock() - self._window_start >= self.window_s:
                rows += [RefusalRow(action, caller, refusal, tally.unwritten, first=False)
                         for (action, caller, refusal), tally in self._tallies.items() if tally.unwritten]
                self._tallies.clear()
                self._window_start = self.clock()
            return rows

    def seconds_left(self) -> float:
        """Seconds until the current window ends."""
        with self._lock:
            return max(0.0, self._window_start + self.window_s - self.clock())


# --- the server ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Guard:
    """What the server checks before and around pynetdicom; one per receiver."""

    callers: tuple[Caller, ...]
    limits: ConnectionLimits
    first_pdu_timeout: float
    max_pdu: int
    refusals: RefusalLedger


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the allow-list and connection limits checked at accept."""

    # connection threads end with their association; a stopping receiver does not wait for them
    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of callers waits in the kernel, not for a SYN retry

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any):
        self.guard = guard
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a new connection, or refuse it (socketserver then closes it) without starting a thread."""
        address = str(client_address[0])
        if not may_connect(self.guard.callers, address):
            refusal: Refusal | None = Refusal.ADDRESS_NOT_ALLOWED
        else:
            refusal = self.guard.limits.open(address)
        if refusal:
            self.guard.refusals.refused(CONNECTION_REFUSED, address, refusal)
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread will end this connection: release its place here
            self.guard.limits.close(str(client_address[0]), waiting=True)
            raise


class GuardedRequestHandler(RequestHandler):
    """One connection: its whole A-ASSOCIATE-RQ in time from an allowed caller, then pynetdicom's association."""

    server: GuardedServer

    def handle(self) -> None:
        guard = self.server.guard
        address = str(self.client_address[0])
        waiting = True
        try:
            ae_title = self._allowed_caller(guard, address)
            if ae_title is None:
                self.server.shutdown_request(self.request)
                return
            guard.limits.associating()
            waiting = False
            caller = f"{ae_title}@{address}"
            self.request = PDULimitSocket(
                cast(socket.socket, self.request), p_data_limit(guard.max_pdu),
                lambda refusal: guard.refusals.refused(ASSOCIATION_ABORTED, caller, refusal))
            # what pynetdicom's RequestHandler.handle does, then wait: the limits hold until the association ends
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        except BaseException:
            self.server.shutdown_request(self.request)
            raise
        finally:
            guard.limits.close(address, waiting=waiting)

    def _allowed_caller(self, guard: Guard, address: str) -> str | None:
        """The calling AE title of an allowed A-ASSOCIATE-RQ, left unread for pynetdicom.

        None when the peer left, or was refused (counted, and answered with an A-ASSOCIATE-RJ when it
        asked as an AE title the allow-list does not admit from this address).
        """
        sock = cast(socket.socket, self.request)
        try:
            request = peek_association_request(sock, guard.first_pdu_timeout)
            if request is None:
                return None
            ae_title = calling_ae_title(request)
        except Refused as exc:
            guard.refusals.refused(CONNECTION_REFUSED, address, exc.refusal)
            return None
        except OSError:  # reset by the peer while we waited
            return None
        if is_allowed(guard.callers, ae_title, address):
            return ae_title
        guard.refusals.refused(ASSOCIATION_REFUSED, f"{ae_title}@{address}", Refusal.CALLER_NOT_ALLOWED)
        with contextlib.suppress(OSError):
            _consume(sock, len(request))
            sock.sendall(reject_pdu())
        return None

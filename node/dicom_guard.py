"""What one DICOM peer can make the listener hold, bounded from the TCP accept on (``node.limits``).

* At accept (the server thread, nothing read yet): an address in back-off (:mod:`node.backoff`)
  is closed at once; so is one with ``max_pending_per_host`` connections already waiting to
  associate, or when all hosts together have ``4 x node.max_associations`` waiting.
* TLS: the handshake runs in the connection's own thread, within the same deadline (pynetdicom
  does it in the accepting thread, where one silent client would stop the port).
* ``association_request_timeout_s`` from accept to a whole A-ASSOCIATE-RQ (ARTIM, absolute: bytes
  that trickle in do not extend it); ``idle_timeout_s`` between PDUs; the PDU cap: both read by
  :class:`node.fast_reactor.FastDUL`, which never blocks on a partial PDU; ``max_dataset_bytes``:
  the P-DATA fragments of one data set that pynetdicom accumulates in memory, counted by FastDUL as
  they arrive (A-ABORT once over it).
* At the A-ASSOCIATE-RQ (:meth:`Guard.associate`): at most ``max_associations_per_host``
  associations per host and ``node.max_associations`` in all, else A-ASSOCIATE-RJ (transient,
  local limit exceeded).

Failures that a well-configured peer does not produce (rejected AE, failed TLS handshake, PDU
violation, no A-ASSOCIATE-RQ in time) count towards the address's back-off; an accepted
association clears it. Outcomes go through one callback (``on_outcome``, the audit); refusals
that a flood repeats (slots, TLS, ARTIM) only when they are logged, once per host and window.
"""
from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from node import spill
from node.backoff import Backoff, LogWindow
from node.config import Limits
from node.fast_reactor import FastAssociation, FastRequestHandler

log = logging.getLogger(__name__)

#: All hosts together: connections waiting to associate, per allowed association.
PENDING_PER_ASSOCIATION = 4
#: Refusals of the same kind for the same host are logged once per this window.


@dataclass(frozen=True)
class AssociationOutcome:
    """One association attempt, as the audit trail wants it (no patient data)."""

    accepted: bool
    address: str
    calling_ae: str | None  # None: refused before an A-ASSOCIATE-RQ was read
    tls: bool
    reason: str = ""  # why it was refused / aborted; "" when accepted
    peer_certificate: str | None = None  # the client certificate's subject over mutual TLS


def tls_handshake(sock: ssl.SSLSocket, deadline: float) -> str | None:
    """Complete the server-side handshake by ``deadline`` (monotonic); None, or why it failed."""
    sock.settimeout(0.0)
    try:
        while True:
            try:
                sock.do_handshake()
                return None
            except ssl.SSLWantReadError:
                wait = ([sock], [])
            except ssl.SSLWantWriteError:
                wait = ([], [sock])
            left = deadline - time.monotonic()
            if left <= 0:
                return "no TLS handshake within the association request timeout"
            select.select(*wait, [], left)
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc.__class__.__name__}"
    except OSError:
        return "connection lost during the TLS handshake"
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


class Guard:
    """Per-host slots, deadlines and back-off for the DICOM listener(s) of one node."""

    def __init__(self, limits: Limits, max_associations: int, backoff: Backoff,
                 on_outcome: Callable[[AssociationOutcome], None]):
        self.limits = limits
        self.set_max_associations(max_associations)
        self.backoff = backoff
        self.on_outcome = on_outcome
        self.quiet = LogWindow(logger=log)
        self._pending: Counter[str] = Counter()
        self._active: Counter[str] = Counter()
        self._lock = threading.Lock()

    def set_max_associations(self, count: int) -> None:
        """``node.max_associations`` (reloadable): associations in all, and with it the waiting ones."""
        self.max_associations = count
        self.max_pending = PENDING_PER_ASSOCIATION * count

    # -- accept ---------------------------------------------------------------------------
    def admit(self, host: str, tls: bool) -> bool:
        """At TCP accept: take a pending slot for ``host``, or refuse (the caller closes)."""
        if self.backoff.blocked(host):
            return False  # the back-off logged once when it started
        with self._lock:
            if self._pending[host] >= self.limits.max_pending_per_host:
                why = f"{self._pending[host]} connections from it are already waiting to associate"
            elif sum(self._pending.values()) >= self.max_pending:
                why = f"{self.max_pending} connections are already waiting to associate"
            else:
                self._pending[host] += 1
                return True
        if self.quiet.warning(host, "pending", "refused a connection from %s: %s", host, why):
            self.on_outcome(AssociationOutcome(False, host, None, tls, why))  # a flood: once a window
        return False

    def refused(self, host: str, tls: bool, why: str) -> None:
        """A connection ended before an association could be requested (TLS handshake)."""
        self.release(host, active=False)
        self.backoff.failure(host)
        if self.quiet.warning(host, "tls", "refused a connection from %s: %s", host, why):
            self.on_outcome(AssociationOutcome(False, host, None, tls, why))

    # -- A-ASSOCIATE-RQ ---------------------------------------------------------------------
    def associate(self, assoc: FastAssociation, host: str) -> str | None:
        """Turn the pending slot into an association slot; or why not (then A-ASSOCIATE-RJ)."""
        with self._lock:
            if self._active[host] >= self.limits.max_associations_per_host:
                return f"{self._active[host]} associations from {host} are open (node.limits.max_associations_per_host)"
            if sum(self._active.values()) >= self.max_associations:
                return f"the node's limit of {self.max_associations} associations is reached"
            self._pending[host] -= 1
            self._active[host] += 1
            assoc._guard_active = True
            return None

    def release(self, host: str, active: bool) -> None:
        with self._lock:
            counter = self._active if active else self._pending
            counter[host] -= 1
            if counter[host] <= 0:
                del counter[host]

    def counts(self, host: str) -> tuple[int, int]:
        """(pending, associations) of ``host``, for tests and status."""
        with self._lock:
            return self._pending[host], self._active[host]

    # -- hooks set on each association -------------------------------------------------------
    def violation(self, assoc: FastAssociation, reason: str) -> None:
        host = assoc.requestor.address
        calling = _calling(assoc)
        log.warning("PDU violation from %s@%s: %s: A-ABORT, connection closed", calling or "(not associated)",
                    host, reason)
        assoc._guard_failed = True
        self.backoff.failure(host)
        self.on_outcome(AssociationOutcome(False, host, calling, _is_tls(assoc), f"PDU violation: {reason}"))

    def ended(self, assoc: FastAssociation) -> None:
        host = assoc.requestor.address
        self.release(host, active=getattr(assoc, "_guard_active", False))
        if assoc.dul.request_timed_out and not getattr(assoc, "_guard_failed", False):
            why = (f"no complete A-ASSOCIATE-RQ within {self.limits.association_request_timeout_s:g} s "
                   "of connecting")
            self.backoff.failure(host)
            if self.quiet.warning(host, "artim", "closed a connection from %s: %s", host, why):
                self.on_outcome(AssociationOutcome(False, host, None, _is_tls(assoc), why))


def _calling(assoc) -> str | None:
    primitive = assoc.requestor.primitive
    return primitive.calling_ae_title.strip() if primitive is not None else None


def _is_tls(assoc) -> bool:
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    return isinstance(sock, ssl.SSLSocket)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :meth:`Guard.admit` at accept and no TLS handshake in the
    accepting thread. ``guard`` is set before ``serve_forever``."""

    guard: Guard
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops SYNs (1 s client retries) under a burst

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        return self.guard.admit(client_address[0], isinstance(request, ssl.SSLSocket))

    def handle_error(self, request, client_address) -> None:
        log.error("DICOM connection from %s failed before its association started", client_address[0],
                  exc_info=log.isEnabledFor(logging.DEBUG))


class GuardedHandler(FastRequestHandler):
    """Runs in the connection's thread: TLS handshake, then the association with its limits."""

    def handle(self) -> None:
        guard: Guard = self.server.guard
        host = self.client_address[0]
        limits = guard.limits
        deadline = time.monotonic() + limits.association_request_timeout_s
        tls = isinstance(self.request, ssl.SSLSocket)
        if tls:
            why = tls_handshake(self.request, deadline)
            if why:
                self.server.shutdown_request(self.request)
                guard.refused(host, tls, why)
                return
        started = False
        try:
            self.request.settimeout(limits.idle_timeout_s)  # a send never blocks longer (reads never block)
            assoc = self._create_association()
            assoc.acse_timeout = max(0.1, deadline - time.monotonic())  # ARTIM: the rest of the deadline
            assoc.dul.max_pdu_bytes = limits.max_pdu_bytes
            assoc.dul.max_dataset_bytes = limits.max_dataset_bytes
            if getattr(self.server, "spill_dir", None) is not None:
                spill.enable(assoc, limits.spill_dataset_bytes, self.server.spill_dir,
                             getattr(self.server, "short_of_space", None))
            assoc.dul.on_violation = lambda reason: guard.violation(assoc, reason)
            assoc.on_end = guard.ended
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            started = True
        finally:
            if not started:
                guard.release(host, active=False)
                self.server.shutdown_request(self.request)

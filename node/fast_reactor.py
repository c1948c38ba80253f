"""Event-driven reactors for pynetdicom associations (acceptor and requestor).

What this replaces, and why
---------------------------
pynetdicom runs two polling loops per association:

* ``DULServiceProvider.run_reactor`` (dul.py) checks the outgoing primitive queue and the socket
  (``select`` with a zero timeout) and, when neither has work, sleeps ``_run_loop_delay`` (1 ms);
* ``Association._run_reactor`` (association.py) sleeps a fixed 1 ms on every loop before it looks
  for a decoded DIMSE message, an A-RELEASE or A-ABORT, a dead DUL or an idle timeout.

Each C-STORE crosses both loops twice (request in, response out), so a synchronous sender such as
storescu waits up to ~1 ms at each hand-off, and the two threads wake 1000 times a second each
and fight for the GIL with the handler on a small machine (lowering the delay made it slower; see
the networking note). Upstream knows (``# TODO: try and make this event based`` in dul.py; the
loop only stopped sleeping between queued events in pynetdicom#651).

Here both loops *block* until there is work instead of sleeping:

* :class:`FastDUL` waits in ``select()`` on the association's socket and on a wake-up socketpair
  that is written whenever another thread queues something for it (outgoing primitive, FSM event,
  kill request), with a short ceiling (:data:`IDLE_WAIT`) so that timers (ARTIM) and anything not
  signalled are still noticed promptly.
* :func:`_run_reactor` (the association loop) waits on a :class:`threading.Event` set when a DIMSE
  message or an ACSE primitive arrives, when the DUL thread ends and on ``kill()``, with the same
  ceiling for the network idle timer.

Everything else is pynetdicom's own code: the same state machine, the same order of checks in both
loops, the same pause protocol (``_reactor_checkpoint``/``_is_paused``) used by ``send_c_*``/``release()``.

PDU reading is replaced too (:meth:`FastDUL._read_pdu_data`), because the stock reader blocks in
``recv()`` until a whole PDU has arrived: a peer that drips bytes holds the DUL thread there, where
the ARTIM timer is never checked, and a peer that announces 1 GiB gets 1 GiB buffered. Here the
socket is read without blocking into one buffer per PDU, sized from the PDU header only after the
header passed the checks (known PDU type, length within :attr:`FastDUL.max_pdu_bytes`); an
A-ASSOCIATE-RQ is checked for presentation context IDs that break PS3.8 (:func:`bad_context_ids`)
before the state machine sees it; a PDU that breaks these rules is answered as pynetdicom answers an invalid PDU (Evt19: A-ABORT) and nothing more is
read from that peer. The network idle timer restarts on whole PDUs only, so a drip cannot hold an
association open either.

It touches private pynetdicom attributes, so it is pinned to the versions it was written and
tested against (:data:`SUPPORTED`; written against 3.0.4) and checks at import that the internals
it relies on still look as it expects (:data:`PATCHED`, :func:`internals_changed`); the test suite
also fingerprints the source of each pynetdicom method whose body is re-implemented here (and of
``RequestHandler.handle``, which :class:`node.dicom_guard.GuardedHandler` re-implements), so a
release that changes one fails until the copy here is re-checked. With any other
version :func:`accelerate` logs a warning once and leaves the association on pynetdicom's stock
reactors; a listener that needs the PDU cap and deadlines must refuse to start instead
(:func:`require_supported`).

Use :class:`FastAE` instead of :class:`pynetdicom.AE` (both server and ``associate``), or call
:func:`accelerate` on an association that has not been started yet.
"""
from __future__ import annotations

import inspect
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER, Association
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler
from pynetdicom.utils import make_target

from node import spill

log = logging.getLogger(__name__)

#: pynetdicom versions whose private reactor API this module matches: [lowest, first unsupported).
SUPPORTED = ((3, 0, 0), (3, 1, 0))
#: Longest time either loop blocks without a wake-up (timers, anything not signalled).
IDLE_WAIT = 0.05
#: FSM events of received PDUs (PS3.8 9.2), for the log line of one that arrives out of turn.
_PDU_EVENTS = {"Evt3": "A-ASSOCIATE-AC", "Evt4": "A-ASSOCIATE-RJ", "Evt6": "A-ASSOCIATE-RQ", "Evt10": "P-DATA-TF",
               "Evt12": "A-RELEASE-RQ", "Evt13": "A-RELEASE-RP"}
#: PDUs other than P-DATA-TF are not bound by the advertised maximum (PS3.8 D.1); an
#: A-ASSOCIATE-RQ with every storage SOP class is ~15 KB.
MIN_OTHER_PDU_CAP = 65536

#: The pynetdicom internals this module overrides or calls, with the parameters it relies on.
#: Checked at import (:func:`internals_changed`) so an upgrade that moves them fails loudly.
PATCHED = {
    "DULServiceProvider.run_reactor": (DULServiceProvider.run_reactor, ["self"]),
    "DULServiceProvider._is_transport_event": (DULServiceProvider._is_transport_event, ["self"]),
    "DULServiceProvider._read_pdu_data": (DULServiceProvider._read_pdu_data, ["self"]),
    "DULServiceProvider._decode_pdu": (DULServiceProvider._decode_pdu, ["self", "bytestream"]),
    "DULServiceProvider._process_recv_primitive": (DULServiceProvider._process_recv_primitive, ["self"]),
    "Association._run_reactor": (Association._run_reactor, ["self"]),
    "Association.run_reactor": (Association.run_reactor, ["self"]),
    "Association.kill": (Association.kill, ["self"]),
    "RequestHandler._create_association": (RequestHandler._create_association, ["self"]),
    "AE._create_socket": (AE._create_socket, ["self", "assoc", "address", "tls_args"]),
}
#: Private attributes read or replaced on a live DUL / association.
PATCHED_ATTRIBUTES = ("_idle_timer", "artim_timer", "_recv_pdu", "event_queue", "to_provider_queue",
                      "to_user_queue", "state_machine", "_kill_thread", "_run_loop_delay")


def _version() -> tuple[int, ...]:
    parts = []
    for piece in pynetdicom.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def internals_changed() -> list[str]:
    """What of :data:`PATCHED` no longer matches pynetdicom (empty: all as expected)."""
    problems = []
    for name, (func, params) in PATCHED.items():
        got = list(inspect.signature(func).parameters)
        if got[:len(params)] != params:
            problems.append(f"{name}{tuple(got)} (expected {tuple(params)})")
    if set(_PDU_TYPES) != {bytes([t]) for t in range(1, 8)}:
        problems.append(f"dul._PDU_TYPES is {sorted(_PDU_TYPES)}")
    return problems


_CHANGED = internals_changed()


def supported() -> bool:
    low, high = SUPPORTED
    return low <= _version() < high and not _CHANGED


def require_supported() -> None:
    """Raise unless the fast reactors (and with them the PDU cap and deadlines) will be used."""
    if not supported():
        raise RuntimeError(
            f"pynetdicom {pynetdicom.__version__} is not supported by node.fast_reactor "
            f"({'.'.join(map(str, SUPPORTED[0]))} <= version < {'.'.join(map(str, SUPPORTED[1]))}"
            + (f"; changed internals: {'; '.join(_CHANGED)}" if _CHANGED else "")
            + "): the DICOM listener's PDU size cap and deadlines depend on it")


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("pynetdicom %s is outside %s..%s: using pynetdicom's stock polling reactors",
                    pynetdicom.__version__, ".".join(map(str, SUPPORTED[0])), ".".join(map(str, SUPPORTED[1])))


class _WakingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``wake()`` after every put."""

    def __init__(self, wake, items: queue.Queue | None = None):
        super().__init__()
        self._wake = wake
        if items is not None:  # keep what was queued before the switch (the acceptor's Evt5)
            self.queue.extend(items.queue)

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


def bad_context_ids(pdu: Any) -> str | None:
    """Why the presentation context IDs of a decoded A-ASSOCIATE-RQ break PS3.8 9.3.2.2 (odd
    integers 1-255, each context its own ID), or None. pynetdicom raises in its state machine on an
    even or zero ID (a logged error, then an abort) and accepts a duplicate, answering two contexts
    under one ID, so that the peer's P-DATA on it means either."""
    seen: set[int] = set()
    for item in getattr(pdu, "variable_items", []):
        if type(item).__name__ != "PresentationContextItemRQ":
            continue
        cid = item.context_id
        if cid is None or not 1 <= cid <= 255 or cid % 2 == 0:
            return f"presentation context ID {cid} (must be odd, 1 to 255)"
        if cid in seen:
            return f"presentation context ID {cid} proposed twice"
        seen.add(cid)
    return None


class FastDUL(DULServiceProvider):
    """The DUL reactor, blocking in ``select()`` instead of sleeping 1 ms when idle.

    Made from a stock ``DULServiceProvider`` by :func:`accelerate` (``__class__`` is swapped before
    the thread starts, so every attribute and timer the association set up is kept).
    """

    #: Longest PDU length field accepted (None: no limit); a longer PDU is refused before it is read.
    max_pdu_bytes: int | None = None
    #: Most bytes of one incoming data set (its P-DATA fragments, which pynetdicom accumulates
    #: until the last one: in memory, or in a file past node.spill's threshold); None: no limit.
    #: Over it, the association is aborted.
    max_dataset_bytes: int | None = None
    #: Called (in the DUL thread) with the reason when the peer breaks the PDU rules; it logs.
    on_violation: Callable[[str], None] | None = None
    #: Set when the ARTIM timer ended the wait for the A-ASSOCIATE-RQ.
    request_timed_out = False

    def _adopt(self, wake_assoc) -> None:
        self._head = bytearray(6)  # the PDU being read: header, then the whole PDU
        self._pdu: bytearray | None = None
        self._got = 0
        self._refused = False  # after a violation nothing more is read from the peer
        self._dataset_bytes = 0  # data set fragments received since the last one that ended a data set
        self._woke_user = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._fast_kill = self.__dict__.pop("_kill_thread", False)
        # Producers in other threads: the association's send_pdu (to_provider_queue), the DIMSE
        # provider and transport (event_queue). Consumers in other threads: to_user_queue.
        self.to_provider_queue = _WakingQueue(self.wake, self.to_provider_queue)
        self.event_queue = _WakingQueue(self.wake, self.event_queue)
        self.to_user_queue = _WakingQueue(wake_assoc, self.to_user_queue)

    # ``kill_dul()`` and ``stop_dul()`` set this flag from other threads: wake the loop so it exits.
    @property
    def _kill_thread(self) -> bool:
        return self._fast_kill

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._fast_kill = value
        if value:
            self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending (buffer full) or shut down: the loop will look anyway

    def run(self) -> None:
        # Thread.run() would call the stock reactor, bound when the thread object was made.
        try:
            make_target(self.run_reactor)()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self.assoc._fast_wake.set()  # the association loop checks dul.is_alive()

    def _wait(self) -> None:
        """Block until the socket is readable, another thread wakes us, or IDLE_WAIT passes."""
        fds: list[Any] = [self._wake_r]
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if raw is not None:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select() cannot see them (#528)
            fds.append(raw)
        timeout = IDLE_WAIT
        if self.artim_timer._start_time is not None and self.artim_timer.timeout is not None:
            timeout = min(timeout, max(0.0, self.artim_timer.remaining))
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # socket closed under us: the stock checks report it (Evt17)
            time.sleep(self._run_loop_delay)
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    # -- PDU reading: non-blocking, one bounded buffer per PDU -------------------------------
    def _hard_close(self) -> None:
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            if self.socket is not None and self.socket.socket is not None:
                self.socket.send(abort_pdu.encode())
                self.socket.close()
        except Exception:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        if self.assoc.is_acceptor:
            self.to_user_queue.put(None)

    def _violate(self, reason: str, queue_event: bool = True) -> None:
        """The peer broke the PDU rules: say so once, answer as for an invalid PDU (Evt19: A-ABORT,
        then the connection is closed), and read nothing more from it."""
        self._refused = True
        self._pdu = None
        if self.on_violation is not None:
            try:
                self.on_violation(reason)
            except Exception:
                log.exception("on_violation failed")
        if queue_event:
            self.event_queue.put("Evt19")

    def _recv_into(self, view: memoryview) -> int | None:
        """Read what is there into ``view`` without blocking: bytes read, 0 when the peer closed,
        None when nothing is there yet (a TLS record not yet complete)."""
        raw = self.socket.socket
        if isinstance(raw, ssl.SSLSocket):
            timeout = raw.gettimeout()
            raw.settimeout(0.0)  # only this thread uses the socket (sends happen in the DUL too)
            try:
                return raw.recv_into(view, len(view))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            except ssl.SSLZeroReturnError:
                return 0
            finally:
                raw.settimeout(timeout)
        try:
            return raw.recv_into(view, len(view), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def _read_pdu_data(self) -> bool:
        """Read what the peer sent, without blocking. True when a whole PDU was queued (or the
        connection ended): the idle timer restarts on that, not on single bytes."""
        if self._refused:
            self.socket.close()  # Evt17
            return True
        try:
            if self._pdu is None:
                got = self._recv_into(memoryview(self._head)[self._got:])
            else:
                got = self._recv_into(memoryview(self._pdu)[self._got:])
        except OSError:
            got = 0
        if got is None:
            return False
        if got == 0:  # closed, possibly mid-PDU: as stock, Evt17 (transport closed)
            self._pdu, self._got = None, 0
            self.event_queue.put("Evt17")
            return True
        self._got += got
        if self._pdu is None:
            if self._got < 6:
                return False
            pdu_type, _, length = struct.unpack(">BBL", self._head)
            if bytes([pdu_type]) not in _PDU_TYPES:
                self._violate(f"unknown PDU type 0x{pdu_type:02X}")
                return True
            cap = self.max_pdu_bytes
            if cap is not None and pdu_type != 0x04:
                cap = max(cap, MIN_OTHER_PDU_CAP)
            if cap is not None and length > cap:
                what = "P-DATA-TF" if pdu_type == 0x04 else f"PDU type 0x{pdu_type:02X}"
                self._violate(f"{what} of {length} bytes, over the maximum of {cap}")
                return True
            self._pdu = bytearray(6 + length)
            self._pdu[:6] = self._head
            if length:
                return False
        elif self._got < len(self._pdu):
            return False
        data, self._pdu, self._got = self._pdu, None, 0
        if data[0] == 0x04 and self.max_dataset_bytes is not None and self._count_dataset(data):
            self._violate(f"a data set of more than {self.max_dataset_bytes} bytes "
                          "(node.limits.max_dataset_bytes)")
            return True
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            detail = repr(str(exc))[:120]
            name = _PDU_TYPES[bytes(data[0:1])][0].__name__.replace("_", "-")
            self._violate(f"{name} that cannot be decoded ({type(exc).__name__}: {detail})")
            return True
        if data[0] == 0x01:
            why = bad_context_ids(pdu)
            if why:  # pynetdicom would accept duplicates, and fail in its state machine on the rest
                self._violate(f"A-ASSOCIATE-RQ with {why}")
                return True
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return True

    def _count_dataset(self, data: bytearray) -> bool:
        """Add the data set fragments of one P-DATA-TF (PS3.8 9.3.5, E.2: each PDV is length, context
        ID, control header; bit 0 set: command, bit 1 set: last fragment). True when the data set
        being received is now over :attr:`max_dataset_bytes`. PDV lengths that lie are left to the
        decoder."""
        pos, end = 6, len(data)
        while pos + 6 <= end:
            length = int.from_bytes(data[pos:pos + 4], "big")
            header = data[pos + 5]
            if not header & 0x01:
                self._dataset_bytes += max(length - 2, 0)
                if self._dataset_bytes > self.max_dataset_bytes:
                    return True
                if header & 0x02:
                    self._dataset_bytes = 0
            pos += 4 + length
        return False

    def _is_transport_event(self) -> bool:
        """Stock, except that a partial PDU read is not an event."""
        if self.state_machine.current_state == "Sta13":
            if self.socket and self.socket.ready:
                self._read_pdu_data()
                return True
            self.socket.close()
            return True
        if self.socket and self.socket.ready:
            return self._read_pdu_data()
        return False

    def run_reactor(self) -> None:
        """``DULServiceProvider.run_reactor`` with ``time.sleep`` replaced by :meth:`_wait`."""
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                if self.state_machine.current_state == "Sta2":
                    self.request_timed_out = True  # no whole A-ASSOCIATE-RQ in time
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As stock: bypass the state machine and send an A-ABORT. One line (the peer's
                # bytes can cause this); the traceback only at DEBUG.
                log.error("DUL failed (%s: %s), aborting the association", type(exc).__name__, exc)
                log.debug("DUL failure", exc_info=True)
                self._hard_close()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            if self.on_violation is not None and event in _PDU_EVENTS and not self._refused:
                state = self.state_machine.current_state
                if TRANSITION_TABLE.get((event, state)) in ("AA-1", "AA-8"):  # a PDU that breaks the protocol
                    self._violate(f"{_PDU_EVENTS[event]} not expected in state {state}", queue_event=False)
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # pynetdicom logged it; the association cannot go on
                self._violate(f"the state machine failed on {event}: {type(exc).__name__}: {exc}", queue_event=False)
                self._hard_close()
                return
            idle = False
            if (not self._woke_user and self.state_machine.current_state == "Sta1"
                    and self.assoc.is_acceptor and not self.assoc.is_established):
                # Closed before an association (ARTIM, a bad PDU, the peer left): the association
                # thread waits for the A-ASSOCIATE-RQ on to_user_queue; let it end now.
                self._woke_user = True
                self.to_user_queue.put(None)


class FastAssociation(Association):
    """The association reactor, blocking on an event instead of sleeping 1 ms per loop."""

    def _adopt(self) -> None:
        self._fast_wake = threading.Event()
        self.dimse.msg_queue = _WakingQueue(self._fast_wake.set, self.dimse.msg_queue)

    #: Called in the association's thread when it ends, whatever happened (the listener's slot).
    on_end: Callable[["FastAssociation"], None] | None = None

    def kill(self) -> None:
        self._fast_wake.set()
        super().kill()

    def run(self) -> None:
        try:
            super().run()
        finally:
            if not self.dul.is_alive():
                # A data set cut off mid-message (abort, max_dataset_bytes) stays in the DIMSE
                # provider, and the association's objects are reference cycles: without this, its
                # fragments are held until a full garbage collection (measured: 256 MiB for > 5 s).
                # One that went to a file (node.spill) leaves no file behind.
                spill.drop_partial(self.dimse)
                self.dimse.message = None
            if self.on_end is not None:
                self.on_end(self)

    def _run_reactor(self) -> None:
        """``Association._run_reactor`` with ``time.sleep(0.001)`` replaced by a wait on
        ``_fast_wake``. While it waits the reactor touches no queue, so it reports itself paused:
        ``send_c_*()``/``release()`` then need not wait for a loop to end (they clear
        ``_reactor_checkpoint`` and wait for ``_is_paused``, as with the stock reactor)."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._fast_wake.wait(IDLE_WAIT)
            self._fast_wake.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def accelerate(assoc: Association) -> Association:
    """Switch a not yet started association (and its DUL) to the event-driven reactors.

    A no-op, with one warning in the log, on pynetdicom versions outside :data:`SUPPORTED`.
    """
    if not supported():
        _warn_once()
        return assoc
    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider:
        return assoc  # already switched, or a subclass we do not know
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("accelerate() must be called before the association starts")
    assoc.__class__ = FastAssociation
    assoc._adopt()
    assoc.dul.__class__ = FastDUL
    assoc.dul._adopt(assoc._fast_wake.set)
    return assoc


class FastRequestHandler(RequestHandler):
    """pynetdicom's acceptor request handler, whose associations use the fast reactors (what
    :meth:`FastAE.make_server` serves with; subclass it, as :mod:`node.dicom_guard` does, to add to it)."""

    def _create_association(self) -> Association:
        return accelerate(super()._create_association())


class FastAE(AE):
    """``pynetdicom.AE`` whose associations, accepted or requested, use the fast reactors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not supported():
            _warn_once()

    def make_server(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("request_handler", FastRequestHandler)
        return super().make_server(*args, **kwargs)

    def _create_socket(self, assoc: Association, *args: Any, **kwargs: Any):
        accelerate(assoc)  # ``associate()`` calls this right after making the association
        return super()._create_socket(assoc, *args, **kwargs)

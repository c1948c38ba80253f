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

Everything else is pynetdicom's own code: the same state machine, the same PDU reading
(``_process_recv_primitive``/``_is_transport_event``), the same order of checks in both loops, the
same pause protocol (``_reactor_checkpoint``/``_is_paused``) used by ``send_c_*``/``release()``.

It touches private pynetdicom attributes, so it is pinned to the versions it was written and
tested against (:data:`SUPPORTED`; written against 3.0.4). With any other version
:func:`accelerate` logs a warning once and leaves the association on pynetdicom's stock reactors.

Use :class:`FastAE` instead of :class:`pynetdicom.AE` (both server and ``associate``), or call
:func:`accelerate` on an association that has not been started yet.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER, Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler
from pynetdicom.utils import make_target

log = logging.getLogger(__name__)

#: pynetdicom versions whose private reactor API this module matches: [lowest, first unsupported).
SUPPORTED = ((3, 0, 0), (3, 1, 0))
#: Longest time either loop blocks without a wake-up (timers, anything not signalled).
IDLE_WAIT = 0.05


def _version() -> tuple[int, ...]:
    parts = []
    for piece in pynetdicom.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def supported() -> bool:
    low, high = SUPPORTED
    return low <= _version() < high


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


class FastDUL(DULServiceProvider):
    """The DUL reactor, blocking in ``select()`` instead of sleeping 1 ms when idle.

    Made from a stock ``DULServiceProvider`` by :func:`accelerate` (``__class__`` is swapped before
    the thread starts, so every attribute and timer the association set up is kept).
    """

    def _adopt(self, wake_assoc) -> None:
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
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As stock: bypass the state machine and send an A-ABORT.
                log.error("Exception in DUL.run(), aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class FastAssociation(Association):
    """The association reactor, blocking on an event instead of sleeping 1 ms per loop."""

    def _adopt(self) -> None:
        self._fast_wake = threading.Event()
        self.dimse.msg_queue = _WakingQueue(self._fast_wake.set, self.dimse.msg_queue)

    def kill(self) -> None:
        self._fast_wake.set()
        super().kill()

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


class _FastRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        return accelerate(super()._create_association())


class FastAE(AE):
    """``pynetdicom.AE`` whose associations, accepted or requested, use the fast reactors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not supported():
            _warn_once()

    def make_server(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("request_handler", _FastRequestHandler)
        return super().make_server(*args, **kwargs)

    def _create_socket(self, assoc: Association, *args: Any, **kwargs: Any):
        accelerate(assoc)  # ``associate()`` calls this right after making the association
        return super()._create_socket(assoc, *args, **kwargs)

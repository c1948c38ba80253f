"""The running node: the DICOM listener (and the HTTP service when configured), the
assembly/scheduling loop, the dispatcher loop and, in embedded mode, its own Celery worker as a
supervised child process.

The node owns all state (spool + ledger). On start it reopens series with unprocessed
instances and re-submits unfinished jobs, so `kill -9` loses nothing that was acknowledged.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from node import spill
from node.assembly import Assembler
from node.audit import Audit
from node.celery_app import PIPELINE_QUEUE, configure
from node.config import Config
from node.dispatch import Dispatcher
from node.ingest import Ingest
from node.ledger import Ledger
from node.reload import changes, pid_path, prepare, take_request, write_answer
from node.retention import Retention
from node.scheduler import Scheduler
from node.scp import StorageSCP
from node.spool import Spool, disk_full, remove_partial_writes

log = logging.getLogger(__name__)

GUARD_MAX_PAUSE_S = 30.0
WORKER_STOP_S = 15.0


def _die_with_parent(parent: int) -> None:
    """Runs in the embedded worker before exec: it is killed if the node dies (even kill -9).
    SIGKILL, not SIGTERM: on SIGTERM Celery finishes the job it holds, while the restarted node
    runs that job again beside it (idempotent, but twice the work on the same CPU or GPU). The
    signal comes when the *thread* that spawned the worker ends, so that thread must outlive it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the node died between fork and prctl
        os.kill(os.getpid(), signal.SIGKILL)


class Node:
    def __init__(self, config: Config):
        self.config = config
        self.spool = Spool(config.spool).ensure()
        self.ledger = Ledger(self.spool.ledger_path)
        self.audit = Audit(self.spool.audit_dir)
        self.assembler = Assembler(self.spool, self.ledger, config.completion.quiet_seconds)
        self.app = configure(config)
        from node.tasks import run_job  # registers the task on the configured app

        self._run_job = run_job
        self.scheduler = Scheduler(config, self.spool, self.ledger, self.assembler, self._submit, self.audit)
        self.dispatcher = Dispatcher(config, self.spool, self.ledger, audit=self.audit)
        self.ingest = Ingest(self.spool, self.ledger, self.assembler, config.retention.min_free_bytes, config.node.limits)
        self.scp = StorageSCP(config, self.ingest, self.audit)
        self.retention = Retention(config, self.spool, self.ledger, self.ingest, self.audit)
        self.http = None
        if config.http is not None:
            from node.http.app import HttpService  # the web stack is loaded only when it is used

            self.http = HttpService(self)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reload_lock = threading.Lock()
        self._resubmit = threading.Event()
        self._threads: list[threading.Thread] = []
        self._worker: subprocess.Popen | None = None

    def _submit(self, job_id: int) -> None:
        self._run_job.apply_async(args=[job_id], queue=PIPELINE_QUEUE)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        removed = remove_partial_writes(self.spool.root / "series")  # before anything can write there
        removed += spill.remove_leftovers(self.spool.incoming_dir)
        if removed:
            log.warning("removed %d partial instance file(s) left by an interrupted write (never acknowledged)",
                        removed)
        self.scp.start()  # a port already in use fails the start before anything runs
        if self.http is not None:
            self.http.start()
        self.assembler.recover()
        try:
            self.scheduler.resubmit_unfinished()
        except Exception as exc:
            if not disk_full(exc):
                raise
            # Below min_free_bytes the node still starts: it refuses instances (0xA700 / 503) and
            # /healthz says why; the scheduler loop re-submits once it can write again.
            log.error("the spool's disk is full (%s): unfinished jobs are re-submitted once there is space", exc)
            self._resubmit.set()
        if self.config.queue.broker == "embedded":
            self._start_worker()
            self._spawn(self._supervise_worker, "worker-supervisor")
        self._spawn(self._schedule_loop, "scheduler")
        self._spawn(self._dispatch_loop, "dispatcher")
        self._spawn(self._retention_loop, "retention")

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        if self.http is not None:
            self.http.stop()
        self.assembler._wake.set()
        for thread in self._threads:
            thread.join(timeout=WORKER_STOP_S + 5)  # the supervisor stops the worker first
        self._stop_worker()
        self.ledger.close()
        log.info("node stopped")

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        try:
            self.start()
        except BaseException:
            self.stop()  # what did start (listeners, the worker) must not keep the process alive
            raise
        pid_file = pid_path(self.spool.root)
        try:
            pid_file.write_text(f"{os.getpid()}\n")
        except OSError as exc:  # a full disk: the node runs and refuses instances; SIGHUP still reloads
            pid_file.unlink(missing_ok=True)
            log.error("cannot write %s (%s): `srnode reload` cannot find the node; send it SIGHUP instead",
                      pid_file, exc.strerror)
        try:
            while not self._stop.wait(0.2):
                if self._reload.is_set():
                    self._reload.clear()
                    ok, reasons, changed = self.reload(actor=take_request(self.spool.root) or "SIGHUP")
                    write_answer(self.spool.root, ok, reasons, changed)
        finally:
            pid_file.unlink(missing_ok=True)
            self.stop()

    # -- config reload --------------------------------------------------------------------
    def reload(self, actor: str, path=None) -> tuple[bool, list[str], list[str]]:
        """Validate the config file (the running one's unless ``path``) and swap it in (see
        node.reload); returns (applied, reasons it was refused, what changed)."""
        with self._reload_lock:
            old = self.config
            new, reasons = prepare(old, path)
            if new is None:
                log.warning("config reload refused, the running config stays: %s", "; ".join(reasons))
                self.audit.record("config.reload", actor=actor, ok=False, reasons=reasons)
                return False, reasons, []
            changed = changes(old, new)
            self.dispatcher.retire({n: d for n, d in old.destinations.items() if n not in new.destinations})
            for part in (self.scheduler, self.dispatcher, self.scp, self.retention):
                if part is not None and hasattr(part, "config"):
                    part.config = new
            self.ingest.min_free_bytes = new.retention.min_free_bytes  # the HTTP service reads self.config
            self.scp.guard.set_max_associations(new.node.max_associations)
            limits = new.node.limits
            self.scp.guard.limits = limits
            self.ingest.limits = limits  # how far a deflated data set may inflate
            self.scp.ae.maximum_pdu_size = limits.max_pdu_bytes
            self.scp.ae.acse_timeout = limits.association_request_timeout_s
            self.scp.ae.network_timeout = limits.idle_timeout_s
            self.assembler.quiet_seconds = new.completion.quiet_seconds
            logging.getLogger().setLevel(new.node.log_level)
            self.config = new
            log.info("config reloaded from %s: %s", new.source, "; ".join(changed) or "no change")
            self.audit.record("config.reload", actor=actor, ok=True, changes=changed)
            return True, [], changed

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, loop):
        """A loop that logs and carries on after an unexpected error instead of dying silently. The
        first failure is logged with its traceback; the same one again (e.g. a full disk) as one
        line, with the pause doubling up to ``GUARD_MAX_PAUSE_S``."""
        def run() -> None:
            pause, last = 1.0, None
            while not self._stop.is_set():
                try:
                    loop()
                except Exception as exc:
                    name, error = threading.current_thread().name, f"{type(exc).__name__}: {exc}"
                    if error != last:
                        pause = 1.0
                        log.exception("%s loop failed; continuing in %.0f s", name, pause)
                    else:
                        log.warning("%s loop still failing (%s); continuing in %.0f s", name, error, pause)
                    self._stop.wait(pause)
                    pause, last = min(pause * 2, GUARD_MAX_PAUSE_S), error
        return run

    # -- loops ----------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        lost_check = time.monotonic()
        while not self._stop.is_set():
            if self._resubmit.is_set():
                self.scheduler.resubmit_unfinished()  # a full disk: raises, and is tried again
                self._resubmit.clear()
            if self.config.queue.broker != "embedded" and time.monotonic() - lost_check > 60:
                # Redis redelivers an unacknowledged job after the visibility timeout; a job still
                # without a result after twice that was lost with the broker's memory (a restart).
                lost_check = time.monotonic()
                self.scheduler.resubmit_unfinished(older_than=time.time() - 2 * self.config.queue.visibility_timeout_s)
            self.scheduler.tick()
            self.assembler.wait(0.05)

    def _retention_loop(self) -> None:
        self.retention.empty_trash()
        while not self._stop.wait(self.retention.interval):
            self.retention.sweep()

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            if not self.dispatcher.run_once():
                nxt = self.ledger.next_delivery_due()
                delay = 0.1 if nxt is None else min(max(nxt - time.time(), 0.01), 0.5)
                self._stop.wait(delay)

    # -- embedded worker ------------------------------------------------------------------
    def _start_worker(self) -> None:
        cmd = [sys.executable, "-m", "node.cli", "worker", "--config", str(self.config.source), "--embedded"]
        parent = os.getpid()
        self._worker = subprocess.Popen(cmd, preexec_fn=lambda: _die_with_parent(parent), env=os.environ.copy())
        log.info("embedded worker started (pid %s)", self._worker.pid)

    def worker_running(self) -> bool:
        """Whether the embedded worker process is alive (health)."""
        return self._worker is not None and self._worker.poll() is None

    def _stop_worker(self) -> None:
        """SIGTERM (Celery's warm shutdown: the job in hand finishes), SIGKILL after ``WORKER_STOP_S``."""
        if self._worker is not None and self._worker.poll() is None:
            self._worker.terminate()
            try:
                self._worker.wait(timeout=WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()

    def _supervise_worker(self) -> None:
        """Restarts a dead worker from this thread, which therefore stops the worker itself before it
        ends (see :func:`_die_with_parent`)."""
        try:
            while not self._stop.is_set():
                code = self._worker.poll()
                if code is not None and not self._stop.is_set():
                    log.error("embedded worker exited with %s; restarting it and re-submitting its jobs", code)
                    self._stop.wait(1)
                    self._start_worker()
                    self._resubmit.set()
                self._stop.wait(0.5)
        finally:
            if self._stop.is_set():
                self._stop_worker()

"""Delivery of outputs: state per (output instance, destination) in the ledger.

The dispatcher takes due deliveries from the ledger, sends them in batches per destination
(one association or one STOW-RS request per batch), and records each instance's outcome:
stored, stored with a warning, try again after an exponential backoff, or parked. A delivery
that has used ``dispatch.max_attempts`` is parked; ``srnode retry JOB`` replays it.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from node import metrics
from node.audit import Audit
from node.config import SENDER, Config, DicomDestination, DicomwebDestination, FolderDestination
from node.dispatch import dicom, dicomweb, folder
from node.dispatch.outcome import Outcome
from node.ledger import Delivery, Ledger
from node.spool import Spool

log = logging.getLogger(__name__)

Destination = DicomDestination | DicomwebDestination | FolderDestination


def resolve(config: Config, ledger: Ledger, name: str, study_uid: str, series_uid: str) -> Destination | str:
    """The destination object for a name; for ``sender``, the calling peer's configured address.
    Returns a reason string when it cannot be resolved."""
    if name != SENDER:
        return config.destinations[name] if name in config.destinations else f"destination {name!r} is no longer configured"
    row = ledger.series(study_uid, series_uid)
    calling = row["calling_ae"] if row else None
    peer = config.peer(calling) if calling else None
    if peer is None or peer.port is None:
        return f"sender {calling!r} has no configured port to send results back to"
    return DicomDestination(type="dicom", ae_title=peer.ae_title, host=peer.host or row["peer_host"], port=peer.port)


def send(config: Config, dest: Destination, paths: list[Path]) -> list[Outcome]:
    if isinstance(dest, DicomDestination):
        return dicom.store(dest, config.node.ae_title, paths)
    if isinstance(dest, DicomwebDestination):
        outcomes: list[Outcome] = []
        for i in range(0, len(paths), dest.batch_size):
            outcomes += dicomweb.store(dest, paths[i:i + dest.batch_size])
        return outcomes
    return folder.store(dest, paths)


def check(config: Config, dest: Destination) -> tuple[bool, str]:
    """``srnode echo``: C-ECHO, a QIDO-RS query, or a write test."""
    if isinstance(dest, DicomDestination):
        return dicom.echo(dest, config.node.ae_title)
    if isinstance(dest, DicomwebDestination):
        return dicomweb.check(dest)
    return folder.check(dest)


class Dispatcher:
    def __init__(self, config: Config, spool: Spool, ledger: Ledger, batch: int = 200, audit: Audit | None = None):
        self.config = config
        self.spool = spool
        self.ledger = ledger
        self.batch = batch
        self.audit = audit
        self.retired: dict[str, Destination] = {}  # dropped by a config reload, kept for pending deliveries

    def retire(self, destinations: dict[str, Destination]) -> None:
        self.retired.update(destinations)

    def backoff(self, attempts: int) -> float:
        d = self.config.dispatch
        return min(d.backoff_initial_s * 2 ** max(attempts - 1, 0), d.backoff_max_s)

    def run_once(self) -> int:
        """Send every due delivery once; returns how many were attempted."""
        due = self.ledger.due_deliveries(time.time(), limit=self.batch)
        groups: dict[tuple[int, str], list[Delivery]] = defaultdict(list)
        for d in due:
            groups[(d.job_id, d.destination)].append(d)
        unreachable: dict[str, str] = {}  # destination -> why, for the rest of this round
        for (job_id, name), items in groups.items():
            job = self.ledger.job(job_id)
            config = self.config
            dest = self.retired[name] if name in self.retired and name not in config.destinations else \
                resolve(config, self.ledger, name, job.study_uid, job.series_uid)
            if isinstance(dest, str):
                outcomes = [Outcome("fail", dest)] * len(items)
            elif name in unreachable and name != SENDER:
                # Do not spend another connect timeout per job on a destination that is down.
                outcomes = [Outcome("retry", unreachable[name])] * len(items)
            else:
                paths = [self.spool.abs(d.path) for d in items]
                try:
                    outcomes = send(config, dest, paths)
                except Exception as exc:  # a bug or an unreadable output must not stop dispatch
                    log.exception("job %s: sending to %s failed", job_id, name)
                    outcomes = [Outcome("retry", f"{type(exc).__name__}: {exc}")] * len(items)
                if outcomes and all(o.kind == "retry" and o.unreachable for o in outcomes):
                    unreachable[name] = outcomes[0].status
            self._record(job_id, name, items, outcomes)
            final = self.ledger.settle_job(job_id)
            if final:
                metrics.JOBS.labels(job.pipeline, final).inc()
            if final and self.audit is not None:
                self.audit.record("job.settled", job=job_id, state=final)
        return len(due)

    def _record(self, job_id: int, name: str, items: list[Delivery], outcomes: list[Outcome]) -> None:
        now = time.time()
        rows = []
        for d, o in zip(items, outcomes):
            attempts = d.attempts + 1
            if o.kind in ("sent", "warning"):
                rows.append((d, o.kind, o.status, None))
            elif o.kind == "retry" and attempts < self.config.dispatch.max_attempts:
                rows.append((d, "pending", o.status, now + self.backoff(attempts)))
            else:
                rows.append((d, "parked", o.status, None))
        self.ledger.record_attempts(rows)
        for _, state, _, _ in rows:
            metrics.DELIVERIES.labels(name, "retry" if state == "pending" else state).inc()
        summary = defaultdict(int)
        for _, state, _, _ in rows:
            summary[state] += 1
        last = outcomes[-1].status if outcomes else ""
        if self.audit is not None:
            outcome = {"pending": "retry later"}
            self.audit.record("delivery", job=job_id, destination=name,
                              outcomes={outcome.get(s, s): n for s, n in sorted(summary.items())}, status=last)
        level = logging.INFO if set(summary) <= {"sent"} else logging.WARNING
        log.log(level, "job %s -> %s: %s (%s)", job_id, name,
                ", ".join(f"{n} {'retry later' if s == 'pending' else s}" for s, n in sorted(summary.items())), last)

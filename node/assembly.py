"""Series assembly: decide quickly when a series is complete.

DICOM has no "series done" message. A series is complete when
  * no association is still sending it and nothing arrived for ``quiet_seconds``, or earlier
  * when the header's expected count (ImagesInAcquisition) is reached exactly and every instance
    so far belongs to one acquisition. ImagesInAcquisition counts one acquisition, not the series:
    a series of several acquisitions (some scanners make one per slice or per rotation) shows
    differing AcquisitionNumbers or more instances than expected, and then only the quiet period
    decides. A single-image expectation waits for the association's end (CR/DX are sent alone).
An association that stays silent for ``STALLED_SECONDS`` no longer holds its series open.
Instances arriving after completion re-open the series; the next completion routes it again
with the larger set of instances and the new outputs supersede the earlier ones (a new version).
State is in memory and rebuilt from the spool and the ledger after a restart (:meth:`recover`).
A series is its (Study, Series) UID pair: a Series UID reused in another study is another series.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from node.ledger import Ledger
from node.spool import Spool

log = logging.getLogger(__name__)

STALLED_SECONDS = 300.0  # an open association that sent nothing for this long holds nothing back
ROUTE_RETRY_SECONDS = 30.0  # a series whose routing raised is tried again after this


@dataclass
class OpenSeries:
    study_uid: str
    series_uid: str
    count: int  # instances on disk
    last_activity: float
    expected: int | None = None
    associations: set[int] = field(default_factory=set)
    acquisitions: set[str] = field(default_factory=set)  # AcquisitionNumber values seen ("" when absent)
    not_before: float = 0.0  # monotonic time before which the series is not due (routing retry)
    sops: set[str] = field(default_factory=set)  # SOP UIDs counted: on disk when it opened, or stored since

    @property
    def key(self) -> tuple[str, str]:
        return self.study_uid, self.series_uid

    def complete_by_count(self) -> bool:
        if not self.expected or self.count != self.expected or len(self.acquisitions) > 1:
            return False
        return self.expected > 1 or not self.associations


class Assembler:
    def __init__(self, spool: Spool, ledger: Ledger, quiet_seconds: float):
        self.spool = spool
        self.ledger = ledger
        self.quiet_seconds = quiet_seconds
        self._open: dict[tuple[str, str], OpenSeries] = {}  # by (study, series)
        self._ended: dict[int, None] = {}  # recently ended associations, oldest first
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def instance_stored(self, assoc_id: int, study_uid: str, series_uid: str, new: bool,
                        expected: int | None, acquisition: str = "", sop: str = "") -> None:
        """``sop``: the instance's SOP UID. With it, instances of a new series stored at the same
        moment by several threads (a STOW-RS request's parts, two associations) count once each:
        the files already on disk when the series opens are the ones counted, by UID."""
        now = time.monotonic()
        with self._lock:
            entry = self._open.get((study_uid, series_uid))
            if entry is None:
                if not new:
                    return  # a re-sent instance of a series we already hold: nothing new to do
                on_disk = {p.stem for p in self.spool.instances(study_uid, series_uid)}
                entry = OpenSeries(study_uid, series_uid, len(on_disk) - (0 if sop in on_disk else 1), now,
                                   sops=on_disk if sop else set())
                self._open[entry.key] = entry
            if sop and new:
                new = sop not in entry.sops  # counted when the series opened (stored by another thread)
                entry.sops.add(sop)
            if assoc_id not in self._ended:  # a store that finished after its connection closed
                entry.associations.add(assoc_id)
            entry.last_activity = now
            entry.count += 1 if new else 0
            entry.acquisitions.add(acquisition)
            if expected:
                entry.expected = expected
            if entry.complete_by_count():
                self._wake.set()

    def association_ended(self, assoc_id: int) -> None:
        with self._lock:
            self._ended[assoc_id] = None
            while len(self._ended) > 1000:  # ids of ended associations are only needed briefly
                del self._ended[next(iter(self._ended))]
            self._let_go(assoc_id, self._open.values())
        self._wake.set()

    def release(self, assoc_id: int, series_keys) -> None:
        """``assoc_id`` stays open but no longer holds these (study, series) (a STOW-RS peer moved on)."""
        with self._lock:
            self._let_go(assoc_id, [self._open[key] for key in series_keys if key in self._open])
        self._wake.set()

    @staticmethod
    def _let_go(assoc_id: int, entries) -> None:
        """(Lock held.) ``assoc_id`` no longer holds these series: their quiet period starts now."""
        now = time.monotonic()
        for entry in entries:
            if assoc_id in entry.associations:
                entry.associations.discard(assoc_id)
                entry.last_activity = now

    def association_started(self, assoc_id: int) -> None:
        """``id()`` of a new association may reuse an ended one's: forget that it ended."""
        with self._lock:
            self._ended.pop(assoc_id, None)

    def is_open(self, study_uid: str, series_uid: str) -> bool:
        with self._lock:
            return (study_uid, series_uid) in self._open

    def reopen(self, entry: OpenSeries, after_seconds: float = ROUTE_RETRY_SECONDS) -> None:
        """Put a series back (its routing failed); it is due again after ``after_seconds``."""
        with self._lock:
            current = self._open.setdefault(entry.key, entry)
            current.not_before = time.monotonic() + after_seconds

    def due(self) -> list[OpenSeries]:
        """Series that are complete now; they leave the open set."""
        now = time.monotonic()
        done = []
        with self._lock:
            for key, entry in list(self._open.items()):
                if now < entry.not_before:
                    continue
                idle = now - entry.last_activity
                stalled = idle >= STALLED_SECONDS + self.quiet_seconds
                quiet = (not entry.associations or stalled) and idle >= self.quiet_seconds
                if entry.complete_by_count() or quiet:
                    done.append(self._open.pop(key))
        for entry in done:
            log.info("series %s complete: %d instances (%s), study %s", entry.series_uid, entry.count,
                     "expected count reached" if entry.complete_by_count() else "quiet period", entry.study_uid)
        return done

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def recover(self) -> int:
        """After a restart: every series with instances not yet routed is open again."""
        now = time.monotonic()
        reopened = 0
        for study_uid, series_uid in self.spool.all_series():
            count = len(self.spool.instances(study_uid, series_uid))
            row = self.ledger.series(study_uid, series_uid)
            if count and (row is None or row["routed_count"] != count):
                with self._lock:
                    self._open.setdefault((study_uid, series_uid), OpenSeries(study_uid, series_uid, count, now))
                reopened += 1
        if reopened:
            log.info("recovered %d series with instances not yet processed", reopened)
        return reopened

"""Retention: finished work leaves the spool, its record stays.

A delivered job's folder (spec, outputs, result) goes ``retention.delivered_seconds`` after
delivery; a parked, failed or refused one's after ``retention.failed_seconds`` (kept for
``srnode retry``). A received series' folder goes once every job made from it has gone (or, when it
matched no route, ``delivered_seconds`` after routing), never while it is open or an instance of
it is being stored (:meth:`node.ingest.Ingest.remove_series`). The ledger rows stay (a job's
``purged`` says when) and so does the audit trail (one ``retention`` event a sweep that removed
anything). Folders are first renamed into ``spool/trash/`` (one atomic step), then deleted.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from node.audit import Audit
from node.ingest import Ingest
from node.ledger import Ledger
from node.spool import Spool

log = logging.getLogger(__name__)


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Retention:
    def __init__(self, config, spool: Spool, ledger: Ledger, ingest: Ingest, audit: Audit | None = None):
        self.config = config  # replaced on a config reload
        self.spool = spool
        self.ledger = ledger
        self.ingest = ingest
        self.audit = audit
        self.trash = spool.root / "trash"

    @property
    def interval(self) -> float:
        """Seconds between sweeps: a quarter of the shorter retention, within 1 s .. 60 s."""
        r = self.config.retention
        return max(1.0, min(60.0, min(r.delivered_seconds, r.failed_seconds) / 4))

    def empty_trash(self) -> None:
        """What a sweep cut short (the node stopped mid-delete) left behind."""
        if self.trash.is_dir():
            for path in self.trash.iterdir():
                shutil.rmtree(path, ignore_errors=True)

    def _move(self, folder: Path) -> Path:
        self.trash.mkdir(exist_ok=True)
        target = self.trash / uuid.uuid4().hex
        os.rename(folder, target)
        return target

    @staticmethod
    def _delete(folder: Path) -> int:
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return size

    def sweep(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        r = self.config.retention
        freed, jobs, series = 0, [], 0
        for job in self.ledger.expired_jobs(now - r.delivered_seconds, now - r.failed_seconds):
            folder = self.spool.job_dir(job.id)
            if folder.is_dir():
                freed += self._delete(self._move(folder))
            self.ledger.set_purged(job.id, now)
            jobs.append(job.id)
        for study, series_uid in self.spool.all_series():
            row = self.ledger.series(study, series_uid)
            if row is None or row["routed_at"] is None:
                continue  # not routed yet: the assembler (or recover() after a restart) has it
            made = self.ledger.series_jobs(study, series_uid)
            if any(j.purged is None for j in made):
                continue
            if not made and row["routed_at"] > now - r.delivered_seconds:
                continue
            folder = self.spool.series_dir(study, series_uid)
            if row["routed_count"] != len(self.spool.instances(study, series_uid)):
                continue  # instances arrived since it was routed: they wait for their own route
            box = []
            if self.ingest.remove_series(study, series_uid, lambda: box.append(self._move(folder))):
                freed += self._delete(box[0])
                series += 1
        if jobs or series:
            log.info("retention: removed %d job folder(s) and %d series folder(s) from the spool, %.1f MB",
                     len(jobs), series, freed / 1e6)
            if self.audit is not None:
                self.audit.record("retention", jobs=jobs, series=series, bytes=freed)
        return {"jobs": jobs, "series": series, "bytes": freed}

"""From complete series to jobs on the queue, and from finished jobs to deliveries.

One thread of the node runs :meth:`Scheduler.tick` in a loop:
  1. route every series the assembler says is complete (one job per matching route);
  2. submit pending jobs to the Celery queue;
  3. collect the results of queued jobs (workers write ``result.json`` in the shared spool):
     outputs become deliveries, refusals and failures are recorded with their reason; a job that
     stopped on a full disk waits for space (``waiting_disk``);
  4. every ``DISK_CHECK_S``: put jobs waiting for disk space back to pending once the spool has
     ``retention.min_free_bytes`` free, each no sooner than its back-off (``disk_wait_s``), so a
     disk that fills again at once costs a run every few minutes, not a loop.
"""
from __future__ import annotations

import logging
import shutil
import time

from pydicom import dcmread

from node import metrics
from node.assembly import ROUTE_RETRY_SECONDS, Assembler, OpenSeries
from node.config import Config
from node.audit import Audit
from node.jobs import input_key, read_progress, read_result, write_job_spec
from node.ledger import Job, Ledger
from node.routing import SeriesFacts, select
from node.spool import Spool

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 1.0  # how often running jobs' progress.json is copied into the ledger
PROGRESS_LOG_S = 10.0  # one progress line a running job this often
DISK_CHECK_S = 1.0  # how often jobs waiting for disk space look at the free space
DISK_RETRY_FIRST_S = 2.0  # a job that stopped on a full disk runs again no sooner than this ...
DISK_RETRY_MAX_S = 600.0  # ... doubling each time it stops so again, up to this


def disk_wait_s(waits: int) -> float:
    """The least time a job that stopped on a full disk ``waits`` times waits before it runs again."""
    return min(DISK_RETRY_FIRST_S * 2 ** max(waits - 1, 0), DISK_RETRY_MAX_S)


class Scheduler:
    def __init__(self, config: Config, spool: Spool, ledger: Ledger, assembler: Assembler, submit,
                 audit: Audit | None = None):
        self.config = config
        self.spool = spool
        self.ledger = ledger
        self.assembler = assembler
        self.submit = submit  # callable(job_id) that puts the job on the queue
        self.audit = audit
        self._progress_polled = 0.0
        self._progress_logged: dict[int, float] = {}  # job id -> monotonic time of its last progress line
        self._last_instance: dict[int, float] = {}  # job id -> monotonic time of its series' last activity
        self._disk_checked = 0.0

    def tick(self) -> None:
        for entry in self.assembler.due():
            try:
                self.route(entry)
            except Exception:  # an unreadable header, a full disk: the series waits and is tried again
                log.exception("series %s: routing failed; trying again in %.0f s", entry.series_uid, ROUTE_RETRY_SECONDS)
                self.assembler.reopen(entry)
        for job in self.ledger.jobs(["pending"]):
            self._submit(job)
        queued = self.ledger.jobs(["queued"], limit=1000)
        for job in queued:
            self._collect(job)
        if time.monotonic() - self._progress_polled >= PROGRESS_POLL_S:
            self._progress_polled = time.monotonic()
            self.poll_progress(queued)
        if time.monotonic() - self._disk_checked >= DISK_CHECK_S:
            self._disk_checked = time.monotonic()
            self.resume_disk_waits()

    def resume_disk_waits(self, now: float | None = None) -> list[int]:
        """Jobs waiting for disk space back to pending once the spool has ``retention.min_free_bytes``
        free and their back-off is over; returns their ids."""
        waiting = self.ledger.jobs(["waiting_disk"], limit=1000)
        if not waiting:
            return []
        free = shutil.disk_usage(self.spool.root).free
        if free < self.config.retention.min_free_bytes:
            return []
        now = time.time() if now is None else now
        resumed = []
        for job in waiting:
            if now - job.updated < disk_wait_s(job.disk_waits or 1):
                continue
            self.ledger.run_again(job.id, "disk space is back: running again")
            log.info("job %s (%s/%s) resumes: disk space is back (%d bytes free in the spool)",
                     job.id, job.route, job.pipeline, free)
            resumed.append(job.id)
        return resumed

    def poll_progress(self, jobs: list[Job]) -> None:
        """Copy running jobs' progress into the ledger; log one line a job every PROGRESS_LOG_S."""
        now = time.monotonic()
        running = set()
        for job in jobs:
            progress = read_progress(self.spool, job.id)
            if not progress or (self.ledger.job(job.id) or job).state != "queued":
                continue
            running.add(job.id)
            done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
            fraction = min(done / total, 1.0) if total else 0.0
            self.ledger.set_progress(job.id, progress.get("started"), fraction)
            last = self._progress_logged.get(job.id)
            if last is None:
                self._progress_logged[job.id] = now  # the first line after PROGRESS_LOG_S of running
            elif now - last >= PROGRESS_LOG_S:
                self._progress_logged[job.id] = now
                elapsed = time.time() - float(progress.get("started") or time.time())
                left = f", about {elapsed / fraction - elapsed:.0f} s left" if 0 < fraction < 1 else ""
                log.info("job %s (%s/%s) running %.0f s: %d of %d slices (%.0f%%)%s", job.id, job.route,
                         job.pipeline, elapsed, done, total, 100 * fraction, left)
        for job_id in set(self._progress_logged) - running:
            del self._progress_logged[job_id]

    def route(self, entry: OpenSeries) -> list[Job]:
        files = self.spool.instances(entry.study_uid, entry.series_uid)
        if not files:
            return []
        header = dcmread(files[0], stop_before_pixels=True)
        row = self.ledger.series(entry.study_uid, entry.series_uid)
        facts = SeriesFacts(header, row["calling_ae"] if row else None, len(files))
        config = self.config  # one config for the whole series, even if a reload swaps it meanwhile
        routes = select(config, facts)
        key = input_key(p.stem for p in files)
        details = {"modality": _text(header, "Modality"), "series_description": _text(header, "SeriesDescription"),
                   "instances_in": len(files), "received": row["first_seen"] if row else None}
        if self.audit is not None:
            self.audit.record("series.received", study_uid=entry.study_uid, series_uid=entry.series_uid,
                              instances=len(files), calling_ae=row["calling_ae"] if row else None,
                              address=row["peer_host"] if row else None, routes=[r.name for r in routes])
        jobs = []
        for route in routes:
            job = self.ledger.add_job(entry.series_uid, entry.study_uid, route.name, route.pipeline,
                                      route.options, route.send_to, key, details)
            if job is None:
                log.info("series %s: route %s already ran on these %d instances", entry.series_uid, route.name, len(files))
                continue
            write_job_spec(self.spool, job.id, files, job.pipeline, job.options, job.version)
            metrics.JOBS.labels(job.pipeline, "pending").inc()
            self._last_instance[job.id] = entry.last_activity
            if self.audit is not None:
                self.audit.record("job.created", job=job.id, route=route.name, pipeline=route.pipeline,
                                  options=route.options, send_to=route.send_to, version=job.version,
                                  study_uid=entry.study_uid, series_uid=entry.series_uid, instances=len(files))
            log.info("series %s -> job %s (route %s, pipeline %s, v%d, %d instances)",
                     entry.series_uid, job.id, route.name, route.pipeline, job.version, len(files))
            jobs.append(job)
        if not routes:
            log.info("series %s (%s, %d instances) matched no route", entry.series_uid, header.get("Modality", "?"), len(files))
        self.ledger.mark_routed(entry.study_uid, entry.series_uid, len(files))
        metrics.SERIES_COMPLETED.inc()
        return jobs

    def _submit(self, job: Job) -> None:
        job_dir = self.spool.job_dir(job.id)
        if not (job_dir / "job.json").exists():  # crashed between the ledger row and the spec
            files = self.spool.instances(job.study_uid, job.series_uid)
            if input_key(p.stem for p in files) != job.input_key:
                # More instances arrived since: the series was re-opened and a newer job covers them.
                self.ledger.set_job_state(job.id, "failed", "superseded: inputs changed before the job was written")
                return
            write_job_spec(self.spool, job.id, files, job.pipeline, job.options, job.version)
        result = read_result(self.spool, job.id)
        if result is not None and result["state"] != "done":  # `srnode retry` of a failed run
            (job_dir / "result.json").unlink()
            (job_dir / "starts").unlink(missing_ok=True)
            (job_dir / "progress.json").unlink(missing_ok=True)
        # Recorded before it is queued: a ledger that cannot be written (a full disk) must not leave
        # a pending job that every tick queues again.
        self.ledger.set_job_state(job.id, "queued")
        try:
            self.submit(job.id)
        except Exception:
            self.ledger.set_job_state(job.id, "pending", "could not be queued; trying again")
            raise
        metrics.JOBS.labels(job.pipeline, "queued").inc()
        last = self._last_instance.pop(job.id, None)
        if last is not None:
            metrics.COMPLETION_LATENCY.observe(time.monotonic() - last)

    def _collect(self, job: Job) -> None:
        result = read_result(self.spool, job.id)
        if result is None:
            return
        full = result["state"] == "failed" and bool(result.get("disk_full"))
        metrics.JOBS.labels(job.pipeline, "waiting_disk" if full else result["state"]).inc()
        if result.get("started") and result.get("finished"):
            metrics.JOB_DURATION.labels(job.pipeline).observe(max(result["finished"] - result["started"], 0))
        outputs = result.get("outputs") or []
        self.ledger.set_finished(job.id, result.get("started"), result.get("finished") or time.time(), len(outputs))
        if self.audit is not None:
            self.audit.record("job.finished", job=job.id, state=result["state"], route=job.route,
                              pipeline=job.pipeline, models=result.get("models", []),
                              software_version=result.get("software_version"),  # None: a result from before it was recorded
                              instances_out=len(outputs),
                              reason=result.get("reason"))
        if result["state"] == "done":
            outputs = [(o["sop_uid"], o["file"]) for o in result["outputs"]]
            if not outputs:
                self.ledger.set_job_state(job.id, "delivered", "pipeline produced no output")
                metrics.JOBS.labels(job.pipeline, "delivered").inc()
                return
            self.ledger.add_deliveries(job.id, outputs, job.send_to)
            log.info("job %s done: %d outputs to %s", job.id, len(outputs), ", ".join(job.send_to))
        elif full:
            reason = (f"waiting for disk space: {result.get('reason')}; runs again once the spool has "
                      f"retention.min_free_bytes ({self.config.retention.min_free_bytes} bytes) free")
            self.ledger.wait_for_disk(job.id, reason)
            waits = (self.ledger.job(job.id) or job).disk_waits or 1
            log.warning("job %s (%s/%s) parked, %s (no sooner than %.0f s)", job.id, job.route, job.pipeline,
                        reason, disk_wait_s(waits))
        else:
            self.ledger.set_job_state(job.id, result["state"], result.get("reason"))
            log.warning("job %s %s: %s", job.id, result["state"], result.get("reason"))

    def resubmit_unfinished(self, older_than: float | None = None) -> int:
        """Put queued jobs without a result back on the queue: all of them after a restart, or
        those queued before ``older_than`` (a broker that lost its messages, e.g. a Redis restart
        without persistence). A job that runs twice yields its outputs once (node.jobs)."""
        count = 0
        for job in self.ledger.jobs(["queued"], limit=100000):
            if older_than is not None and job.updated >= older_than:
                continue
            if read_result(self.spool, job.id) is None:
                self.submit(job.id)
                self.ledger.set_job_state(job.id, "queued")  # restarts the clock
                count += 1
        if count:
            log.info("re-submitted %d unfinished jobs", count)
        return count



def _text(ds, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a header from the wild
        return None
    return None if value is None else str(value).strip()[:64]

"""From complete series to jobs on the queue, and from finished jobs to deliveries.

One thread of the node runs :meth:`Scheduler.tick` in a loop:
  1. route every series the assembler says is complete (one job per matching route);
  2. submit pending jobs to the Celery queue;
  3. collect the results of queued jobs (workers write ``result.json`` in the shared spool):
     outputs become deliveries, refusals and failures are recorded with their reason.
"""
from __future__ import annotations

import logging
import time

from pydicom import dcmread

from node import metrics
from node.assembly import ROUTE_RETRY_SECONDS, Assembler, OpenSeries
from node.config import Config
from node.jobs import input_key, read_result, write_job_spec
from node.ledger import Job, Ledger
from node.routing import SeriesFacts, select
from node.spool import Spool

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: Config, spool: Spool, ledger: Ledger, assembler: Assembler, submit):
        self.config = config
        self.spool = spool
        self.ledger = ledger
        self.assembler = assembler
        self.submit = submit  # callable(job_id) that puts the job on the queue
        self._last_instance: dict[int, float] = {}  # job id -> monotonic time of its series' last activity

    def tick(self) -> None:
        for entry in self.assembler.due():
            try:
                self.route(entry)
            except Exception:  # an unreadable header, a full disk: the series waits and is tried again
                log.exception("series %s: routing failed; trying again in %.0f s", entry.series_uid, ROUTE_RETRY_SECONDS)
                self.assembler.reopen(entry)
        for job in self.ledger.jobs(["pending"]):
            self._submit(job)
        for job in self.ledger.jobs(["queued"], limit=1000):
            self._collect(job)

    def route(self, entry: OpenSeries) -> list[Job]:
        files = self.spool.instances(entry.study_uid, entry.series_uid)
        if not files:
            return []
        header = dcmread(files[0], stop_before_pixels=True)
        row = self.ledger.series(entry.series_uid)
        facts = SeriesFacts(header, row["calling_ae"] if row else None, len(files))
        routes = select(self.config, facts)
        key = input_key(p.stem for p in files)
        jobs = []
        for route in routes:
            job = self.ledger.add_job(entry.series_uid, entry.study_uid, route.name, route.pipeline,
                                      route.options, route.send_to, key)
            if job is None:
                log.info("series %s: route %s already ran on these %d instances", entry.series_uid, route.name, len(files))
                continue
            write_job_spec(self.spool, job.id, files, job.pipeline, job.options, job.version)
            metrics.JOBS.labels(job.pipeline, "pending").inc()
            self._last_instance[job.id] = entry.last_activity
            log.info("series %s -> job %s (route %s, pipeline %s, v%d, %d instances)",
                     entry.series_uid, job.id, route.name, route.pipeline, job.version, len(files))
            jobs.append(job)
        if not routes:
            log.info("series %s (%s, %d instances) matched no route", entry.series_uid, header.get("Modality", "?"), len(files))
        self.ledger.mark_routed(entry.series_uid, len(files))
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
        metrics.JOBS.labels(job.pipeline, result["state"]).inc()
        if "seconds" in result:
            metrics.JOB_DURATION.labels(job.pipeline).observe(result["seconds"])
        if result["state"] == "done":
            outputs = [(o["sop_uid"], o["file"]) for o in result["outputs"]]
            if not outputs:
                self.ledger.set_job_state(job.id, "delivered", "pipeline produced no output")
                metrics.JOBS.labels(job.pipeline, "delivered").inc()
                return
            self.ledger.add_deliveries(job.id, outputs, job.send_to)
            log.info("job %s done: %d outputs to %s", job.id, len(outputs), ", ".join(job.send_to))
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


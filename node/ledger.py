"""The node's ledger: series, jobs and deliveries in one SQLite file (WAL) inside the spool.

Instances are not rows: a received instance is its fsync'd file in the spool. The ledger records
what was decided about them: which series were routed with which instances, which jobs ran,
and the state of every (output instance, destination) pair. The CLI (``srnode jobs``,
``srnode retry``) reads and writes the same file while the node runs.

Job states: ``pending`` (to submit) -> ``queued`` (on the Celery queue) -> ``dispatching``
(outputs ready, deliveries under way) -> ``delivered`` | ``parked`` (a delivery gave up);
or ``refused`` (the pipeline said why it cannot process the series) | ``failed`` (an error);
or ``waiting_disk`` (the spool's disk filled up while it ran: back to ``pending`` once there is
space again, node.scheduler; ``disk_waits`` counts how often).
Delivery states: ``pending`` -> ``sent`` | ``warning`` (stored with a warning status) | ``parked``.

Each job also keeps what an admin asks about: the series' modality and description, instances
in and out, its timeline (``received``: the series' first instance; ``created``: the series was
complete; ``started``/``finished``: the worker's run; ``delivered``), ``progress`` (0..1 while it
runs) and ``purged`` (when retention removed its files from the spool; the row stays).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_ae TEXT,
    peer_host TEXT,
    first_seen REAL NOT NULL,
    routed_count INTEGER NOT NULL DEFAULT 0,
    routed_at REAL,
    PRIMARY KEY (study_uid, series_uid)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    options TEXT NOT NULL,
    send_to TEXT NOT NULL,
    input_key TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (study_uid, series_uid, route, input_key)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_status TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (job_id, sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""

ACTIVE_JOB_STATES = ("pending", "queued", "dispatching")
JOB_STATES = ("pending", "queued", "dispatching", "delivered", "parked", "refused", "failed", "waiting_disk")

# Columns added to ``jobs`` after the first release: added to an older ledger when it is opened.
JOB_DETAILS = {
    "modality": "TEXT", "series_description": "TEXT", "instances_in": "INTEGER", "instances_out": "INTEGER",
    "received": "REAL", "started": "REAL", "finished": "REAL", "delivered": "REAL", "progress": "REAL",
    "purged": "REAL", "disk_waits": "INTEGER",
}

# Ledgers written before a series was identified by (Study, Series) UID keyed it by Series UID
# alone: a second study reusing a Series UID was never routed. Their tables are rebuilt once.
_REKEYED = ("series", "jobs")


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    study_uid: str
    route: str
    pipeline: str
    options: dict[str, Any]
    send_to: list[str]
    input_key: str
    version: int
    state: str
    reason: str | None
    created: float
    updated: float
    modality: str | None = None
    series_description: str | None = None
    instances_in: int | None = None
    instances_out: int | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    delivered: float | None = None
    progress: float | None = None
    purged: float | None = None
    disk_waits: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["options"] = json.loads(data["options"])
        data["send_to"] = json.loads(data["send_to"])
        return cls(**data)


@dataclass(frozen=True)
class Delivery:
    job_id: int
    sop_uid: str
    destination: str
    path: str
    state: str
    attempts: int
    next_at: float
    last_status: str | None
    updated: float


class Ledger:
    """Thread-safe access to the ledger file (one connection, one lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._rekey_by_study()
        self._db.executescript(SCHEMA)
        with self._lock:
            self._add_job_details()

    def _add_job_details(self) -> None:
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in JOB_DETAILS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _rekey_by_study(self) -> None:
        """Rebuild the tables of a ledger keyed by Series UID alone (``_REKEYED``), in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # another process (the CLI) may open it at the same time
            try:
                keys = [r["name"] for r in self._db.execute("PRAGMA table_info(series)") if r["pk"]]
                if keys == ["series_uid"]:  # else new, or already rebuilt
                    for table in _REKEYED:
                        self._db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
                    for statement in filter(str.strip, SCHEMA.split(";")):
                        self._db.execute(statement)
                    self._add_job_details()
                    for table in _REKEYED:
                        old = [r[1] for r in self._db.execute(f"PRAGMA table_info(old_{table})")]
                        new = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                        columns = ", ".join(c for c in old if c in new)
                        self._db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM old_{table}")
                        self._db.execute(f"DROP TABLE old_{table}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- series ---------------------------------------------------------------------------
    def note_series(self, series_uid: str, study_uid: str, calling_ae: str, peer_host: str) -> None:
        """Record who sent a series (first sender wins; later senders do not rewrite history)."""
        self._q(
            "INSERT OR IGNORE INTO series (series_uid, study_uid, calling_ae, peer_host, first_seen)"
            " VALUES (?, ?, ?, ?, ?)",
            (series_uid, study_uid, calling_ae, peer_host, time.time()),
        )

    def series(self, study_uid: str, series_uid: str) -> sqlite3.Row | None:
        """A series is (Study, Series) UID: a Series UID reused in another study is another series."""
        rows = self._q("SELECT * FROM series WHERE study_uid = ? AND series_uid = ?", (study_uid, series_uid))
        return rows[0] if rows else None

    def mark_routed(self, study_uid: str, series_uid: str, count: int) -> None:
        self._q(
            "UPDATE series SET routed_count = ?, routed_at = ? WHERE study_uid = ? AND series_uid = ?",
            (count, time.time(), study_uid, series_uid),
        )

    # -- jobs -----------------------------------------------------------------------------
    def add_job(
        self, series_uid: str, study_uid: str, route: str, pipeline: str,
        options: dict[str, Any], send_to: list[str], input_key: str, details: dict[str, Any] | None = None,
    ) -> Job | None:
        """A new pending job, or ``None`` when this route already ran on exactly these inputs.
        ``details``: any of modality, series_description, instances_in, received."""
        now = time.time()
        with self._lock:
            if self._q(
                "SELECT 1 FROM jobs WHERE study_uid = ? AND series_uid = ? AND route = ? AND input_key = ?",
                (study_uid, series_uid, route, input_key),
            ):
                return None
            version = 1 + self._q(
                "SELECT COUNT(*) FROM jobs WHERE study_uid = ? AND series_uid = ? AND route = ?",
                (study_uid, series_uid, route),
            )[0][0]
            details = {k: v for k, v in (details or {}).items()
                       if k in ("modality", "series_description", "instances_in", "received")}
            extra = "".join(f", {k}" for k in details)
            cur = self._db.execute(
                "INSERT INTO jobs (series_uid, study_uid, route, pipeline, options, send_to, input_key,"
                f" version, state, created, updated{extra}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?"
                + ", ?" * len(details) + ")",
                (series_uid, study_uid, route, pipeline, json.dumps(options, sort_keys=True),
                 json.dumps(send_to), input_key, version, now, now, *details.values()),
            )
            return self.job(cur.lastrowid)

    def job(self, job_id: int) -> Job | None:
        rows = self._q("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def jobs(self, states: Iterable[str] | None = None, limit: int = 100, newest_first: bool = False) -> list[Job]:
        """Jobs in any of ``states`` (all when ``None``), oldest first (the order of work) or newest."""
        order = "DESC" if newest_first else "ASC"
        if states is None:
            rows = self._q(f"SELECT * FROM jobs ORDER BY id {order} LIMIT ?", (limit,))
        else:
            states = tuple(states)
            marks = ",".join("?" * len(states))
            rows = self._q(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id {order} LIMIT ?", (*states, limit))
        return [Job.from_row(r) for r in rows]

    def count_jobs(self, states: Iterable[str]) -> int:
        states = tuple(states)
        return self._q(f"SELECT COUNT(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})", states)[0][0]

    def set_job_state(self, job_id: int, state: str, reason: str | None = None) -> None:
        self._q("UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE id = ?", (state, reason, time.time(), job_id))

    def wait_for_disk(self, job_id: int, reason: str) -> None:
        """The job stopped on a full disk: it waits for space (node.scheduler resumes it)."""
        self._q("UPDATE jobs SET state = 'waiting_disk', reason = ?, updated = ?, disk_waits = COALESCE(disk_waits, 0) + 1"
                " WHERE id = ?", (reason, time.time(), job_id))

    def run_again(self, job_id: int, reason: str) -> None:
        """A finished job back to ``pending``: its pipeline runs again (retry, disk space back)."""
        self._q("UPDATE jobs SET state = 'pending', reason = ?, updated = ?, started = NULL, finished = NULL,"
                " progress = NULL WHERE id = ?", (reason, time.time(), job_id))

    def set_progress(self, job_id: int, started: float | None, progress: float | None) -> None:
        """What the worker's ``progress.json`` says of a running job (node.jobs)."""
        self._q("UPDATE jobs SET started = COALESCE(?, started), progress = ? WHERE id = ?",
                (started, progress, job_id))

    def set_finished(self, job_id: int, started: float | None, finished: float, instances_out: int) -> None:
        self._q("UPDATE jobs SET started = COALESCE(?, started), finished = ?, instances_out = ?, progress = NULL"
                " WHERE id = ?", (started, finished, instances_out, job_id))

    def expired_jobs(self, delivered_before: float, failed_before: float) -> list[Job]:
        """Finished jobs whose files retention removes: delivered before ``delivered_before``;
        parked, failed or refused (last changed) before ``failed_before``."""
        rows = self._q(
            "SELECT * FROM jobs WHERE purged IS NULL AND ((state = 'delivered' AND COALESCE(delivered, updated) < ?)"
            " OR (state IN ('parked', 'failed', 'refused') AND updated < ?)) ORDER BY id",
            (delivered_before, failed_before))
        return [Job.from_row(r) for r in rows]

    def series_jobs(self, study_uid: str, series_uid: str) -> list[Job]:
        rows = self._q("SELECT * FROM jobs WHERE study_uid = ? AND series_uid = ? ORDER BY id", (study_uid, series_uid))
        return [Job.from_row(r) for r in rows]

    def set_purged(self, job_id: int, when: float) -> None:
        self._q("UPDATE jobs SET purged = ? WHERE id = ?", (when, job_id))

    def add_deliveries(self, job_id: int, outputs: list[tuple[str, str]], destinations: list[str]) -> None:
        """Outputs ``(sop_uid, spool-relative path)`` to each destination; job -> dispatching."""
        now = time.time()
        statements = [
            ("INSERT OR IGNORE INTO deliveries (job_id, sop_uid, destination, path, state, next_at, updated)"
             " VALUES (?, ?, ?, ?, 'pending', ?, ?)", (job_id, sop, dest, path, now, now))
            for sop, path in outputs for dest in destinations
        ]
        statements.append(("UPDATE jobs SET state = 'dispatching', reason = NULL, updated = ? WHERE id = ?", (now, job_id)))
        self._tx(statements)

    # -- deliveries -----------------------------------------------------------------------
    def due_deliveries(self, now: float, limit: int = 500) -> list[Delivery]:
        rows = self._q(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY job_id, destination, sop_uid LIMIT ?",
            (now, limit),
        )
        return [Delivery(**dict(r)) for r in rows]

    def next_delivery_due(self) -> float | None:
        return self._q("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'")[0][0]

    def deliveries(self, job_id: int) -> list[Delivery]:
        rows = self._q("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination, sop_uid", (job_id,))
        return [Delivery(**dict(r)) for r in rows]

    def record_attempts(self, results: list[tuple[Delivery, str, str, float | None]]) -> None:
        """Each ``(delivery, new_state, status_text, next_at)``; attempts counted once each."""
        now = time.time()
        self._tx([
            ("UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, next_at = ?, updated = ?"
             " WHERE job_id = ? AND sop_uid = ? AND destination = ?",
             (state, status, next_at if next_at is not None else d.next_at, now, d.job_id, d.sop_uid, d.destination))
            for d, state, status, next_at in results
        ])

    def settle_job(self, job_id: int) -> str | None:
        """Once no delivery of a dispatching job is pending: delivered, or parked if any gave up.

        One transaction, so that a concurrent ``srnode retry`` (another process) that re-queues
        deliveries is never overwritten by a verdict taken before it.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                states = {r[0] for r in self._db.execute(
                    "SELECT DISTINCT state FROM deliveries WHERE job_id = ?", (job_id,))}
                final = None
                if "pending" not in states:
                    final, reason = ("parked", None) if "parked" in states else ("delivered", None)
                    if final == "parked":
                        row = self._db.execute(
                            "SELECT destination, last_status FROM deliveries WHERE job_id = ? AND state = 'parked'"
                            " LIMIT 1", (job_id,)).fetchone()
                        reason = f"delivery to {row[0]} gave up: {row[1]}"
                    now = time.time()
                    self._db.execute(
                        "UPDATE jobs SET state = ?, reason = ?, updated = ?, delivered = ? WHERE id = ?"
                        " AND state = 'dispatching'",
                        (final, reason, now, now if final == "delivered" else None, job_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return final

    def destinations_of(self, job_id: int) -> dict[str, dict[str, Any]]:
        """Per destination of a job: instances by delivery state, attempts, the last status and when."""
        out: dict[str, dict[str, Any]] = {}
        for r in self._q(
            "SELECT destination, state, COUNT(*), MAX(attempts), MAX(updated) FROM deliveries WHERE job_id = ?"
            " GROUP BY destination, state", (job_id,)):
            entry = out.setdefault(r[0], {"instances": {}, "attempts": 0, "updated": None, "last_status": None})
            entry["instances"][r[1]] = r[2]
            entry["attempts"] = max(entry["attempts"], r[3])
            entry["updated"] = max(entry["updated"] or 0, r[4])
        for name, entry in out.items():
            row = self._q("SELECT last_status FROM deliveries WHERE job_id = ? AND destination = ?"
                          " ORDER BY updated DESC LIMIT 1", (job_id, name))
            entry["last_status"] = row[0][0] if row else None
        return out

    def last_deliveries(self) -> dict[str, dict[str, Any]]:
        """Per destination: its most recent delivery attempt (job, state, status, when)."""
        rows = self._q(
            "SELECT d.destination, d.job_id, d.state, d.last_status, d.updated FROM deliveries d"
            " JOIN (SELECT destination, MAX(updated) AS u FROM deliveries WHERE attempts > 0 GROUP BY destination) m"
            " ON d.destination = m.destination AND d.updated = m.u WHERE d.attempts > 0")
        return {r[0]: {"job_id": r[1], "state": r[2], "status": r[3], "at": r[4]} for r in rows}

    def describe(self, job: Job, deliveries: bool = False) -> dict[str, Any]:
        """A job as ``srnode jobs --json`` and the admin API show it; with each destination's
        delivery status when ``deliveries``."""
        view = {
            "id": job.id, "state": job.state, "route": job.route, "pipeline": job.pipeline, "version": job.version,
            "study_uid": job.study_uid, "series_uid": job.series_uid, "modality": job.modality,
            "series_description": job.series_description, "instances_in": job.instances_in,
            "instances_out": job.instances_out, "received": job.received, "complete": job.created,
            "started": job.started, "finished": job.finished, "delivered": job.delivered,
            "progress": job.progress if job.state == "queued" and job.started and not job.finished else None,
            "reason": job.reason, "updated": job.updated, "purged": job.purged, "disk_waits": job.disk_waits or 0,
            "send_to": job.send_to, "deliveries": self.delivery_counts(job.id),
        }
        if deliveries:
            view["destinations"] = self.destinations_of(job.id)
        return view

    def delivery_counts(self, job_id: int) -> dict[str, int]:
        return {r[0]: r[1] for r in self._q(
            "SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,))}

    def retry(self, job_id: int) -> str:
        """Replay a parked, failed or refused job (or one waiting for disk space, at once). Returns
        what was done (for the CLI)."""
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        now = time.time()
        if job.purged:
            return (f"job {job_id} is {job.state}: its files left the spool at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.purged))} (retention); nothing to retry")
        if job.state in ("parked", "delivered"):
            parked = self._q("SELECT COUNT(*) FROM deliveries WHERE job_id = ? AND state = 'parked'", (job_id,))[0][0]
            if not parked:
                return f"job {job_id} is {job.state}: nothing to retry"
            self._tx([
                ("UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?, updated = ?"
                 " WHERE job_id = ? AND state = 'parked'", (now, now, job_id)),
                ("UPDATE jobs SET state = 'dispatching', reason = NULL, updated = ? WHERE id = ?", (now, job_id)),
            ])
            return f"job {job_id}: {parked} parked deliveries queued again"
        if job.state in ("failed", "refused", "waiting_disk"):
            self.run_again(job_id, "retry requested")
            return f"job {job_id}: pipeline queued to run again"
        return f"job {job_id} is {job.state}: still in progress, nothing to retry"

"""The node's ledger: series, jobs and deliveries in one SQLite file (WAL) inside the spool.

Instances are not rows: a received instance is its fsync'd file in the spool. The ledger records
what was decided about them: which series were routed with which instances, which jobs ran,
and the state of every (output instance, destination) pair. The CLI (``srnode jobs``,
``srnode retry``) reads and writes the same file while the node runs.

Job states: ``pending`` (to submit) -> ``queued`` (on the Celery queue) -> ``dispatching``
(outputs ready, deliveries under way) -> ``delivered`` | ``parked`` (a delivery gave up);
or ``refused`` (the pipeline said why it cannot process the series) | ``failed`` (an error).
Delivery states: ``pending`` -> ``sent`` | ``warning`` (stored with a warning status) | ``parked``.
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
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT,
    peer_host TEXT,
    first_seen REAL NOT NULL,
    routed_count INTEGER NOT NULL DEFAULT 0,
    routed_at REAL
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
    UNIQUE (series_uid, route, input_key)
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
        self._db.executescript(SCHEMA)

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

    def series(self, series_uid: str) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def mark_routed(self, series_uid: str, count: int) -> None:
        self._q(
            "UPDATE series SET routed_count = ?, routed_at = ? WHERE series_uid = ?",
            (count, time.time(), series_uid),
        )

    # -- jobs -----------------------------------------------------------------------------
    def add_job(
        self, series_uid: str, study_uid: str, route: str, pipeline: str,
        options: dict[str, Any], send_to: list[str], input_key: str,
    ) -> Job | None:
        """A new pending job, or ``None`` when this route already ran on exactly these inputs."""
        now = time.time()
        with self._lock:
            if self._q(
                "SELECT 1 FROM jobs WHERE series_uid = ? AND route = ? AND input_key = ?",
                (series_uid, route, input_key),
            ):
                return None
            version = 1 + self._q(
                "SELECT COUNT(*) FROM jobs WHERE series_uid = ? AND route = ?", (series_uid, route)
            )[0][0]
            cur = self._db.execute(
                "INSERT INTO jobs (series_uid, study_uid, route, pipeline, options, send_to, input_key,"
                " version, state, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (series_uid, study_uid, route, pipeline, json.dumps(options, sort_keys=True),
                 json.dumps(send_to), input_key, version, now, now),
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
                    self._db.execute(
                        "UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE id = ? AND state = 'dispatching'",
                        (final, reason, time.time(), job_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return final

    def delivery_counts(self, job_id: int) -> dict[str, int]:
        return {r[0]: r[1] for r in self._q(
            "SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,))}

    def retry(self, job_id: int) -> str:
        """Replay a parked, failed or refused job. Returns what was done (for the CLI)."""
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        now = time.time()
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
        if job.state in ("failed", "refused"):
            self.set_job_state(job_id, "pending", "retry requested")
            return f"job {job_id}: pipeline queued to run again"
        return f"job {job_id} is {job.state}: still in progress, nothing to retry"

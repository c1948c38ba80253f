"""The audit trail: who sent what, what ran on it, where it went, and what admins did.

One JSON object a line, appended to ``audit/<UTC date>.jsonl`` in the spool and fsync'd before
``record`` returns (as durable as the ledger). Retention never removes it. Events carry UIDs, AE
titles, addresses, route/pipeline/destination/token names and statuses: never patient names,
IDs or birth dates (tests/test_audit.py sends a study with known PHI and greps for it).

Events (``event`` field): ``association.accepted`` / ``association.rejected`` (DICOM),
``stow.accepted`` / ``stow.rejected`` (STOW-RS requests), ``series.received``,
``job.created``, ``job.finished``, ``delivery``, ``job.settled`` (delivered or parked), ``admin``,
``config.reload``, ``retention``.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from node.spool import fsync_dir


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


class Audit:
    """Appends events; thread-safe; several processes may append (O_APPEND, one write a line)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        entry = {"ts": round(now, 6),
                 "at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds"),
                 "event": event, **fields}
        line = (json.dumps(entry, default=str, ensure_ascii=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.folder / f"{_day(now)}.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short by a crash stays alone
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not size:  # a day's first line: its file's name must survive a crash too
                fsync_dir(self.folder)
        return entry


def read(folder: Path, since: float | None = None, limit: int | None = None,
         newest_first: bool = False) -> list[dict[str, Any]]:
    """Events at or after ``since`` (epoch seconds), oldest first; the newest ``limit`` of them."""
    events = list(_events(Path(folder), since))
    if limit is not None:
        events = events[-limit:] if limit > 0 else []
    return events[::-1] if newest_first else events


def _events(folder: Path, since: float | None) -> Iterator[dict[str, Any]]:
    first_day = _day(since) if since is not None else ""
    for path in sorted(folder.glob("*.jsonl")):
        if path.stem < first_day:
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut by a crash mid-write: skip it, keep the rest
                    continue
                if since is None or entry.get("ts", 0) >= since:
                    yield entry


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: seconds ago with a unit (``90s``, ``15m``, ``2h``, ``7d``), an ISO date or time
    (UTC unless it says otherwise), or epoch seconds."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        try:
            return now - float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give an age (90s, 15m, 2h, 7d), an ISO date/time or epoch seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()

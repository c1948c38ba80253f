"""The spool: every file the node holds, laid out so that state is visible on disk.

```
spool/
  ledger.sqlite3                      series, jobs, deliveries (node.ledger)
  series/<study>/<series>/<sop>.dcm   received instances, exactly as sent (fsync'd before the ack)
  jobs/<id>/job.json                  what a worker must do (inputs, pipeline, options, uid seed)
  jobs/<id>/out/*.dcm                 outputs, renamed into place only when complete
  jobs/<id>/result.json               the worker's verdict: done / refused / failed
  jobs/<id>/progress.json             a running job's slices done / total (advisory)
  incoming/.tmp-*.dcm                 large instances being received / checked (node.spill)
  audit/<date>.jsonl                  the audit trail (node.audit), kept past retention
  broker/                             the embedded Celery broker's messages
```
A worker on another host needs only this folder (mounted at the same path) and the broker.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(value: object) -> bool:
    """A DICOM UID that is also safe as a file name (no path tricks)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID.match(value))


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota: ENOSPC/EDQUOT, or
    SQLite's SQLITE_FULL ("database or disk is full")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries), or a file, through a read-only descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_copy(path: Path, data: bytes, durable: bool) -> str:
    """A ``.tmp-*`` file beside ``path`` holding ``data`` (fsync'd with ``durable``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or nothing.

    With ``durable`` the data and the directory entry are fsync'd before returning: once this
    returns, the file survives a crash of the process and of the machine.
    """
    tmp = _temporary_copy(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS)
_NO_LINK_LOCK = threading.Lock()


def _durable(path: Path) -> str:
    """``path`` (a file written by another writer) fsync'd."""
    fsync_dir(path)  # a read-only descriptor fsyncs a file as well as a folder
    return str(path)


def write_new(path: Path, data: bytes | Path) -> bool:
    """:func:`write_atomic` (durable) that never replaces: False (nothing written) when ``path``
    exists, even if another thread creates it at the same moment (the link is the atomic step).
    ``data`` is the bytes, or a file on the same file system (a large instance, node.spill),
    fsync'd and hard-linked as ``path`` (moved where there are no hard links); the caller removes it."""
    own = not isinstance(data, Path)
    tmp = _temporary_copy(path, data, durable=True) if own else _durable(data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            fsync_dir(path.parent)  # the first writer may not have made it durable yet
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            with _NO_LINK_LOCK:  # the check and the rename as one step (only this process writes here)
                if path.exists():
                    return False
                os.replace(tmp, path)
    finally:
        if own:
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def remove_partial_writes(root: Path) -> int:
    """Delete the ``.tmp-*`` files that writes cut short by a crash left in ``root``'s folders; run
    at start, when nothing is writing there. Returns how many."""
    stale = list(Path(root).glob("*/*/.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a crash: each one's entry is fsync'd in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure(self) -> "Spool":
        for sub in ("series", "jobs", "broker", "incoming"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite3"

    @property
    def incoming_dir(self) -> Path:
        """Large instances being received or checked (node.spill); same file system as series/."""
        return self.root / "incoming"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / "series" / study_uid / series_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(study_uid, series_uid) / f"{sop_uid}.dcm"

    def instances(self, study_uid: str, series_uid: str) -> list[Path]:
        """The series' instance files; not the ``.tmp-*`` of a write cut short by a crash."""
        folder = self.series_dir(study_uid, series_uid)
        return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(".")) if folder.is_dir() else []

    def all_series(self) -> list[tuple[str, str]]:
        """(study, series) of every series folder, for rebuilding state after a restart."""
        base = self.root / "series"
        return [(s.parent.name, s.name) for s in sorted(base.glob("*/*")) if s.is_dir()]

    def job_dir(self, job_id: int) -> Path:
        return self.root / "jobs" / str(job_id)

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def abs(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{rel!r} points outside the spool")
        return path

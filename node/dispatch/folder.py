"""Folder destination: outputs copied to ``<path>/<study>/<series>/<sop>.dcm`` atomically."""
from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from node.config import FolderDestination
from node.dispatch.outcome import Outcome
from node.spool import write_atomic


def store(dest: FolderDestination, paths: list[Path]) -> list[Outcome]:
    outcomes = []
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
            target = dest.path / header.StudyInstanceUID / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, path.read_bytes())
            outcomes.append(Outcome("sent", f"written to {dest.path}"))
        except OSError as exc:
            outcomes.append(Outcome("retry", f"cannot write to {dest.path}: {exc.strerror}"))
    return outcomes


def check(dest: FolderDestination) -> tuple[bool, str]:
    try:
        dest.path.mkdir(parents=True, exist_ok=True)
        probe = dest.path / ".srnode-write-check"
        probe.write_bytes(b"")
        probe.unlink()
        return True, f"folder {dest.path} is writable"
    except OSError as exc:
        return False, f"folder {dest.path} is not writable: {exc.strerror}"

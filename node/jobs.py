"""Running a pipeline on one series: shared by Celery workers and ``srnode process``.

A job is idempotent. Its outputs get UIDs derived from the inputs, the pipeline, the options and
the software version (:func:`uid_seed`), they are written to a temporary folder that is renamed
into place only when complete, and a finished job (``result.json`` present) returns at once.
So a job that runs twice (worker killed mid-job, broker redelivery) yields the same instances
once, never a second series.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydicom import Dataset, dcmread

import node
import pipelines
from node.spool import Spool, read_json, write_atomic, write_json

log = logging.getLogger(__name__)


def input_key(sop_uids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()[:32]


def uid_seed(pipeline: str, options: Mapping[str, Any], key: str, software_version: str) -> str:
    return json.dumps([pipeline, dict(options), key, software_version], sort_keys=True, default=str)


@dataclass(frozen=True)
class Output:
    path: Path
    sop_uid: str
    series_uid: str
    sop_class_uid: str


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run_pipeline(
    datasets: Sequence[Dataset],
    pipeline: str,
    options: Mapping[str, Any],
    out_dir: Path,
    version: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Output]:
    """Validate options, run the pipeline and write every output to ``out_dir`` (fsync'd).

    Raises :class:`pipelines.Refusal` when the pipeline refuses the input, ``ValueError`` for bad
    options.
    """
    pipe = pipelines.get(pipeline)
    opts = pipe.validate_options(options)
    key = input_key(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    context = pipelines.RunContext(
        uid_seed=uid_seed(pipeline, opts, key, node.__version__),
        version=version,
        software_version=node.__version__,
        progress=progress,
    )
    outputs = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for ds in pipe.run(datasets, opts, context):
        path = out_dir / f"{len(outputs) + 1:05d}.dcm"
        write_atomic(path, encode(ds))
        outputs.append(Output(path, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID))
    return outputs


def write_job_spec(spool: Spool, job_id: int, inputs: list[Path], pipeline: str,
                   options: Mapping[str, Any], version: int) -> None:
    job_dir = spool.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "job.json", {
        "job_id": job_id,
        "inputs": [spool.rel(p) for p in inputs],
        "pipeline": pipeline,
        "options": dict(options),
        "version": version,
    })


def read_result(spool: Spool, job_id: int) -> dict[str, Any] | None:
    path = spool.job_dir(job_id) / "result.json"
    return read_json(path) if path.exists() else None


MAX_STARTS = 3  # a job interrupted this many times (worker OOM, segfault, node killed) fails instead of looping


def execute_job(spool: Spool, job_id: int) -> dict[str, Any]:
    """Run job ``job_id`` from its spool folder; returns (and writes) its ``result.json``.

    Whatever happens short of the process dying, a result is written, so the node never waits
    for a job that will not finish.
    """
    job_dir = spool.job_dir(job_id)
    done = read_result(spool, job_id)
    if done is not None:
        log.info("job %s already finished (%s), nothing to do", job_id, done["state"])
        return done
    started = time.monotonic()
    try:
        result = _run(spool, job_id)
    except Exception as exc:  # the job fails with its reason; the worker keeps serving
        log.exception("job %s failed", job_id)
        result = {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - started, 3)  # the node's srnode_job_duration_seconds
    if read_result(spool, job_id) is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_dir / "result.json", result)
    log.info("job %s %s%s", job_id, result["state"], f": {result['reason']}" if "reason" in result else "")
    return read_result(spool, job_id)


def _count_start(job_dir: Path) -> int:
    """How many times a worker has started this job, including now."""
    path = job_dir / "starts"
    starts = (int(path.read_text() or 0) if path.exists() else 0) + 1
    write_atomic(path, str(starts).encode())
    return starts


def _run(spool: Spool, job_id: int) -> dict[str, Any]:
    job_dir = spool.job_dir(job_id)
    spec = read_json(job_dir / "job.json")
    final = job_dir / "out"
    if not final.is_dir():
        starts = _count_start(job_dir)
        if starts > MAX_STARTS:
            return {"state": "failed", "reason": f"interrupted {starts - 1} times (the worker or the node died "
                                                 "while running it: out of memory?)"}
        tmp = Path(tempfile.mkdtemp(dir=job_dir, prefix=".out-"))
        try:
            datasets = [dcmread(spool.abs(rel)) for rel in spec["inputs"]]
            run_pipeline(datasets, spec["pipeline"], spec["options"], tmp, spec["version"])
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                log.warning("job %s: outputs already in place from another run; keeping those", job_id)
        except pipelines.Refusal as exc:
            return {"state": "refused", "reason": str(exc)}
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("job %s: outputs already complete from an earlier run", job_id)
    outputs = []
    for path in sorted(final.glob("*.dcm")):  # what is on disk is what gets delivered
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        outputs.append({"file": spool.rel(path), "sop_uid": ds.SOPInstanceUID, "series_uid": ds.SeriesInstanceUID})
    return {"state": "done", "outputs": outputs}

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
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pydicom import Dataset, dcmread

import node
import pipelines
from node.spool import Spool, disk_full, read_json, write_atomic, write_json
from pipelines.dicom import input_checks
from pipelines.dicom.derived import flag_description

log = logging.getLogger(__name__)
QA_DIR = "qa"  # out/qa/<output series UID>/qa.png, qa.json


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
    qa: bool = True,
    label: str = "",
) -> list[Output]:
    """Validate options, run the pipeline and write every output to ``out_dir`` (fsync'd); with
    ``qa``, also each output series' QA files (:func:`write_qa`; ``label`` starts its log lines).

    Raises :class:`pipelines.Refusal` when the pipeline refuses the input, ``ValueError`` for bad
    options, :class:`pipelines.InvalidOutput` for an output with non-finite values (nothing of the
    run is kept: the caller drops ``out_dir``).
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
    started = time.monotonic()
    for ds in pipe.run(datasets, opts, context):
        input_checks.check_output(ds)
        path = out_dir / f"{len(outputs) + 1:05d}.dcm"
        write_atomic(path, encode(ds))
        outputs.append(Output(path, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID))
    if qa:
        extra = {"pipeline": pipeline, "options": opts, "seconds": round(time.monotonic() - started, 2)}
        write_qa(datasets, outputs, out_dir, extra, version, label)
    return outputs


def qa_folder(out_dir: Path, series_uid: str) -> Path:
    """Where :func:`run_pipeline` puts ``qa.png`` and ``qa.json`` of one output series."""
    return out_dir / QA_DIR / series_uid


def qa_records(spool: Spool, job_id: int) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, qa.json) of each output series of a finished job, in a fixed order (the status page
    numbers them from 1); none while it runs, after retention or for a job without QA."""
    found = []
    for path in sorted((spool.job_dir(job_id) / "out" / QA_DIR).glob("*/qa.json")):
        try:
            found.append((path.parent, read_json(path)))
        except (OSError, ValueError):
            continue
    return found


def write_qa(datasets: Sequence[Dataset], outputs: list[Output], out_dir: Path, extra: dict[str, Any],
             version: int = 1, label: str = "") -> None:
    """``qa.png`` and ``qa.json`` (:mod:`pipelines.qa`) for each output series; a series whose
    consistency is below its threshold gets :data:`pipelines.qa.FLAG` in its SeriesDescription (its
    files are rewritten, same UIDs) and a WARNING line. The outputs are delivered either way; a QA
    that cannot be made is a WARNING, never a failed job."""
    from pipelines import qa, weights

    series: dict[str, list[Output]] = {}
    for o in outputs:
        series.setdefault(o.series_uid, []).append(o)
    thresholds = qa.load_thresholds(weights.weights_dir())
    what = f"{label}: " if label else ""
    for n, (series_uid, items) in enumerate(series.items(), 1):
        started = time.monotonic()
        try:
            written = [dcmread(o.path) for o in items]
            found = qa.assess(datasets, written, thresholds, models_claimed(written), extra)
        except Exception as exc:  # noqa: BLE001 - the QA must never keep outputs from delivery
            log.warning("%soutput series %d: no QA picture or consistency check (%s: %s)", what, n,
                        type(exc).__name__, str(exc)[:200])
            continue
        if found is None:
            continue
        found.record["qa_seconds"] = round(time.monotonic() - started, 2)
        folder = qa_folder(out_dir, series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "qa.png", found.png)
        write_atomic(folder / "qa.json", json.dumps(found.record, indent=1, default=str).encode())
        if found.passed is False:
            log.warning("%soutput series %d (%s): consistency %.2f dB is below the threshold %.2f dB; its "
                        "SeriesDescription says %r", what, n, found.record["model"],
                        found.record["consistency"]["psnr_db"], found.record["threshold_db"], qa.FLAG)
            original = datasets[0].get("SeriesDescription") if datasets else None
            for o, ds in zip(items, written, strict=True):
                ds.SeriesDescription = flag_description(str(ds.get("SeriesDescription", "")), qa.FLAG, version, original)
                write_atomic(o.path, encode(ds))


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


PROGRESS_EVERY_S = 1.0  # how often a running job rewrites its progress.json (the node reads it)


class ProgressFile:
    """``jobs/<id>/progress.json`` of a running job: when it started, slices done of total. The
    node (node.scheduler) copies it into the ledger; a worker on another host only needs the spool."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / "progress.json"
        self.started = time.time()
        self._last = 0.0
        self._write(0, 0)

    def _write(self, done: int, total: int) -> None:
        write_atomic(self.path, json.dumps({"started": self.started, "done": done, "total": total}).encode(),
                     durable=False)  # advisory: a crash loses nothing that matters

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S or done >= total:
            self._last = now
            self._write(done, total)


def read_progress(spool: Spool, job_id: int) -> dict[str, Any] | None:
    try:
        return read_json(spool.job_dir(job_id) / "progress.json")
    except (OSError, ValueError):
        return None


_HEX = re.compile(r"(?<![0-9a-f])[0-9a-f]{8,64}(?![0-9a-f])")


def models_claimed(headers: Iterable[Dataset]) -> list[dict[str, str]]:
    """The shipped weights the outputs name in SoftwareVersions (their own or their Contributing
    Equipment's: pipelines write each model as ``name:<sha256 prefix>``), with each file's full
    sha256 and model name from its card: what the audit says produced a result."""
    tokens = set()
    for ds in headers:
        items = [ds, *ds.get("ContributingEquipmentSequence", [])]
        for item in items:
            for value in item.get("SoftwareVersions") or []:
                tokens.update(_HEX.findall(str(value).lower()))
    if not tokens:
        return []
    found = []
    for card in _weight_cards():
        if any(card["sha256"].startswith(t) for t in tokens):
            found.append(card)
    return found


def _weight_cards() -> list[dict[str, str]]:
    from pipelines import weights

    cards = []
    for path in sorted(weights.weights_dir().glob("*.safetensors")):
        try:
            header = weights.read_card_header(path)
            model = json.loads(header.get("config") or "{}").get("model", path.stem)
        except (weights.WeightsError, OSError, ValueError):
            continue
        if header.get("sha256"):
            cards.append({"model": str(model), "file": path.name, "sha256": header["sha256"]})
    return cards


RESULT_RETRY_S = 5.0  # a result that cannot be written (disk full) is tried again this often


def _write_result(job_dir: Path, job_id: int, result: dict[str, Any]) -> None:
    """``result.json``, durable. On a full disk (the job's partial outputs are already gone, so
    it rarely is) it is tried again every ``RESULT_RETRY_S`` until it can be written: without it
    the node would wait for the job forever."""
    logged = False
    while True:
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            write_json(job_dir / "result.json", result)
            return
        except OSError as exc:
            if not disk_full(exc):
                raise
            if not logged:
                log.error("job %s: cannot write its result, the spool's disk is full; trying again every %.0f s",
                          job_id, RESULT_RETRY_S)
                logged = True
            time.sleep(RESULT_RETRY_S)


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
    try:
        result = _run(spool, job_id)
    except Exception as exc:  # the job fails with its reason; the worker keeps serving
        if disk_full(exc):  # not the job's fault: the node runs it again once there is space (node.scheduler)
            log.warning("job %s stopped: the spool's disk is full (%s)", job_id, exc)
            result = {"state": "failed", "reason": f"{type(exc).__name__}: {exc}", "disk_full": True}
        else:
            log.exception("job %s failed", job_id)
            result = {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result.setdefault("finished", time.time())
    result["software_version"] = node.__version__  # this worker's (a Redis worker may run another release)
    if read_result(spool, job_id) is None:
        _write_result(job_dir, job_id, result)
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
        progress = ProgressFile(job_dir)
        started = progress.started
        try:
            datasets = [dcmread(spool.abs(rel)) for rel in spec["inputs"]]
            run_pipeline(datasets, spec["pipeline"], spec["options"], tmp, spec["version"], progress=progress,
                         label=f"job {job_id}")
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                log.warning("job %s: outputs already in place from another run; keeping those", job_id)
        except pipelines.Refusal as exc:
            return {"state": "refused", "reason": str(exc), "started": started}
        except pipelines.InvalidOutput as exc:  # a wrong output is never delivered; no traceback for it
            return {"state": "failed", "reason": str(exc), "started": started}
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("job %s: outputs already complete from an earlier run", job_id)
        started = (read_progress(spool, job_id) or {}).get("started")
    outputs, headers = [], []
    for path in sorted(final.glob("*.dcm")):  # what is on disk is what gets delivered
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[
            "SOPInstanceUID", "SeriesInstanceUID", "SoftwareVersions", "ContributingEquipmentSequence"])
        outputs.append({"file": spool.rel(path), "sop_uid": ds.SOPInstanceUID, "series_uid": ds.SeriesInstanceUID})
        headers.append(ds)
    return {"state": "done", "outputs": outputs, "started": started, "models": models_claimed(headers)}

"""The node end to end against real peers: dcmtk senders, Orthanc + DICOMweb as the PACS,
Celery workers (embedded and on Redis), outputs validated with dciodvfy."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import series_factory as make
from tests.dicom_checks import new_dciodvfy_errors
from tests.peers import storescu, wait_for

pytestmark = pytest.mark.integration


def pacs(orthanc) -> dict:
    return {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}


def route(name, match, options, send_to=("pacs",)) -> dict:
    return {"name": name, "match": match, "pipeline": "interp", "options": options, "send_to": list(send_to)}


def all_delivered(n: int):
    return lambda jobs: len(jobs) >= n and all(j["state"] == "delivered" for j in jobs)


def derived_series(orthanc, source_path) -> list[dict]:
    """QIDO-RS: the series of the source's study other than the source series itself."""
    src = dcmread(source_path, stop_before_pixels=True)
    series = orthanc.series_of_study(src.StudyInstanceUID)
    return [s for s in series if s["0020000E"]["Value"][0] != src.SeriesInstanceUID]


def fetch(orthanc, study_uid: str, series: dict) -> list:
    series_uid = series["0020000E"]["Value"][0]
    return [dcmread(io.BytesIO(orthanc.get_instance_file(i["00080018"]["Value"][0])))
            for i in orthanc.instances_of_series(study_uid, series_uid)]


def assert_valid(datasets, tmp_path, source) -> None:
    """No dciodvfy error that the source does not already have (some real sources have some)."""
    for k, ds in enumerate(datasets):
        path = tmp_path / f"check-{k}.dcm"
        ds.save_as(path)
        assert new_dciodvfy_errors(path, source) == [], f"dciodvfy errors in output {k}"


def test_ct_mr_cr_derived_series_reach_orthanc(make_node, orthanc, tmp_path):
    ct = make.ct_small(tmp_path / "ct", "e2e-ct")
    mr = make.mr_series(tmp_path / "mr", "e2e-mr")
    cr = make.cr(tmp_path / "cr", "e2e-cr")
    node = make_node(
        routes=[
            route("chest", {"Modality": ["CR", "DX"]}, {"scale": 2, "method": "lanczos"}),
            route("ct", {"Modality": "CT"}, {"inplane_scale": 2, "method": "cubic"}),
            route("mr", {"Modality": "MR"}, {"inplane_scale": 2, "through_scale": 2, "method": "linear"}),
        ],
        destinations={"pacs": pacs(orthanc)},
    )
    for files in (ct, mr, cr):
        result = storescu(files, node.port)
        assert result.returncode == 0, result.stderr
    jobs = node.wait_jobs(all_delivered(3), timeout=180, what="three jobs delivered to Orthanc")
    assert {j["route"] for j in jobs} == {"chest", "ct", "mr"}

    # CT: one slice, in-plane x2, field of view kept.
    src = dcmread(ct[0])
    [series] = derived_series(orthanc, ct[0])
    [out] = fetch(orthanc, src.StudyInstanceUID, series)
    assert (out.Rows, out.Columns) == (2 * src.Rows, 2 * src.Columns)
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 2 for v in src.PixelSpacing])
    assert out.SOPClassUID == src.SOPClassUID and out.ImageType[0] == "DERIVED"
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert_valid([out], tmp_path, ct[0])

    # MR: n slices -> 2n-1 slices at half the spacing, same extent.
    srcs = [dcmread(p) for p in mr]
    [series] = derived_series(orthanc, mr[0])
    outs = fetch(orthanc, srcs[0].StudyInstanceUID, series)
    assert len(outs) == 2 * len(srcs) - 1
    assert (outs[0].Rows, outs[0].Columns) == (2 * srcs[0].Rows, 2 * srcs[0].Columns)
    assert_valid(outs[:3], tmp_path, mr[0])

    # CR: stays CR, MONOCHROME convention and spacing attributes scaled.
    src = dcmread(cr[0])
    [series] = derived_series(orthanc, cr[0])
    [out] = fetch(orthanc, src.StudyInstanceUID, series)
    assert out.SOPClassUID == src.SOPClassUID
    assert (out.Rows, out.Columns) == (2 * src.Rows, 2 * src.Columns)
    assert out.PhotometricInterpretation == src.PhotometricInterpretation
    assert_valid([out], tmp_path, cr[0])


def test_stow_rs_destination_with_redis_and_a_separate_worker(make_node, orthanc, tmp_path, redis_url):
    ct = make.ct_small(tmp_path / "ct", "e2e-stow")
    node = make_node(
        start=False, broker=redis_url,
        routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["web"])],
        destinations={"web": {"type": "dicomweb", "url": orthanc.dicomweb_url}},
    )
    node.start()
    node.start_worker()
    assert storescu(ct, node.port).returncode == 0
    node.wait_jobs(all_delivered(1), timeout=90, what="job delivered by STOW-RS")
    [series] = derived_series(orthanc, ct[0])
    assert series["00201209"]["Value"][0] == 1  # NumberOfSeriesRelatedInstances
    assert "srnode-" in node.log() and "run_job" in node.log()  # the separate worker ran it


def test_unlisted_calling_ae_is_rejected(make_node, tmp_path):
    node = make_node(routes=[], destinations={})
    result = storescu(make.ct_small(tmp_path / "ct", "reject"), node.port, calling_ae="INTRUDER", check=False)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    wait_for(lambda: "rejected association from INTRUDER" in node.log(), 5, what="rejection logged")
    time.sleep(0.5)
    assert node.log().count("rejected association from INTRUDER") == 1  # the AE check's line only
    assert not any((node.spool / "series").rglob("*.dcm"))


def test_an_association_over_the_limit_is_rejected_and_logged(make_node):
    from pynetdicom import AE

    node = make_node(routes=[], destinations={}, max_associations=1)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
    try:
        second = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
        assert second.is_rejected
    finally:
        first.release()
    wait_for(lambda: "limit of 1 associations is reached" in node.log(), 5, what="limit rejection logged")
    assert "rejected association from STORESCU@127.0.0.1: the node's limit of 1 associations" in node.log()


def test_refused_presentation_contexts_are_logged(make_node):
    """The sender only learns "no presentation context" when it tries to send: the node says why."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    node = make_node(routes=[], destinations={})
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.3.4.5.6.7")  # a private SOP class
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.100"])  # MPEG2: not offered
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
    assert assoc.is_established
    assoc.release()
    wait_for(lambda: "2 presentation context(s) refused" in node.log(), 5, what="refused contexts logged")
    assert "1.2.3.4.5.6.7 (SOP class not supported), CT Image Storage (transfer syntax not supported)" in node.log()


def test_corrupt_and_uidless_instances_get_failure_status_and_node_keeps_serving(make_node, tmp_path, monkeypatch):
    import pynetdicom._config
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    node = make_node(routes=[], destinations={})
    good = make.ct_small(tmp_path / "good", "corrupt-good")[0]
    ds = dcmread(good)
    ds.StudyInstanceUID = ""  # blank UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.9999.1"
    blank = tmp_path / "blank.dcm"
    ds.save_as(blank, enforce_file_format=True)
    raw = good.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, group length element
    sop = str(dcmread(good).SOPInstanceUID)
    # Truncated right after the SOP Instance UID, then an element running past the end.
    at = raw.index(sop.encode(), meta_end)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:at + int.from_bytes(raw[at - 2:at], "little")] + b"\x08\x00\x20\x00DA\xf0\xff2004")
    # A valid file header, then bytes that are no data set at all.
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(raw[:meta_end] + bytes(range(256)) * 8)
    # Pixel data cut short (pydicom reads such a file without complaint).
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:-5000])
    # File meta says deflated, the body is not: it cannot be parsed at all.
    garbage = dcmread(good)
    garbage.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    undeflatable = tmp_path / "undeflatable.dcm"
    meta_only = garbage.file_meta
    from pydicom.filewriter import write_file_meta_info
    with open(undeflatable, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta_only)
        fh.write(b"\x78\x9c this is not a deflate stream at all")

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
    assert assoc.is_established
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # send the files as they are
    try:
        statuses = {name: assoc.send_c_store(path) for name, path in
                    (("blank", blank), ("truncated", truncated), ("undeflatable", undeflatable), ("noise", noise), ("cut", cut),
                     ("good", good))}
    finally:
        assoc.release()
    assert statuses["blank"].Status == 0xA900 and "Study Instance UID" in statuses["blank"].ErrorComment
    assert statuses["truncated"].Status == 0xA900 and "Study Instance UID" in statuses["truncated"].ErrorComment
    assert statuses["undeflatable"].Status == 0xC000 and "cannot be parsed" in statuses["undeflatable"].ErrorComment
    assert statuses["noise"].Status == 0xC000  # (read as implicit VR garbage: the first such element is named)
    assert statuses["cut"].Status == 0xC000
    assert statuses["cut"].ErrorComment == "(7FE0,0010) PixelData is cut short (27906 of 32768 bytes)"
    assert statuses["good"].Status == 0x0000
    log = node.log()
    assert "cannot be parsed" in log and "has no valid Study Instance UID" in log
    stored = list((node.spool / "series").rglob("*.dcm"))
    assert [p.stem for p in stored] == [sop]
    assert storescu([good], node.port).returncode == 0  # still serving; a repeat is stored once
    assert len(list((node.spool / "series").rglob("*.dcm"))) == 1


def test_orthanc_down_during_delivery_is_retried_until_delivered(make_node, orthanc, tmp_path):
    ct = make.ct_small(tmp_path / "ct", "orthanc-down")
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2})],
                     destinations={"pacs": pacs(orthanc)})
    orthanc.stop()
    try:
        assert storescu(ct, node.port).returncode == 0
        wait_for(lambda: "retry later" in node.log(), 60, what="a failed delivery attempt scheduled for retry")
        assert node.jobs()[0]["state"] == "dispatching"
    finally:
        orthanc.start()
    node.wait_jobs(all_delivered(1), timeout=60, what="delivered once Orthanc is back")
    assert len(derived_series(orthanc, ct[0])) == 1


def test_kill_9_after_acknowledgement_is_processed_after_restart(make_node, orthanc, tmp_path):
    ct = make.ct_volume(tmp_path / "ct", "kill-node", 4)
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2})],
                     destinations={"pacs": pacs(orthanc)}, quiet_seconds=5)
    assert storescu(ct, node.port).returncode == 0  # acknowledged...
    node.kill()  # ...and the node dies before the series is complete
    assert node.jobs() == []
    node.start()
    node.wait_jobs(all_delivered(1), timeout=90, what="job delivered after restart")
    [series] = derived_series(orthanc, ct[0])
    assert series["00201209"]["Value"][0] == 4


def test_kill_9_of_a_worker_mid_job_gives_one_output_series(make_node, orthanc, tmp_path, redis_url):
    ct = make.ct_volume(tmp_path / "ct", "kill-worker", 24)
    node = make_node(
        start=False, broker=redis_url, visibility_timeout_s=4,
        routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2, "through_scale": 4, "method": "lanczos"})],
        destinations={"pacs": pacs(orthanc)},
    )
    node.start()
    worker = node.start_worker()
    assert storescu(ct, node.port).returncode == 0
    wait_for(lambda: any((node.spool / "jobs").glob("*/.out-*")), 60, what="the worker started the job")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    assert not any((node.spool / "jobs").glob("*/result.json"))
    node.start_worker()
    jobs = node.wait_jobs(all_delivered(1), timeout=180, what="job re-run by a new worker and delivered")
    assert len(jobs) == 1
    [series] = derived_series(orthanc, ct[0])
    assert series["00201209"]["Value"][0] == (24 - 1) * 4 + 1


def test_late_instances_start_a_new_version_and_repeats_start_nothing(make_node, orthanc, tmp_path):
    ct = make.ct_volume(tmp_path / "ct", "late", 4)
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2})],
                     destinations={"pacs": pacs(orthanc)})
    assert storescu(ct[:3], node.port).returncode == 0
    node.wait_jobs(all_delivered(1), timeout=60, what="first version delivered")
    assert storescu(ct[:3], node.port).returncode == 0  # the same instances again: nothing new to do
    assert storescu(ct[3:], node.port).returncode == 0  # a late instance
    jobs = node.wait_jobs(all_delivered(2), timeout=60, what="second version delivered")
    assert sorted(j["version"] for j in jobs) == [1, 2]
    outputs = sorted(derived_series(orthanc, ct[0]), key=lambda s: s["00201209"]["Value"][0])
    assert [s["00201209"]["Value"][0] for s in outputs] == [3, 4]
    numbers = {s["00200011"]["Value"][0] for s in outputs}
    assert len(numbers) == 1  # the same SeriesNumber: recognisably the same output
    assert outputs[1]["0008103E"]["Value"][0].endswith("v2")


SLOW_SLICES = 24


def _node_running_a_slow_job(make_node, tmp_path, tag: str):
    """(node, output folder): the embedded worker has started a job of several seconds (x4 x4 on
    24 slices), whose one output series will hold (24 - 1) * 4 + 1 slices."""
    ct = make.ct_volume(tmp_path / "ct", tag, SLOW_SLICES)
    out = tmp_path / "archive"
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 4, "through_scale": 4},
                                   send_to=["archive"])],
                     destinations={"archive": {"type": "folder", "path": str(out)}})
    assert storescu(ct, node.port).returncode == 0
    wait_for(lambda: any((node.spool / "jobs").glob("*/.out-*")), 60, what="the embedded worker started the job")
    return node, out


def _one_output_series(out) -> None:
    series_dirs = list(out.glob("*/*"))
    assert len(series_dirs) == 1 and len(list(series_dirs[0].glob("*.dcm"))) == (SLOW_SLICES - 1) * 4 + 1


def test_node_killed_mid_job_takes_its_embedded_worker_with_it(make_node, tmp_path):
    """The orphaned worker must not finish the job while the restarted node runs it again."""
    node, out = _node_running_a_slow_job(make_node, tmp_path, "kill-node-mid-job")
    worker_pid = _embedded_worker_pid(node)
    node.kill()
    wait_for(lambda: not _alive(worker_pid), 5, what="the orphaned embedded worker gone")
    assert not any((node.spool / "jobs").glob("*/result.json"))  # it did not finish the job
    node.start()
    node.wait_jobs(all_delivered(1), timeout=180, what="job run by the restarted node's worker")
    _one_output_series(out)


def test_a_restarted_embedded_worker_stops_gracefully_with_the_node(make_node, tmp_path):
    """The supervisor thread that restarted the worker must not end before it (PR_SET_PDEATHSIG
    follows the spawning thread): SIGTERM to the node gives the new worker a warm shutdown."""
    node = make_node(routes=[], destinations={})
    os.kill(_embedded_worker_pid(node), signal.SIGKILL)
    restarted = lambda: node.log().count("embedded worker started") == 2 and "ready." in node.log().rsplit(  # noqa: E731
        "embedded worker started", 1)[1]
    wait_for(restarted, 60, what="the restarted embedded worker ready")
    node.proc.send_signal(signal.SIGTERM)  # the node alone, not its process group
    node.proc.wait(30)
    after_restart = node.log().rsplit("embedded worker started", 1)[1]
    assert "Warm shutdown" in after_restart and "node stopped" in after_restart


def _embedded_worker_pid(node) -> int:
    return int(subprocess.run(["pgrep", "-f", f"worker --config {node.config_path}"],
                              capture_output=True, text=True).stdout.split()[0])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: it only waits for its parent to read it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_embedded_worker_killed_mid_job_is_restarted_and_the_job_reruns(make_node, tmp_path):
    node, out = _node_running_a_slow_job(make_node, tmp_path, "kill-embedded")
    os.kill(_embedded_worker_pid(node), signal.SIGKILL)
    node.wait_jobs(all_delivered(1), timeout=180, what="job re-run by the restarted embedded worker")
    assert "embedded worker exited" in node.log()
    _one_output_series(out)

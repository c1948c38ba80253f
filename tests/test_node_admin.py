"""What a PACS admin does with a running node: pin peers to hosts, send results back to the sender,
check destinations, list jobs, replay a parked job; and compressed input from real modalities."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom import dcmread

from tests import series_factory as make
from tests.dicom_checks import new_dciodvfy_errors
from tests.paths import shared
from tests.peers import StoreSCP, dcmsend, free_port, storescu, wait_for
from tests.test_node_e2e import all_delivered, derived_series, pacs, route

pytestmark = pytest.mark.integration


def test_peer_pinned_to_another_host_is_rejected(make_node, tmp_path):
    node = make_node(routes=[], destinations={}, peers=[{"ae_title": "STORESCU", "host": "192.0.2.10"}])
    result = storescu(make.ct_small(tmp_path / "ct", "pinned"), node.port, check=False)
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr + result.stdout
    wait_for(lambda: "only allowed from 192.0.2.10" in node.log(), 5, what="host rejection logged")


def test_results_go_back_to_the_sending_pacs(make_node, orthanc, tmp_path):
    """Orthanc pushes a study to the node (calling AE ORTHANC); the route sends results to `sender`."""
    ct = make.ct_small(tmp_path / "ct", "sender")
    storescu(ct, orthanc.dicom_port, called_ae="ORTHANC")
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["sender"])],
                     destinations={},
                     peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    orthanc.add_modality("SRNODE_TEST", "SRNODE", node.port)
    orthanc_id = orthanc.find_instance(str(dcmread(ct[0]).SOPInstanceUID))
    response = orthanc.http.post(f"{orthanc.url}/modalities/SRNODE_TEST/store", json=[orthanc_id], timeout=60)
    response.raise_for_status()
    node.wait_jobs(all_delivered(1), timeout=60, what="results delivered back to the sender")
    assert len(derived_series(orthanc, ct[0])) == 1


def test_echo_checks_each_kind_of_destination(make_node, orthanc, tmp_path):
    node = make_node(start=False, routes=[], destinations={
        "pacs": pacs(orthanc),
        "web": {"type": "dicomweb", "url": orthanc.dicomweb_url},
        "archive": {"type": "folder", "path": str(tmp_path / "archive")},
        "down": {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "timeout_s": 3},
    })
    for name, words in (("pacs", "success"), ("web", "HTTP 200"), ("archive", "writable")):
        out = node.cli("echo", name)
        assert words in out.stdout, out.stdout
    down = node.cli("echo", "down", check=False)
    assert down.returncode == 1 and "no association" in down.stdout
    unknown = node.cli("echo", "elsewhere", check=False)
    assert unknown.returncode != 0 and "no destination 'elsewhere'" in unknown.stderr


def test_parked_job_is_listed_and_replayed_with_retry(make_node, tmp_path):
    port = free_port()
    ct = make.ct_small(tmp_path / "ct", "park")
    node = make_node(routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["scp"])],
                     destinations={"scp": {"type": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1",
                                           "port": port, "timeout_s": 3}},
                     max_attempts=2, backoff_initial_s=0.2)
    assert storescu(ct, node.port).returncode == 0
    [job] = node.wait_jobs(lambda jobs: jobs and jobs[0]["state"] == "parked", timeout=60, what="job parked")
    listing = node.cli("jobs").stdout
    assert "parked" in listing and "no association" in listing
    scp = StoreSCP(tmp_path / "scp", port=port).start()
    try:
        assert "queued again" in node.cli("retry", str(job["id"])).stdout
        node.wait_jobs(all_delivered(1), timeout=60, what="replayed job delivered")
        assert len(scp.wait_for_files(1)) == 1
    finally:
        scp.stop()


@pytest.mark.shared_data
@pytest.mark.parametrize("folder", ["phantom_t1_j2k", "phantom_t1_jpegll"])
def test_compressed_series_are_accepted_decoded_and_processed(make_node, tmp_path, folder):
    src = shared("mr", folder)
    files = sorted(src.glob("*.dcm"))[:8]
    out = tmp_path / "archive"
    node = make_node(routes=[route("mr", {"Modality": "MR"}, {"inplane_scale": 2}, send_to=["archive"])],
                     destinations={"archive": {"type": "folder", "path": str(out)}})
    dcmsend(files, node.port, calling_ae="STORESCU")  # dcmsend offers each file's own (compressed) transfer syntax
    stored = list((node.spool / "series").rglob("*.dcm"))
    assert len(stored) == len(files)
    sent = str(dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    received = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in stored}
    # Stored as negotiated: compressed where dcmsend cannot decompress (JPEG 2000); dcmsend also
    # offers Explicit VR LE for JPEG Lossless, which the node prefers.
    assert received <= {sent, "1.2.840.10008.1.2.1"}
    if folder == "phantom_t1_j2k":
        assert received == {sent}
    node.wait_jobs(all_delivered(1), timeout=120, what="compressed series processed")
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == len(files)
    assert new_dciodvfy_errors(outputs[0], files[0]) == []


def test_jobs_cli_without_a_ledger_says_so(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{spool: {tmp_path / 'nothing'}}}\n")
    out = subprocess.run([sys.executable, "-m", "node.cli", "jobs", "--config", str(config)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no ledger" in out.stderr

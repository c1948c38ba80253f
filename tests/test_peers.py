"""The test harness itself, against the real tools: Orthanc + DICOMweb, dcmtk, storescp, Redis."""
from __future__ import annotations

import io

import pydicom
import pytest

from tests.peers import (
    Orthanc, dcmtk, echoscu, free_port, port_open, storescu, tag_value, wait_for,
)

pytestmark = pytest.mark.integration


def test_dcmtk_resolves_the_real_tools_not_pynetdicom_scripts():
    for name in ("storescu", "storescp", "echoscu", "dcmsend"):
        path = dcmtk(name)
        assert path.startswith("/usr/"), path
        assert "pyenv" not in path


def test_wait_for_has_a_real_deadline():
    calls = []
    with pytest.raises(AssertionError, match="waiting for the moon"):
        wait_for(lambda: calls.append(1), 0.2, interval=0.05, what=lambda: "the moon")
    assert 2 <= len(calls) <= 10
    assert wait_for(lambda: 42, 1) == 42


def test_orthanc_receives_a_c_store_from_storescu_and_qido_finds_it(fresh_orthanc, ct_small):
    ds = pydicom.dcmread(ct_small)
    storescu([ct_small], fresh_orthanc.dicom_port, called_ae="ORTHANC")
    assert fresh_orthanc.wait_instance_count(1, timeout=10) == 1

    series = fresh_orthanc.series_of_study(ds.StudyInstanceUID)
    assert [tag_value(s, "0020000E") for s in series] == [ds.SeriesInstanceUID]
    instances = fresh_orthanc.instances_of_series(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert [tag_value(i, "00080018") for i in instances] == [ds.SOPInstanceUID]
    assert fresh_orthanc.series_of_study("1.2.3.4.5.6.7.8.9") == []

    stored = pydicom.dcmread(io.BytesIO(fresh_orthanc.get_instance_file(ds.SOPInstanceUID)))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.pixel_array.shape == (128, 128)


def test_echoscu_against_orthanc(orthanc):
    result = echoscu(orthanc.dicom_port, called_ae="ORTHANC")
    assert result.returncode == 0


def test_orthanc_restart_keeps_ports_and_data(make_orthanc, ct_small):
    server: Orthanc = make_orthanc(modalities={"NODE": ["SRNODE", "127.0.0.1", free_port()]})
    ports = (server.http_port, server.dicom_port)
    storescu([ct_small], server.dicom_port, called_ae="ORTHANC")
    server.wait_instance_count(1, timeout=10)

    server.kill()
    assert not port_open(server.dicom_port)
    server.restart()
    assert (server.http_port, server.dicom_port) == ports
    assert server.instance_count() == 1
    assert "NODE" in server.get("/modalities")
    echoscu(server.dicom_port, called_ae="ORTHANC")


def test_storescp_receives_a_file(storescp, ct_small):
    storescu([ct_small], storescp.port, called_ae=storescp.ae_title)
    (received,) = storescp.wait_for_files(1, timeout=10)
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(ct_small).SOPInstanceUID


def test_storescu_failure_is_reported_with_output(ct_small):
    port = free_port()  # nothing listens there
    with pytest.raises(AssertionError, match="exited"):
        storescu([ct_small], port, timeout=30)
    assert storescu([ct_small], port, check=False).returncode != 0


def test_redis_url_points_at_an_empty_test_db(redis_url):
    import redis

    from tests.peers import TEST_REDIS_DB

    client = redis.Redis.from_url(redis_url)
    try:
        assert redis_url.endswith(f"/{TEST_REDIS_DB}")
        client.set("srnode-test", "1")
        assert client.dbsize() == 1
    finally:
        client.close()

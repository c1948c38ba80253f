"""Real scanner output through the node to Orthanc: an enhanced (Legacy Converted Enhanced CT) series
comes back as one enhanced instance on the new grid; a Legacy Converted Enhanced MR goes through the
shipped config's MR route (sr3d, the in-plane CNN) and comes back as one enhanced MR; the tilted GE
head CT, irregularly spaced, comes back in-plane only with every slice where it was. Outputs validated
by dciodvfy, geometry checked."""
from __future__ import annotations

import pytest
from pydicom import dcmread

from tests import series_factory as make
from tests.dicom_checks import check_enhanced_derived, check_grid, check_in_place, new_dciodvfy_errors
from tests.paths import shared
from tests.peers import dcmsend
from tests.test_node_e2e import all_delivered, derived_series, fetch, pacs

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]

LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
OPTIONS = {"pipeline": "interp", "options": {"inplane_scale": 2, "through_scale": 2, "method": "linear"},
           "send_to": ["pacs"]}


def test_enhanced_ct_enhanced_mr_and_tilted_ct_reach_orthanc_as_results(make_node, orthanc, tmp_path):
    enhanced = make.legacy_enhanced(tmp_path / "enhanced", "e2e-enhanced", shared("ct", "philips_phantom_ct_5mm"),
                                    first=10, count=4)
    enhanced_mr = make.legacy_enhanced(tmp_path / "enhanced-mr", "e2e-enhanced-mr", shared("mr", "decubitus_hfs_t1_sag"),
                                       first=10, count=3, crop=(96, 96, 64, 64))  # 64x64 px of anatomy: a quick CNN
    tilted = make.tilted_ct(tmp_path / "tilted", "e2e-tilted")
    mr_route = {"name": "mr", "match": {"Modality": "MR"}, "pipeline": "sr3d", "options": {"inplane_scale": 2},
                "send_to": ["pacs"]}  # config/node.yaml's MR route
    node = make_node(routes=[{"name": "enhanced", "match": {"SOPClassUID": LEGACY_ENHANCED_CT}, **OPTIONS},
                             mr_route, {"name": "ct", "match": {"Modality": "CT"}, **OPTIONS}],
                     destinations={"pacs": pacs(orthanc)})
    for files in (enhanced, enhanced_mr, tilted):  # dcmsend proposes each file's SOP class (storescu's list lacks these)
        dcmsend(files, node.port, calling_ae="STORESCU")
    jobs = node.wait_jobs(all_delivered(3), timeout=180, what="the enhanced CT and MR and the tilted CT delivered")
    assert {j["route"] for j in jobs} == {"enhanced", "mr", "ct"}

    source = dcmread(enhanced[0])
    [series] = derived_series(orthanc, enhanced[0])
    [out] = fetch(orthanc, source.StudyInstanceUID, series)
    out_path = tmp_path / "enhanced-out.dcm"
    out.save_as(out_path)
    assert int(out.NumberOfFrames) == 7
    check_enhanced_derived(source, out, enhanced[0], out_path)
    check_grid(enhanced[0], out_path, 2, 2)

    source = dcmread(enhanced_mr[0])
    assert source.SOPClassUID == LEGACY_ENHANCED_MR
    [series] = derived_series(orthanc, enhanced_mr[0])
    [out] = fetch(orthanc, source.StudyInstanceUID, series)
    out_path = tmp_path / "enhanced-mr-out.dcm"
    out.save_as(out_path)
    assert out.SOPClassUID == LEGACY_ENHANCED_MR and int(out.NumberOfFrames) == 3
    assert "super-res x2 CNN" in out.SeriesDescription  # the sr3d network ran, not an interpolation
    check_enhanced_derived(source, out, enhanced_mr[0], out_path)
    check_grid(enhanced_mr[0], out_path, 2, 1)

    sources = [dcmread(p) for p in tilted]
    [series] = derived_series(orthanc, tilted[0])
    outputs = fetch(orthanc, sources[0].StudyInstanceUID, series)
    check_in_place(sources, outputs, 2)
    assert (f"series {sources[0].SeriesInstanceUID}: through-plane resampling skipped, in-plane only: "
            "gantry tilt 18.5 deg") in node.log()  # which series, in the node's log
    for k, ds in enumerate(outputs[::9]):
        path = tmp_path / f"tilted-out{k}.dcm"
        ds.save_as(path)
        assert new_dciodvfy_errors(path, tilted[0]) == []

"""Real scanner output through the node to Orthanc: an enhanced (Legacy Converted Enhanced CT) series
comes back as one enhanced instance on the new grid; the tilted GE head CT, irregularly spaced, comes
back in-plane only with every slice where it was. Outputs validated by dciodvfy, geometry checked."""
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
OPTIONS = {"pipeline": "interp", "options": {"inplane_scale": 2, "through_scale": 2, "method": "linear"},
           "send_to": ["pacs"]}


def test_enhanced_ct_and_tilted_ct_reach_orthanc_as_results(make_node, orthanc, tmp_path):
    enhanced = make.legacy_enhanced(tmp_path / "enhanced", "e2e-enhanced", shared("ct", "philips_phantom_ct_5mm"),
                                    first=10, count=4)
    tilted = make.tilted_ct(tmp_path / "tilted", "e2e-tilted")
    node = make_node(routes=[{"name": "enhanced", "match": {"SOPClassUID": LEGACY_ENHANCED_CT}, **OPTIONS},
                             {"name": "ct", "match": {"Modality": "CT"}, **OPTIONS}],
                     destinations={"pacs": pacs(orthanc)})
    for files in (enhanced, tilted):  # dcmsend proposes each file's SOP class (storescu's fixed list lacks these)
        dcmsend(files, node.port, calling_ae="STORESCU")
    jobs = node.wait_jobs(all_delivered(2), timeout=180, what="the enhanced and the tilted CT delivered")
    assert {j["route"] for j in jobs} == {"enhanced", "ct"}

    source = dcmread(enhanced[0])
    [series] = derived_series(orthanc, enhanced[0])
    [out] = fetch(orthanc, source.StudyInstanceUID, series)
    out_path = tmp_path / "enhanced-out.dcm"
    out.save_as(out_path)
    assert int(out.NumberOfFrames) == 7
    check_enhanced_derived(source, out, enhanced[0], out_path)
    check_grid(enhanced[0], out_path, 2, 2)

    sources = [dcmread(p) for p in tilted]
    [series] = derived_series(orthanc, tilted[0])
    outputs = fetch(orthanc, sources[0].StudyInstanceUID, series)
    check_in_place(sources, outputs, 2)
    assert "through-plane resampling skipped, in-plane only: gantry tilt 18.5 deg" in node.log()
    for k, ds in enumerate(outputs[::9]):
        path = tmp_path / f"tilted-out{k}.dcm"
        ds.save_as(path)
        assert new_dciodvfy_errors(path, tilted[0]) == []

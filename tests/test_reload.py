"""Config reload on a running node: a good file applies to new associations and jobs, a bad one is
refused with its reasons, work in flight carries on."""
from __future__ import annotations

import copy

import pytest
import yaml

from node.audit import read
from tests import series_factory as make
from tests.peers import StoreSCP, free_port, storescu
from tests.test_node_e2e import all_delivered, route

pytestmark = pytest.mark.integration


def test_reload_applies_new_peers_routes_and_destinations_and_refuses_a_bad_file(make_node, tmp_path):
    later_port = free_port()
    node = make_node(
        routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["later"])],
        destinations={"later": {"type": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1", "port": later_port,
                                "timeout_s": 2}},
        backoff_initial_s=0.3, backoff_max_s=0.5)
    # In flight: a job whose destination is down, and which the new config drops.
    assert storescu(make.ct_small(tmp_path / "first", "reload-first"), node.port).returncode == 0
    node.wait_jobs(lambda jobs: jobs and jobs[0]["state"] == "dispatching", timeout=60, what="first job waiting")
    assert storescu(make.ct_small(tmp_path / "x", "reload-x"), node.port, calling_ae="NEWPEER",
                    check=False).returncode != 0

    good = copy.deepcopy(node.config)
    good["peers"].append({"ae_title": "NEWPEER"})
    good["destinations"] = {"archive": {"type": "folder", "path": str(tmp_path / "archive")}}
    good["routes"] = [route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])]
    node.config_path.write_text(yaml.safe_dump(good))
    out = node.cli("reload")
    assert "peers: + NEWPEER" in out.stdout and "destinations: + archive, - later" in out.stdout, out.stdout

    assert storescu(make.ct_small(tmp_path / "second", "reload-second"), node.port, calling_ae="NEWPEER").returncode == 0
    jobs = node.wait_jobs(lambda jobs: len(jobs) == 2 and jobs[0]["state"] == "delivered", timeout=60,
                          what="new job to the new destination")
    assert jobs[0]["send_to"] == ["archive"] and len(list((tmp_path / "archive").rglob("*.dcm"))) == 1
    scp = StoreSCP(tmp_path / "scp", port=later_port).start()  # the dropped destination comes up
    try:
        node.wait_jobs(all_delivered(2), timeout=60, what="the job in flight delivered where it was going")
        assert len(scp.wait_for_files(1)) == 1
    finally:
        scp.stop()

    bad = copy.deepcopy(good)
    bad["routes"][0]["send_to"] = ["nowhere"]
    node.config_path.write_text(yaml.safe_dump(bad))
    refused = node.cli("reload", check=False)
    assert refused.returncode == 1 and "send_to 'nowhere' is not a destination" in refused.stderr
    moved = copy.deepcopy(good)
    moved["node"]["port"] = free_port()
    node.config_path.write_text(yaml.safe_dump(moved))
    refused = node.cli("reload", check=False)
    assert refused.returncode == 1 and "node.port changed" in refused.stderr and "restart" in refused.stderr
    # The good config is still in force.
    assert storescu(make.ct_small(tmp_path / "third", "reload-third"), node.port, calling_ae="NEWPEER").returncode == 0
    reloads = [e for e in read(node.spool / "audit") if e["event"] == "config.reload"]
    assert [e["ok"] for e in reloads] == [True, False, False] and reloads[0]["actor"].startswith("cli:")
    assert "config reload refused" in node.log()


def test_adding_or_removing_the_http_service_needs_a_restart(tmp_path):
    """The HTTP service starts with the node: a reload that adds or drops the ``http`` section is
    refused (before, it was accepted and did nothing: a dropped section left STOW-RS running)."""
    from node.config import load_config
    from node.reload import restart_only
    from tests.node_fixtures import node_config

    def config(http_port):
        path = tmp_path / f"node-{http_port}.yaml"
        path.write_text(yaml.safe_dump(node_config(11112, tmp_path / "spool", routes=[], destinations={},
                                                   http_port=http_port)))
        return load_config(path)

    without, with_http = config(None), config(8080)
    assert restart_only(without, without) == [] and restart_only(with_http, with_http) == []
    assert any("http section was added" in r for r in restart_only(without, with_http))
    assert any("http section was removed" in r for r in restart_only(with_http, without))

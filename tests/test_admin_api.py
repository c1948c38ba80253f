"""The admin API over real HTTP on a real node: jobs, retry, destinations, echo, audit, reload; who may."""
from __future__ import annotations

import copy

import pytest
import requests
import yaml

from tests import series_factory as make
from tests.peers import free_port, storescu
from tests.test_node_e2e import route

pytestmark = pytest.mark.integration

ADMIN, VIEWER, ROTATED = "admin-secret-7f3a", "viewer-secret-91c2", "viewer-secret-rotated-5d0e"
TOKENS = [{"name": "ops", "role": "admin", "token_env": "SRNODE_TEST_ADMIN"},
          {"name": "grafana", "role": "viewer", "token_env": "SRNODE_TEST_VIEWER"}]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _node(make_node, tmp_path, monkeypatch, **kwargs):
    monkeypatch.setenv("SRNODE_TEST_ADMIN", ADMIN)
    monkeypatch.setenv("SRNODE_TEST_VIEWER", VIEWER)
    monkeypatch.setenv("SRNODE_TEST_VIEWER_ROTATED", ROTATED)
    node = make_node(
        routes=[route("parked", {"calling_ae": "PARKER"}, {"inplane_scale": 2}, send_to=["down"]),
                route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])],
        destinations={"archive": {"type": "folder", "path": str(tmp_path / "archive")},
                      "down": {"type": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
                               "timeout_s": 2}},
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "PARKER"}], max_attempts=1,
        http_port=free_port(), tokens=TOKENS, **kwargs)
    node.url = f"http://127.0.0.1:{node.config['http']['port']}"
    return node


@pytest.fixture
def admin_node(make_node, tmp_path, monkeypatch, redis_url):
    """A node with one job delivered and one parked, run by a separate Celery worker over Redis."""
    node = _node(make_node, tmp_path, monkeypatch, broker=redis_url)
    node.start_worker()
    assert storescu(make.ct_small(tmp_path / "ok", "api-ok"), node.port).returncode == 0
    assert storescu(make.ct_small(tmp_path / "park", "api-park"), node.port, calling_ae="PARKER").returncode == 0
    node.wait_jobs(lambda jobs: sorted(j["state"] for j in jobs) == ["delivered", "parked"], timeout=60,
                   what="one job delivered, one parked")
    return node


ENDPOINTS = [("GET", "/api/jobs", "viewer"), ("GET", "/api/jobs/1", "viewer"), ("POST", "/api/jobs/1/retry", "admin"),
             ("GET", "/api/destinations", "viewer"), ("POST", "/api/destinations/archive/echo", "admin"),
             ("GET", "/api/audit", "admin"), ("POST", "/api/config/reload", "admin")]


def test_admin_api_answers_each_role_and_does_what_it_says(admin_node, tmp_path):
    node, url = admin_node, admin_node.url
    for method, path, role in ENDPOINTS:
        assert requests.request(method, url + path, timeout=10).status_code == 401, path
        viewer = requests.request(method, url + path, headers=_bearer(VIEWER), timeout=10)
        assert viewer.status_code == (200 if role == "viewer" else 403), (path, viewer.text)

    jobs = requests.get(f"{url}/api/jobs", headers=_bearer(VIEWER), timeout=10).json()["jobs"]
    done = next(j for j in jobs if j["state"] == "delivered")
    parked = next(j for j in jobs if j["state"] == "parked")
    assert (done["modality"], done["instances_in"], done["instances_out"]) == ("CT", 1, 1)
    assert done["received"] <= done["complete"] <= done["started"] <= done["finished"] <= done["delivered"]
    assert "no association" in parked["reason"]
    only = requests.get(f"{url}/api/jobs?state=parked&limit=5", headers=_bearer(VIEWER), timeout=10).json()["jobs"]
    assert [j["id"] for j in only] == [parked["id"]]
    bad = requests.get(f"{url}/api/jobs?state=bogus", headers=_bearer(VIEWER), timeout=10)
    assert bad.status_code == 400 and "parked" in bad.json()["error"]
    one = requests.get(f"{url}/api/jobs/{parked['id']}", headers=_bearer(VIEWER), timeout=10).json()
    assert one["destinations"]["down"]["instances"] == {"parked": 1} and "no association" in \
        one["destinations"]["down"]["last_status"]
    assert requests.get(f"{url}/api/jobs/99999", headers=_bearer(VIEWER), timeout=10).status_code == 404
    for odd in ("%C2%B2", "1%C2%B2", "-1", "1e3"):  # "²" passes str.isdigit but not int()
        assert requests.get(f"{url}/api/jobs/{odd}", headers=_bearer(VIEWER), timeout=10).status_code == 404, odd
        assert requests.get(f"{url}/ui/jobs/{odd}/qa/1.png", headers=_bearer(VIEWER), timeout=10).status_code == 404
    assert requests.get(f"{url}/api/jobs?limit=%C2%B2", headers=_bearer(VIEWER), timeout=10).status_code == 400

    destinations = {d["name"]: d for d in requests.get(f"{url}/api/destinations", headers=_bearer(VIEWER),
                                                       timeout=10).json()["destinations"]}
    assert destinations["archive"]["health"] == "ok" and destinations["down"]["health"] == "failing"
    assert destinations["archive"]["last_delivery"]["job_id"] == done["id"]
    echo = requests.post(f"{url}/api/destinations/archive/echo", headers=_bearer(ADMIN), timeout=30).json()
    assert echo["ok"] is True and "writable" in echo["result"]
    down = requests.post(f"{url}/api/destinations/down/echo", headers=_bearer(ADMIN), timeout=30).json()
    assert down["ok"] is False and "no association" in down["result"]
    assert requests.post(f"{url}/api/destinations/nope/echo", headers=_bearer(ADMIN), timeout=10).status_code == 404

    retried = requests.post(f"{url}/api/jobs/{parked['id']}/retry", headers=_bearer(ADMIN), timeout=10).json()
    assert "queued again" in retried["outcome"]
    events = requests.get(f"{url}/api/audit?since=1h", headers=_bearer(ADMIN), timeout=10).json()["events"]
    actions = [(e["actor"], e["action"]) for e in events if e["event"] == "admin"]
    assert ("token:ops", "retry") in actions and ("token:ops", "echo") in actions
    assert len(requests.get(f"{url}/api/audit?limit=2", headers=_bearer(ADMIN), timeout=10).json()["events"]) == 2

    config = copy.deepcopy(node.config)
    config["routes"][0]["send_to"] = ["nowhere"]
    node.config_path.write_text(yaml.safe_dump(config))
    refused = requests.post(f"{url}/api/config/reload", headers=_bearer(ADMIN), timeout=30)
    assert refused.status_code == 422 and any("nowhere" in r for r in refused.json()["reasons"])
    config["routes"][0]["send_to"] = ["archive"]
    node.config_path.write_text(yaml.safe_dump(config))
    applied = requests.post(f"{url}/api/config/reload", headers=_bearer(ADMIN), timeout=30)
    assert applied.status_code == 200 and "routes: ~ parked" in applied.json()["changes"]

    # Tokens reload too: the viewer token rotated (its name now reads another variable) stops
    # working at once, the status page session it signed in ends, the new secret works.
    browser = requests.Session()
    assert browser.post(f"{url}/signin", data={"token": VIEWER}, timeout=10).status_code == 200
    assert "Sign in" not in browser.get(f"{url}/", timeout=10).text
    config["http"]["tokens"][1]["token_env"] = "SRNODE_TEST_VIEWER_ROTATED"
    node.config_path.write_text(yaml.safe_dump(config))
    rotated = requests.post(f"{url}/api/config/reload", headers=_bearer(ADMIN), timeout=30)
    assert rotated.status_code == 200 and "http: tokens" in rotated.json()["changes"]
    assert requests.get(f"{url}/api/jobs", headers=_bearer(VIEWER), timeout=10).status_code == 401
    assert requests.get(f"{url}/api/jobs", headers=_bearer(ROTATED), timeout=10).status_code == 200
    page = browser.get(f"{url}/", timeout=10)
    assert page.url.endswith("/signin") and "Sign in" in page.text


def test_repeated_bad_tokens_are_backed_off_on_the_admin_api(make_node, tmp_path, monkeypatch):
    node = _node(make_node, tmp_path, monkeypatch)
    codes = [requests.get(f"{node.url}/api/jobs", headers=_bearer("guess"), timeout=10).status_code
             for _ in range(12)]
    assert codes[0] == 401 and 429 in codes

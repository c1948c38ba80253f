"""The status page in a real headless Chromium: sign in, see a job just sent, retry a parked one."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests import series_factory as make
from tests.peers import StoreSCP, free_port, storescu, wait_for
from tests.test_admin_api import ADMIN, TOKENS, VIEWER
from tests.test_node_e2e import all_delivered, route

pytestmark = pytest.mark.integration

SCREENSHOT = Path(__file__).parents[1] / "docs" / "status-page.png"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("needs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def test_sign_in_see_the_job_just_sent_and_retry_a_parked_one(make_node, tmp_path, monkeypatch, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shows
    from selenium.webdriver.support.ui import WebDriverWait

    def find(element_id: str):  # after a click that loads a page: wait for it
        return WebDriverWait(browser, 10).until(shows.presence_of_element_located((By.ID, element_id)))

    monkeypatch.setenv("SRNODE_TEST_ADMIN", ADMIN)
    monkeypatch.setenv("SRNODE_TEST_VIEWER", VIEWER)
    down_port = free_port()
    node = make_node(
        routes=[route("chest", {"calling_ae": "PARKER"}, {"inplane_scale": 2}, send_to=["pacs"]),
                route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])],
        destinations={"archive": {"type": "folder", "path": str(tmp_path / "archive")},
                      "pacs": {"type": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1", "port": down_port,
                               "timeout_s": 2}},
        peers=[{"ae_title": "STORESCU"}, {"ae_title": "PARKER"}], max_attempts=1,
        http_port=free_port(), tokens=TOKENS)
    url = f"http://127.0.0.1:{node.config['http']['port']}"
    assert storescu(make.ct_volume(tmp_path / "park", "page-park", 2), node.port, calling_ae="PARKER").returncode == 0
    [parked] = node.wait_jobs(lambda jobs: jobs and jobs[0]["state"] == "parked", timeout=60, what="parked")
    assert storescu(make.ct_volume(tmp_path / "ok", "page-ok", 3), node.port).returncode == 0
    jobs = node.wait_jobs(lambda jobs: len(jobs) == 2 and jobs[0]["state"] == "delivered", timeout=60,
                          what="the job just sent delivered")
    sent = jobs[0]

    browser.get(url + "/")
    assert browser.current_url.endswith("/signin")
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "signin").click()
    assert "unknown token" in find("error").text
    browser.find_element(By.ID, "token").send_keys(ADMIN)
    browser.find_element(By.ID, "signin").click()
    row = find(f"job-{sent['id']}").text
    assert "delivered" in row and "ct / interp" in row and "3 → 3" in row
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN not in cookie["value"]
    # The job's QA picture: linked from its row, served with the session cookie or a viewer token, 401 without.
    link = browser.find_element(By.ID, f"qa-{sent['id']}-1")
    assert "dB" in link.text and "QA low" not in link.text
    picture = requests.get(link.get_attribute("href"), cookies={cookie["name"]: cookie["value"]}, timeout=10)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert requests.get(link.get_attribute("href"), timeout=10).status_code == 401
    numbers = requests.get(f"{url}/ui/jobs/{sent['id']}/qa/1.json", headers={"Authorization": f"Bearer {VIEWER}"},
                           timeout=10)
    assert numbers.status_code == 200 and numbers.json()["consistency"]["compared"] == 3
    assert requests.get(f"{url}/ui/jobs/{sent['id']}/qa/2.png", cookies={cookie["name"]: cookie["value"]},
                        timeout=10).status_code == 404
    problem = browser.find_element(By.ID, f"problem-{parked['id']}").text
    assert "parked" in problem and "no association" in problem

    # A POST without the page's CSRF token is refused, even with the session cookie.
    forged = requests.post(f"{url}/ui/jobs/{parked['id']}/retry", cookies={cookie["name"]: cookie["value"]},
                           data={"csrf": "forged"}, allow_redirects=False, timeout=10)
    assert forged.status_code == 403

    # A viewer sees the problem but no Retry button, and its own session's form token does not let it retry.
    viewer = requests.Session()
    page = viewer.post(f"{url}/signin", data={"token": VIEWER}, timeout=10).text
    assert f'id="problem-{parked["id"]}"' in page and f'id="retry-{parked["id"]}"' not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    refused = viewer.post(f"{url}/ui/jobs/{parked['id']}/retry", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert refused.status_code == 403 and "retry needs admin" in refused.text

    os.makedirs(tmp_path / "shots", exist_ok=True)
    browser.save_screenshot(str(tmp_path / "shots" / "status.png"))
    if os.environ.get("SRNODE_UPDATE_SCREENSHOT"):  # the README's picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "shots" / "status.png", SCREENSHOT)

    scp = StoreSCP(tmp_path / "scp", port=down_port).start()
    try:
        browser.find_element(By.ID, f"retry-{parked['id']}").click()
        assert "queued again" in find("message").text
        node.wait_jobs(all_delivered(2), timeout=60, what="the retried job delivered")
        assert len(scp.wait_for_files(2)) == 2
    finally:
        scp.stop()
    browser.refresh()
    wait_for(lambda: "None." in browser.find_element(By.ID, "problems").text, 5, what="no problem left")


def test_an_old_parked_job_stays_on_the_status_page_of_a_busy_node(tmp_path):
    """The problem list asks the ledger for those states, not the newest few hundred jobs; queue
    counts come from COUNT(*) (a busy node's page loaded 100k rows per refresh)."""
    import yaml

    from node.config import load_config
    from node.http.ui import status_view
    from node.server import Node
    from tests.node_fixtures import node_config

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node_config(free_port(), tmp_path / "spool", routes=[], destinations={})))
    node = Node(load_config(path))
    try:
        ledger = node.ledger
        old = ledger.add_job("1.2.9.0", "1.2.9", "ct", "interp", {}, [], "k0")
        ledger.set_job_state(old.id, "parked", "the PACS refused it")
        for n in range(1, 601):
            ledger.add_job(f"1.2.9.{n}", "1.2.9", "ct", "interp", {}, [], f"k{n}")
        view = status_view(node)
        assert [(j["id"], j["reason"]) for j in view["problems"]] == [(old.id, "the PACS refused it")]
        assert view["queue"] == {"pending": 600, "queued": 0, "dispatching": 0}
    finally:
        node.ledger.close()

"""A full spool disk, for real (a small tmpfs): a job that stops on it waits and runs again by itself
once there is room; a node started on it says why in one line, or starts and refuses instances."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import requests

from node.ledger import Ledger
from node.spool import Spool
from tests import series_factory as make
from tests.node_fixtures import _env
from tests.peers import free_port, storescu, wait_for
from tests.test_http import TOKENS, _mount_tmpfs, bearer, tokens  # noqa: F401  (tokens: a fixture)
from tests.test_node_e2e import route

pytestmark = pytest.mark.integration

MIN_FREE = 1 << 20


def _fill(spool, leave: int) -> None:
    """One file that leaves ``leave`` bytes free on the spool's disk."""
    filler = spool / "filler"
    size = filler.stat().st_size if filler.exists() else 0
    filler.write_bytes(b"\0" * (shutil.disk_usage(spool).free + size - leave))


@pytest.fixture
def small_disk(tmp_path):
    spool = tmp_path / "tmpfs"
    _mount_tmpfs(spool, "6m")
    yield spool
    time.sleep(0.2)
    subprocess.run(["umount", "-l", str(spool)], check=False)


def _on(node, spool) -> None:
    node.config["node"]["spool"] = str(spool)
    node.spool = spool
    node.config_path.write_text(__import__("yaml").safe_dump(node.config))


def test_a_job_stopped_by_a_full_disk_waits_and_runs_again_once_there_is_room(make_node, small_disk, tmp_path,
                                                                             tokens):  # noqa: F811
    """The disk fills between the series and its job: the job parks as waiting_disk (one log line,
    the reason in `srnode jobs` and /api/jobs), stays parked while the disk is under min_free_bytes
    (past its first back-off), and resumes by itself (one line) once the filler goes."""
    archive = tmp_path / "archive"
    http = free_port()
    node = make_node(start=False, routes=[route("ct", {"Modality": "CT"}, {"inplane_scale": 2}, send_to=["archive"])],
                     destinations={"archive": {"type": "folder", "path": str(archive)}}, quiet_seconds=1.5,
                     retention={"min_free_bytes": MIN_FREE}, http_port=http, tokens=TOKENS)
    _on(node, small_disk)
    node.start()
    ct = make.ct_volume(tmp_path / "ct", "disk-full-job", 3)  # 3 x 128x128 in, 3 x 256x256 (~400 kB) out
    assert storescu(ct, node.port).returncode == 0
    _fill(small_disk, 200 << 10)  # before the series is complete: its outputs do not fit
    jobs = node.wait_jobs(lambda j: j and j[0]["state"] == "waiting_disk", timeout=20, what="job waiting for disk")
    assert "No space left on device" in jobs[0]["reason"] and "retention.min_free_bytes" in jobs[0]["reason"]
    assert jobs[0]["disk_waits"] == 1
    api = requests.get(f"http://127.0.0.1:{http}/api/jobs?state=waiting_disk", headers=bearer("viewer-token-for-tests"),
                       timeout=10).json()["jobs"]
    assert [j["id"] for j in api] == [jobs[0]["id"]] and "waiting for disk space" in api[0]["reason"]
    assert "waiting_disk" in node.cli("jobs").stdout

    time.sleep(2.5)  # past the first back-off (2 s): the disk is still under min_free_bytes, so it waits
    assert [j["state"] for j in node.jobs()] == ["waiting_disk"]
    assert node.log().count("parked, waiting for disk space") == 1 and "resumes" not in node.log()

    (small_disk / "filler").unlink()
    jobs = node.wait_jobs(lambda j: j[0]["state"] == "delivered", timeout=30, what="job delivered once space is back")
    assert len(list(archive.rglob("*.dcm"))) == 3 and jobs[0]["instances_out"] == 3
    log = node.log()
    assert log.count("resumes: disk space is back") == 1 and log.count("parked, waiting for disk space") == 1
    assert "Traceback" not in log


def test_a_node_started_on_a_full_disk_says_so_or_starts_and_refuses(make_node, small_disk, tmp_path, tokens):  # noqa: F811
    """No room at all (not even for SQLite's WAL index): `srnode run` exits with one line. Some room,
    under min_free_bytes: it starts, /healthz is 503 with the reason and C-STORE gets 0xA700."""
    http = free_port()
    node = make_node(start=False, routes=[], destinations={}, retention={"min_free_bytes": MIN_FREE}, http_port=http,
                     tokens=TOKENS)
    _on(node, small_disk)
    Ledger(Spool(small_disk).ensure().ledger_path).close()  # a node that ran here before
    for path in small_disk.glob("ledger.sqlite3-*"):
        path.unlink()
    _fill(small_disk, 0)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "node.cli", "run", "--config", str(node.config_path)],
                         capture_output=True, text=True, env=_env(), timeout=30)
    assert run.returncode == 1 and time.monotonic() - started < 10
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("srnode: cannot start: the spool's disk is full") and "retention.min_free_bytes" in lines[-1]

    _fill(small_disk, 400 << 10)  # room to run, under min_free_bytes
    node.start()
    health = requests.get(f"http://127.0.0.1:{http}/healthz", timeout=10)
    assert health.status_code == 503 and any("under retention.min_free_bytes" in r for r in health.json()["reasons"])
    assert storescu(make.ct_small(tmp_path / "ct", "full-start"), node.port, check=False).returncode != 0
    wait_for(lambda: "refused: node disk nearly full" in node.log(), 5, what="C-STORE refusal logged")
    assert node.proc.poll() is None and "Traceback" not in node.log()


def test_a_disk_that_stays_full_costs_no_retry_loop(tmp_path):
    """The back-off between runs of a job that keeps stopping on a full disk doubles (2 s, 4 s, ...,
    10 min) even when min_free_bytes is 0, and nothing resumes while the disk is under it."""
    from node.assembly import Assembler
    from node.config import Config
    from node.jobs import write_job_spec
    from node.scheduler import Scheduler
    from node.spool import write_json

    config = Config.model_validate({"retention": {"min_free_bytes": 0}})
    full = Config.model_validate({"retention": {"min_free_bytes": 1 << 62}})  # no disk has that free
    spool = Spool(tmp_path / "spool").ensure()
    ledger = Ledger(spool.ledger_path)
    submitted = []
    scheduler = Scheduler(config, spool, ledger, Assembler(spool, ledger, 0), submitted.append)
    job = ledger.add_job("1.2.3", "1.2", "ct", "interp", {}, ["out"], "k")
    write_job_spec(spool, job.id, [], "interp", {}, 1)
    for waits, back_off in ((1, 2.0), (2, 4.0), (3, 8.0)):
        ledger.set_job_state(job.id, "queued")
        write_json(spool.job_dir(job.id) / "result.json",
                   {"state": "failed", "reason": "OSError: [Errno 28] No space left on device", "disk_full": True})
        scheduler._collect(ledger.job(job.id))
        parked = ledger.job(job.id)
        assert (parked.state, parked.disk_waits) == ("waiting_disk", waits)
        assert scheduler.resume_disk_waits(now=parked.updated + back_off - 0.1) == []
        scheduler.config = full  # under min_free_bytes: nothing resumes, back-off or not
        assert scheduler.resume_disk_waits(now=parked.updated + 3600) == []
        scheduler.config = config
        assert scheduler.resume_disk_waits(now=parked.updated + back_off) == [job.id]
        scheduler.tick()  # pending -> queued: the old result goes, the job is submitted again
        assert ledger.job(job.id).state == "queued" and submitted[-1] == job.id
        assert not (spool.job_dir(job.id) / "result.json").exists()
    assert len(submitted) == 3

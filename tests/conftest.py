"""Shared fixtures: real peers on free ports (Orthanc, dcmtk storescp, Redis), owned by fixtures.

A failing test gets the log tail of every peer it used appended to its report ("Orthanc log",
"storescp log" sections). ``item.rep_setup`` / ``rep_call`` / ``rep_teardown`` are set on every test
item so fixtures can ask whether their test failed.
"""
from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.config
import pydicom.data
import pytest

from tests.peers import Orthanc, StoreSCP, flush_redis, redis_url as _redis_url

PEERS = pytest.StashKey[list]()  # peers a test used, for the failure report


def _register(request: pytest.FixtureRequest, peer: object) -> None:
    request.node.stash.setdefault(PEERS, []).append(peer)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed:
        for peer in item.stash.get(PEERS, []):
            label = "Orthanc log" if isinstance(peer, Orthanc) else "storescp log"
            report.sections.append((f"{label} ({peer!r})", peer.log_tail(120)))
    return report


# -- Orthanc --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """One Orthanc 1.10 + DICOMweb for the session (AE ``ORTHANC``; knows ``NODE`` = SRNODE@127.0.0.1:11112).

    Tests that share it should use :func:`fresh_orthanc` (emptied first) or look only at their own
    UIDs. A test that stops or kills it must ``restart()`` it (``fresh_orthanc`` does that too).
    Declare a node on a free port with ``orthanc.add_modality(name, aet, port)``.
    """
    server = Orthanc(tmp_path_factory.mktemp("orthanc"),
                     modalities={"NODE": ["SRNODE", "127.0.0.1", 11112]}).start()
    yield server
    server.kill()  # its data is thrown away: a graceful stop would only cost ~3.5 s


@pytest.fixture
def fresh_orthanc(orthanc: Orthanc, request: pytest.FixtureRequest) -> Orthanc:
    """The session Orthanc, running and empty (all patients deleted, ~20 ms)."""
    if not orthanc.running:
        orthanc.start()
    orthanc.clear()
    _register(request, orthanc)
    return orthanc


@pytest.fixture
def make_orthanc(tmp_path: Path, request: pytest.FixtureRequest):
    """Factory for private Orthancs (for fault tests that stop, kill or reconfigure one).

    ``make_orthanc(modalities=..., config=..., start=True) -> Orthanc``; killed at teardown.
    """
    servers: list[Orthanc] = []

    def make(start: bool = True, **kwargs) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(servers)}", **kwargs)
        servers.append(server)
        _register(request, server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.kill()


# -- dcmtk storescp -------------------------------------------------------------------------------
@pytest.fixture
def storescp(tmp_path: Path, request: pytest.FixtureRequest):
    """A dcmtk ``storescp`` (AE ``STORESCP``) on a free port writing into ``tmp_path/storescp``."""
    scp = StoreSCP(tmp_path / "storescp").start()
    _register(request, scp)
    yield scp
    scp.stop()


# -- Redis ----------------------------------------------------------------------------------------
@pytest.fixture
def redis_url() -> str:
    """``redis://127.0.0.1:6379/<SRNODE_TEST_REDIS_DB, else 15>``, flushed before and after the test (skip if absent, fail in CI)."""
    url = _redis_url()
    flush_redis(url)
    yield url
    flush_redis(url)


# -- data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ct_small() -> Path:
    """pydicom's ``CT_small.dcm`` (one 128x128 CT slice, Explicit VR Little Endian)."""
    return Path(pydicom.data.get_testdata_file("CT_small.dcm"))


@pytest.fixture
def strict_pydicom():
    """pydicom raises on invalid values while reading and writing, for round-trip checks of outputs."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


# -- node fixtures (tests/node_fixtures.py, written by the node engineer) ----------------------------
# pytest_plugins is not allowed in a non-root conftest, so its fixtures are imported here when it exists.
if (Path(__file__).parent / "node_fixtures.py").exists():
    from tests.node_fixtures import *  # noqa: E402,F401,F403

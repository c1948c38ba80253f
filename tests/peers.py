"""Real DICOM peers for tests: dcmtk tools, a dcmtk ``storescp``, an Orthanc PACS with DICOMweb, Redis.

Everything here talks to real programs on loopback and free ports; every wait has a deadline.
What a test needs but the machine lacks is skipped with the reason on a developer's machine and
fails in CI (``CI`` set), where ``.ci/run`` installs it: a missing tool must never look green there.

pynetdicom 3 installs console scripts named ``storescu``, ``storescp``, ``echoscu``... that shadow
dcmtk's on ``PATH``; :func:`dcmtk` resolves the real dcmtk binaries and checks their ``--version``.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import requests

__all__ = [
    "IN_CI", "free_port", "wait_for", "port_open", "unavailable", "dcmtk", "storescu", "dcmsend", "echoscu",
    "Orthanc", "tag_value", "StoreSCP", "redis_url", "flush_redis", "TEST_REDIS_DB",
]

IN_CI = bool(os.environ.get("CI"))
LOOPBACK = "127.0.0.1"
DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)
TEST_REDIS_DB = int(os.environ.get("SRNODE_TEST_REDIS_DB", "15"))


# -- basics -----------------------------------------------------------------------------------
def unavailable(reason: str) -> None:
    """Skip the test with ``reason``; in CI fail instead, since CI must have every peer installed."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: .ci/run should have installed it)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises ``AssertionError`` naming ``what`` (a string, or a callable evaluated only on timeout so it
    can describe the state at that moment) once ``timeout`` seconds have passed. Exceptions raised
    by ``predicate`` propagate at once: raise ``AssertionError`` there to fail early (a peer died).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    start = time.monotonic()
    deadline = start + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        now = time.monotonic()
        if now >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(
                f"timed out after {now - start:.1f}s (limit {timeout}s) waiting for {description}; "
                f"last value: {last!r}"
            )
        time.sleep(min(interval, max(deadline - now, 0.0)))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["TCP_NODELAY"] = "1"  # Nagle costs ~40 ms per C-STORE otherwise (dicom-networking.md)
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies, so no peer outlives a crashed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# -- dcmtk command-line tools -----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _dcmtk_path(name: str) -> str | None:
    candidates = [os.path.join(d, name) for d in DCMTK_DIRS]
    candidates += [os.path.join(d, name) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in dict.fromkeys(candidates):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        banner = out.stdout + out.stderr
        if "dcmtk" in banner.lower() or "OFFIS" in banner:
            return os.path.realpath(path)
    return None


def dcmtk(name: str) -> str:
    """Absolute path of the real dcmtk tool ``name`` (not pynetdicom's console script of that name)."""
    path = _dcmtk_path(name)
    if path is None:
        unavailable(f"dcmtk {name} is not installed (apt-get install dcmtk)")
    return path


def _file_args(files: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[str], bool]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [os.fspath(f) for f in files]
    if not paths:
        raise ValueError("no files to send")
    return paths, any(os.path.isdir(p) for p in paths)


def _run_tool(argv: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv[0]} ran past {timeout}s: {' '.join(argv[:8])} ...\n"
                             f"stdout: {exc.stdout}\nstderr: {exc.stderr}") from None
    if check and proc.returncode != 0:
        shown = " ".join(argv[:12]) + (" ..." if len(argv) > 12 else "")
        raise AssertionError(f"{shown} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def storescu(files: str | os.PathLike | Iterable[str | os.PathLike], port: int, called_ae: str = "SRNODE",
             calling_ae: str = "STORESCU", host: str = LOOPBACK, extra: Iterable[str] = (), *,
             check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Send ``files`` (files or folders, scanned recursively) with dcmtk ``storescu`` on one association.

    ``storescu`` converts to uncompressed syntaxes and fails on compressed files: use :func:`dcmsend`
    or pass ``extra=("-xw",)`` / ``("-xy",)``. With ``check`` a non-zero exit raises ``AssertionError``
    with the tool's output; set ``check=False`` when a failure is the point of the test.
    """
    paths, has_dir = _file_args(files)
    argv = [dcmtk("storescu"), "-aet", calling_ae, "-aec", called_ae, *(["+sd", "+r"] if has_dir else []),
            *extra, host, str(port), *paths]
    return _run_tool(argv, check, timeout)


def dcmsend(files: str | os.PathLike | Iterable[str | os.PathLike], port: int, called_ae: str = "SRNODE",
            calling_ae: str = "DCMSEND", host: str = LOOPBACK, extra: Iterable[str] = (), *,
            check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk ``dcmsend``, which offers each file's own transfer syntax (compressed too)."""
    paths, has_dir = _file_args(files)
    argv = [dcmtk("dcmsend"), "-aet", calling_ae, "-aec", called_ae, *(["+sd", "+r"] if has_dir else []),
            *extra, host, str(port), *paths]
    return _run_tool(argv, check, timeout)


def echoscu(port: int, called_ae: str = "SRNODE", calling_ae: str = "ECHOSCU", host: str = LOOPBACK,
            extra: Iterable[str] = (), *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """One C-ECHO with dcmtk ``echoscu``."""
    argv = [dcmtk("echoscu"), "-aet", calling_ae, "-aec", called_ae, *extra, host, str(port)]
    return _run_tool(argv, check, timeout)


# -- Orthanc ------------------------------------------------------------------------------------
def _first_existing(candidates: Iterable[str]) -> str | None:
    return next((c for c in candidates if os.path.exists(c)), None)


class Orthanc:
    """A real Orthanc with the DICOMweb plugin, in its own folder, on free HTTP and DICOM ports.

    Parameters
    ----------
    root
        Folder for the config, the database and the log (a new temporary folder if ``None``).
    modalities
        ``DicomModalities``: name -> ``[aet, host, port]``, so Orthanc can C-STORE / C-MOVE to them.
    aet
        Orthanc's own AE title.
    config
        Extra configuration keys, merged over the defaults.
    tls
        DICOM TLS on its DICOM port (then TLS only): ``{"certificate": path, "private_key": path,
        "trusted": CA path, "require_client_certificate": bool}`` (Orthanc's ``DicomTls*`` keys).

    ``stop()`` is graceful (~3.5 s, Orthanc's own shutdown), ``kill()`` is SIGKILL; ``start()`` after
    either, and ``restart()``, come back on the same ports with the same storage (free ports are
    picked once, at the first start, which retries with new ones if another process took them).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, modalities: dict[str, list] | None = None,
                 aet: str = "ORTHANC", config: dict[str, Any] | None = None,
                 http_port: int | None = None, dicom_port: int | None = None, tls: dict[str, Any] | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.tls = dict(tls) if tls else None
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.extra_config = dict(config or {})
        self._fixed_ports = http_port is not None or dicom_port is not None
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()

    # -- addresses
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"Orthanc(aet={self.aet!r}, http={self.http_port}, dicom={self.dicom_port}, root={str(self.root)!r})"

    # -- lifecycle
    def config(self) -> dict[str, Any]:
        plugin = _first_existing(DICOMWEB_PLUGIN_CANDIDATES)
        cfg = {
            "Name": "TEST_PACS",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "Plugins": [plugin] if plugin else [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "OverwriteInstances": False,
            "DicomModalities": self.modalities,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": LOOPBACK, "Ssl": False},
            "SaveJobs": False,
        }
        if self.tls:
            cfg.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(self.tls["certificate"]),
                        "DicomTlsPrivateKey": str(self.tls["private_key"]),
                        "DicomTlsTrustedCertificates": str(self.tls["trusted"]),
                        "DicomTlsRemoteCertificateRequired": bool(self.tls.get("require_client_certificate"))})
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 30) -> "Orthanc":
        """Start Orthanc and wait until ``/system`` and the DICOMweb root answer and the DICOM port listens."""
        if self.running:
            return self
        binary = shutil.which("Orthanc") or _first_existing(ORTHANC_CANDIDATES)
        if binary is None:
            unavailable("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        if _first_existing(DICOMWEB_PLUGIN_CANDIDATES) is None:
            unavailable("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        for attempt in range(3):
            try:
                self._start_once(binary, timeout)
                self._fixed_ports = True  # later starts (restart, start after stop) keep these ports
                return self
            except _PortTaken:
                if self._fixed_ports or attempt == 2:
                    raise AssertionError(f"{self!r} could not bind its ports:\n{self.log_tail()}") from None
                self.http_port, self.dicom_port = free_port(), free_port()
        return self

    def _start_once(self, binary: str, timeout: float) -> None:
        self.http.close()  # no pooled connection to a previous process
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")
        log.write(f"\n===== starting {binary} {self.config_path} at {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen([binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root, env=_env(), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.close()
        wait_for(self._ready, timeout, interval=0.02, what=lambda: f"{self!r} to answer\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            text = self.log_path.read_bytes()[self._log_offset:].decode(errors="replace")
            if "already in use" in text:  # "The TCP port of the ... server is privileged or already in use"
                raise _PortTaken()
            raise AssertionError(f"{self!r} exited with code {self.proc.returncode}:\n{self.log_tail()}")
        try:
            system = self.http.get(f"{self.url}/system", timeout=1)
            if system.status_code != 200:
                return False
            info = system.json()
            if (info.get("HttpPort"), info.get("DicomPort")) != (self.http_port, self.dicom_port):
                return False  # another server holds our HTTP port: ours is about to exit
            qido = self.http.get(f"{self.dicomweb_url}/studies", params={"limit": 1}, timeout=1,
                                 headers={"Accept": "application/dicom+json"})
        except requests.ConnectionError:
            return False
        if qido.status_code not in (200, 204):
            raise AssertionError(f"{self!r}: the DICOMweb plugin does not answer QIDO-RS "
                                 f"({qido.status_code}):\n{self.log_tail()}")
        return port_open(self.dicom_port)

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM, wait); SIGKILL after ``timeout`` s."""
        if self.proc is not None:
            _terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (the SQLite index survives)."""
        if self.proc is not None:
            _kill(self.proc)

    def restart(self, *, kill: bool = False, timeout: float = 30) -> "Orthanc":
        """Stop (or kill) and start again on the same ports and storage."""
        self.kill() if kill else self.stop()
        wait_for(lambda: not port_open(self.http_port) and not port_open(self.dicom_port), 10,
                 what=f"ports {self.http_port}/{self.dicom_port} of {self!r} to close")
        return self.start(timeout)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 200) -> str:
        return _tail(self.log_path, lines)

    # -- REST
    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` on the REST API and return the decoded JSON (raises on HTTP errors)."""
        response = self.http.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)
        response.raise_for_status()
        return response.json()

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def wait_instance_count(self, count: int, timeout: float = 30) -> int:
        """Wait until Orthanc holds at least ``count`` instances; return the count."""
        return wait_for(lambda: (n := self.instance_count()) >= count and n, timeout, interval=0.1,
                        what=lambda: f"{count} instances in {self!r} (has {self.instance_count()})")

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.get("/patients"):
            self.http.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()

    def add_modality(self, name: str, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Declare a DICOM peer at run time (``PUT /modalities/{name}``), e.g. a node on a free port."""
        body = {"AET": aet, "Host": host, "Port": port}
        self.http.put(f"{self.url}/modalities/{name}", json=body, timeout=30).raise_for_status()
        self.modalities[name] = [aet, host, port]  # kept across restart()

    def find_instance(self, sop_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or ``None``."""
        response = self.http.post(f"{self.url}/tools/find", timeout=30,
                                  json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
        response.raise_for_status()
        ids = response.json()
        return ids[0] if ids else None

    def get_instance_file(self, sop_uid: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of the instance with this SOP Instance UID."""
        orthanc_id = self.find_instance(sop_uid)
        if orthanc_id is None:
            raise AssertionError(f"{self!r} has no instance {sop_uid}")
        response = self.http.get(f"{self.url}/instances/{orthanc_id}/file", timeout=60)
        response.raise_for_status()
        return response.content

    # -- QIDO-RS (DICOM JSON: {"0020000E": {"vr": "UI", "Value": [...]}, ...})
    def qido(self, path: str, params: dict[str, Any] | None = None) -> list[dict]:
        """QIDO-RS ``GET {dicomweb_url}{path}``; an unknown study or series gives ``[]``."""
        response = self.http.get(f"{self.dicomweb_url}{path}", params=params, timeout=30,
                                 headers={"Accept": "application/dicom+json"})
        if response.status_code in (204, 404):
            return []
        response.raise_for_status()
        return response.json() if response.content else []

    def studies(self, **params: Any) -> list[dict]:
        return self.qido("/studies", params or None)

    def series_of_study(self, study_uid: str) -> list[dict]:
        return self.qido(f"/studies/{study_uid}/series")

    def instances_of_series(self, study_uid: str, series_uid: str) -> list[dict]:
        return self.qido(f"/studies/{study_uid}/series/{series_uid}/instances")


class _PortTaken(Exception):
    """Orthanc exited because one of its ports was taken between free_port() and bind()."""


def tag_value(item: dict, tag: str, default: Any = None) -> Any:
    """First value of ``tag`` (8 hex digits, e.g. ``"0020000E"``) in a DICOM JSON object."""
    values = item.get(tag.upper(), {}).get("Value")
    return values[0] if values else default


# -- dcmtk storescp -------------------------------------------------------------------------------
class StoreSCP:
    """dcmtk ``storescp`` on a free port, writing each received instance to ``directory``.

    It accepts every transfer syntax it knows (``+xa``) and writes the data set as received
    (``+B``), one file per SOP Instance UID (``<modality>.<SOP Instance UID>.dcm``).
    """

    def __init__(self, directory: str | os.PathLike, ae_title: str = "STORESCP", port: int | None = None,
                 extra: Iterable[str] = ()):
        self.directory = Path(directory)
        self.ae_title = ae_title
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.extra = tuple(extra)
        self.log_path = self.directory.parent / f"{self.directory.name}.storescp.log"
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"StoreSCP(aet={self.ae_title!r}, port={self.port}, directory={str(self.directory)!r})"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15) -> "StoreSCP":
        """Start ``storescp`` and wait until it listens; a free port taken meanwhile is replaced once."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                self._start_once(timeout)
                self._fixed_port = True
                return self
            except _PortTaken:
                if self._fixed_port or attempt == 2:
                    raise AssertionError(f"{self!r} could not bind its port:\n{self.log_tail()}") from None
                self.port = free_port()
        return self

    def _start_once(self, timeout: float) -> None:
        argv = [dcmtk("storescp"), "-v", "-aet", self.ae_title, "-od", str(self.directory), "+xa", "+B",
                "-fe", ".dcm", *self.extra, str(self.port)]
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=_env(), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.close()
        wait_for(self._listening, timeout, interval=0.02, what=lambda: f"{self!r} to listen\n{self.log_tail()}")
        # another process may hold the port: storescp then exits at once ("Address already in use")
        time.sleep(0.05)
        self._listening()

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            if "already in use" in self.log_path.read_bytes()[self._log_offset:].decode(errors="replace"):
                raise _PortTaken()
            raise AssertionError(f"{self!r} exited with code {self.proc.returncode}:\n{self.log_tail()}")
        return port_open(self.port)

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            _terminate(self.proc, timeout)

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        return sorted(p for p in self.directory.glob("*.dcm") if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 30) -> list[Path]:
        """Wait until at least ``count`` files exist and their sizes stop changing; return them."""
        seen: dict[Path, int] = {}

        def settled() -> list[Path] | None:
            files = self.files()
            sizes = {p: p.stat().st_size for p in files}
            stable = len(files) >= count and sizes == seen
            seen.clear()
            seen.update(sizes)
            return files if stable else None

        return wait_for(settled, timeout, interval=0.05,
                        what=lambda: f"{count} files from {self!r} (has {len(self.files())})\n{self.log_tail(40)}")

    def log_tail(self, lines: int = 200) -> str:
        return _tail(self.log_path, lines)


# -- Redis ----------------------------------------------------------------------------------------
def redis_url(db: int = TEST_REDIS_DB, host: str = LOOPBACK, port: int = 6379) -> str:
    """``redis://127.0.0.1:6379/<db>`` for tests, once Redis answers PING.

    Skips the test when Redis is unreachable on a developer's machine; fails in CI. The db number
    (15 unless ``SRNODE_TEST_REDIS_DB`` says otherwise) keeps tests away from db 0.
    """
    import redis

    url = f"redis://{host}:{port}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is unreachable at {url}: {exc} (start one: redis-server --daemonize yes "
                    f"--port {port} --save '' --appendonly no)")
    finally:
        client.close()
    return url


def flush_redis(url: str) -> None:
    """Empty the Redis database named by ``url`` (only that db)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()

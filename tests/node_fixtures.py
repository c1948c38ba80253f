"""Fixtures that run the real node: `srnode run` as a subprocess with its own config and spool."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.peers import free_port, wait_for


def node_config(port: int, spool: Path, *, routes: list[dict], destinations: dict[str, dict],
                peers: list[dict] | None = None, broker: str = "embedded", quiet_seconds: float = 0.5,
                max_attempts: int = 30, backoff_initial_s: float = 0.3, backoff_max_s: float = 1.0,
                visibility_timeout_s: int = 3600, max_associations: int = 16,
                http_port: int | None = None, tokens: list[dict] | None = None,
                stow_hold_seconds: float = 60, retention: dict[str, Any] | None = None,
                **node_extra: Any) -> dict[str, Any]:
    """A node's config; ``http_port`` turns the HTTP service on (STOW-RS, /healthz, /metrics);
    ``retention.min_free_bytes`` is 0 unless given (test machines' disks vary); ``node_extra``: more
    ``node`` keys (``tls``, ``limits``, ``bind``)."""
    config = {
        "retention": {"min_free_bytes": 0, **(retention or {})},
        "node": {"ae_title": "SRNODE", "port": port, "bind": "127.0.0.1", "spool": str(spool), "log_level": "INFO",
                 "max_associations": max_associations, **node_extra},
        "peers": peers if peers is not None else [{"ae_title": "STORESCU"}],
        "destinations": destinations,
        "routes": routes,
        "completion": {"quiet_seconds": quiet_seconds, "stow_hold_seconds": stow_hold_seconds},
        "queue": {"broker": broker, "visibility_timeout_s": visibility_timeout_s},
        "dispatch": {"max_attempts": max_attempts, "backoff_initial_s": backoff_initial_s,
                     "backoff_max_s": backoff_max_s},
    }
    if http_port:
        config["http"] = {"port": http_port, "bind": "127.0.0.1", "tokens": tokens or []}
    return config


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["TCP_NODELAY"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class NodeProcess:
    """One node: `srnode run` in a subprocess, its config file, spool and log in ``root``."""

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.config = config
        self.tls_port = (config["node"].get("tls") or {}).get("port")
        self.port = config["node"]["port"] or self.tls_port
        # start() waits for every listener (the HTTP service opens its port after the DICOM ones): plain
        # ports by connecting; the TLS port by its log line, as a connection without a handshake would
        # be logged and counted against 127.0.0.1 as a failed TLS peer (node.backoff).
        self.ports = [p for p in (config["node"]["port"], (config.get("http") or {}).get("port")) if p]
        self.spool = Path(config["node"]["spool"])
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        wait_for(self._listening, timeout, what=f"node listening on {self.ports} (TLS {self.tls_port})\n{self.log()[-3000:]}")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
        for port in self.ports:
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return not self.tls_port or f":{self.tls_port} (DICOM" in self.log()

    def kill(self) -> None:
        """kill -9 the node process only (its embedded worker follows through PDEATHSIG)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def discard(self) -> None:
        """The end of a test: Redis-mode workers stopped gracefully (a task they hold must not stay
        in the queue for the next test's worker), the node and its embedded worker killed (a graceful
        stop costs ~0.8 s per node; the tests that are about stopping call :meth:`stop`)."""
        for worker in self.workers:
            _stop(worker)
        self.workers.clear()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.proc.wait(10)

    def stop(self) -> None:
        for worker in self.workers:
            _stop(worker)
        self.workers.clear()
        if self.proc is not None:
            _stop(self.proc)

    def start_worker(self) -> subprocess.Popen:
        """A separate `srnode worker` process (Redis mode), in its own process group."""
        log = open(self.root / f"worker-{len(self.workers)}.log", "ab")
        worker = subprocess.Popen([sys.executable, "-m", "node.cli", "worker", "--config", str(self.config_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        self.workers.append(worker)
        return worker

    # -- inspection -----------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, env=_env(), check=check, timeout=60)

    def jobs(self) -> list[dict]:
        if not (self.spool / "ledger.sqlite3").exists():
            return []
        return json.loads(self.cli("jobs", "--json", "--limit", "1000").stdout)

    def wait_jobs(self, predicate: Callable[[list[dict]], bool], timeout: float = 60, what: str = "jobs") -> list[dict]:
        box: list[list[dict]] = []

        def check() -> bool:
            box[:] = [self.jobs()]
            return predicate(box[0])

        wait_for(check, timeout, interval=0.3, what=lambda: f"{what}; jobs now: {box[0] if box else None}\n{self.log()[-4000:]}")
        return box[0]

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for path in sorted(self.root.glob("worker-*.log")):
            text += f"\n--- {path.name} ---\n" + path.read_text(errors="replace")
        return text


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def make_node(tmp_path, request):
    """Factory: ``make_node(routes=..., destinations=..., **node_config kwargs)`` -> started node."""
    nodes: list[NodeProcess] = []

    def make(start: bool = True, **kwargs) -> NodeProcess:
        root = tmp_path / f"node{len(nodes)}"
        config = node_config(free_port(), root / "spool", **kwargs)
        node = NodeProcess(root, config)
        nodes.append(node)
        return node.start() if start else node

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for node in nodes:
        node.discard()
        if failed:
            print(f"\n===== log of node {node.root.name} =====\n{node.log()[-20000:]}")

"""docker/: the Dockerfiles and compose.yaml, checked without a Docker engine.

Compose interpolation is resolved with each variable's default (``${VAR:-default}``), as on a
machine where the variable is unset.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.paths import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONFIG_IN_CONTAINER = PurePosixPath("/config/node.yaml")
SERVICES = {"node", "worker", "redis", "orthanc", "prometheus"}
_VAR = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def _interpolate(value):
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group("default") or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile}: dangling line continuation"
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _dockerfile(compose: dict, service: str) -> Path:
    build = compose["services"][service]["build"]
    return (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()


def _context(compose: dict, service: str) -> Path:
    return (COMPOSE.parent / compose["services"][service]["build"]["context"]).resolve()


def _volumes(service: dict) -> dict[str, str]:
    """container path -> source (named volume or host path) of a service's short-syntax volumes."""
    mounts = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"volume {spec!r}: expected SOURCE:TARGET[:MODE]"
        mounts[parts[1]] = parts[0]
    return mounts


COMPOSE_CONFIG = REPO / "config" / "node.compose.yaml"


def _node_config() -> dict:
    return yaml.safe_load(COMPOSE_CONFIG.read_text()) or {}


def _in_container(path: str) -> PurePosixPath:
    """A config path as the node resolves it inside the container (relative to /config)."""
    resolved = CONFIG_IN_CONTAINER.parent / path
    parts: list[str] = []
    for part in resolved.parts:
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts)


# -- compose --------------------------------------------------------------------------------------
def test_compose_parses_and_has_the_services(compose):
    assert SERVICES <= set(compose["services"]), sorted(compose["services"])


def test_every_build_dockerfile_exists(compose):
    builds = [name for name, svc in compose["services"].items() if "build" in svc]
    assert {"node", "worker"} <= set(builds)
    for name in builds:
        assert _context(compose, name) == REPO, f"{name}: build context should be the repository root"
        assert _dockerfile(compose, name).is_file(), f"{name}: {_dockerfile(compose, name)} does not exist"


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, source in _volumes(service).items():
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} (at {target}) is not declared"


def test_node_and_worker_share_the_spool_and_the_config(compose):
    node, worker = (_volumes(compose["services"][s]) for s in ("node", "worker"))
    spool_targets = [t for t, s in node.items() if s == "spool"]
    assert spool_targets, f"node mounts no 'spool' volume: {node}"
    for target in spool_targets:
        assert worker.get(target) == "spool", f"worker must mount the spool volume at {target}: {worker}"
    assert node.get(str(CONFIG_IN_CONTAINER)) == worker.get(str(CONFIG_IN_CONTAINER)) is not None


def test_config_mount_points_at_the_repository_config(compose):
    source = _volumes(compose["services"]["node"])[str(CONFIG_IN_CONTAINER)]
    host_path = (COMPOSE.parent / source).resolve()
    assert host_path == COMPOSE_CONFIG, host_path
    from node.config import load_config

    load_config(COMPOSE_CONFIG)  # a valid node config, pipelines and options included


def test_gpu_worker_reserves_an_nvidia_device(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert "deploy" not in compose["services"]["node"] or "devices" not in str(compose["services"]["node"])


def test_orthanc_has_dicomweb_and_knows_the_node(compose):
    orthanc = compose["services"]["orthanc"]
    env = orthanc["environment"]
    assert env.get("DICOM_WEB_PLUGIN_ENABLED") == "true"
    modalities = json.loads(env["ORTHANC__DICOM_MODALITIES"])
    node_ports = {p.split(":")[-1] for p in compose["services"]["node"]["ports"]}
    assert any(host == "node" and str(port) in node_ports for _, host, port in modalities.values()), modalities


def test_orthanc_can_stow_to_the_node_as_its_configured_peer(compose):
    """Orthanc's DICOMweb server "srnode" is the node's STOW-RS port, with the credentials of the
    peer ORTHANC, whose password both services read from the same variable."""
    server = json.loads(compose["services"]["orthanc"]["environment"]["ORTHANC__DICOM_WEB__SERVERS"])["srnode"]
    node = _node_config()
    assert server["Url"] == f"http://node:{node['http']['port']}/dicom-web"
    [peer] = [p for p in node["peers"] if p["ae_title"] == "ORTHANC"]
    assert peer["stow_auth"] == {"type": "basic", "username": server["Username"], "password_env": "SRNODE_STOW_PASSWORD"}
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "SRNODE_STOW_PASSWORD" in raw["node"]["environment"]
    assert "${SRNODE_STOW_PASSWORD" in raw["orthanc"]["environment"]["ORTHANC__DICOM_WEB__SERVERS"]


def test_prometheus_scrapes_the_node_with_a_viewer_token(compose):
    """Prometheus scrapes the node's http.port at /metrics with the bearer token from a compose
    secret; the node's environment carries the same variable, which its config names as a viewer
    token."""
    prometheus = compose["services"]["prometheus"]
    mounts = _volumes(prometheus)
    source = mounts["/etc/prometheus/prometheus.yml"]
    scrape_file = (COMPOSE.parent / source).resolve()
    assert scrape_file.is_file(), f"{source} is not in docker/"
    assert any(a.startswith("--config.file=/etc/prometheus/prometheus.yml") for a in prometheus["command"])
    [job] = [j for j in yaml.safe_load(scrape_file.read_text())["scrape_configs"] if j["job_name"] == "srnode"]
    http = _node_config()["http"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"node:{http.get('port', 8080)}"]
    [secret] = prometheus["secrets"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": f"/run/secrets/{secret}"}
    variable = yaml.safe_load(COMPOSE.read_text())["secrets"][secret]["environment"]
    assert variable in compose["services"]["node"]["environment"]
    assert any(t["token_env"] == variable and t["role"] in ("viewer", "admin") for t in http["tokens"])


def test_commands_match_the_dockerfiles(compose):
    for name, verb in (("node", "run"), ("worker", "worker")):
        cmd = [_exec_form(args) for kw, args in _instructions(_dockerfile(compose, name)) if kw == "CMD"][-1]
        assert cmd == ["srnode", verb, "--config", str(CONFIG_IN_CONTAINER)]
        assert compose["services"][name].get("command", cmd) == cmd


# -- Dockerfiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_structure(name):
    instructions = _instructions(DOCKER / name)
    keywords = [kw for kw, _ in instructions]
    assert keywords[0] in ("FROM", "ARG"), f"{name}: starts with {keywords[0]}"
    assert "FROM" in keywords and "CMD" in keywords
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name}: must end as a non-root USER"
    assert keywords.index("USER") < keywords.index("CMD")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_copy_sources_are_in_the_repository(name):
    """Each COPY source exists, and a folder holds files (git carries no empty folder to a fresh clone)."""
    for keyword, args in _instructions(DOCKER / name):
        if keyword != "COPY":
            continue
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            if any(ch in source for ch in "*?["):
                continue
            path = REPO / source
            assert path.exists(), f"{name}: COPY {source}: no such path in the repository"
            if path.is_dir():
                files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files, (f"{name}: COPY {source}: the folder is empty here, so a fresh clone has no "
                               f"{source}/ and the build fails; add a file to it or drop the COPY")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_copy_sources_pass_the_dockerignore_and_include_what_pip_install_reads(name):
    """The build context is filtered by <Dockerfile>.dockerignore ('*' then '!path' lines, the last
    match wins): a COPY of a path it leaves out fails the build. `pip install` needs pyproject.toml,
    setup.py and the packages, weights/ included (installed as srnode_weights)."""
    patterns = [line.strip() for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def kept(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated, bare = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                keep = negated
        return keep

    copied = []
    for keyword, args in _instructions(DOCKER / name):
        if keyword == "COPY":
            copied += [a.rstrip("*") for a in shlex.split(args)[:-1] if not a.startswith("--")]
    assert [source for source in copied if not kept(source)] == [], f"{name}: COPY of paths its dockerignore drops"
    assert {"pyproject.toml", "setup.py", "node", "pipelines", "weights"} <= set(copied)


def test_cpu_image_installs_cpu_torch_before_the_project():
    runs = [args for kw, args in _instructions(DOCKER / "Dockerfile") if kw == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install (-e )?\.", r))
    assert torch < project
    assert "download.pytorch.org/whl/cpu" in runs[torch]
    assert "dcmtk" in " ".join(runs)


def test_gpu_image_does_not_use_the_cpu_index():
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert "whl/cpu" not in text
    assert "torch==" in text


def test_ports_agree(compose):
    exposed = {args for kw, args in _instructions(DOCKER / "Dockerfile") if kw == "EXPOSE"}
    published = {p.split(":")[-1] for p in compose["services"]["node"]["ports"]}
    assert published <= exposed, (published, exposed)
    node = _node_config().get("node", {})
    assert str(node.get("port", 11112)) in published, f"config node.port {node.get('port')} is not published"
    http = _node_config().get("http")
    if http:
        assert str(http.get("port", 8080)) in published, f"config http.port {http.get('port')} is not published"
    assert node.get("bind", "0.0.0.0") not in ("127.0.0.1", "localhost"), "a container must not bind loopback"


# -- config/node.yaml as seen from inside the containers --------------------------------------------
def test_spool_in_config_is_the_shared_volume(compose):
    spool = _in_container(str(_node_config().get("node", {}).get("spool", "../var/spool")))
    mounts = _volumes(compose["services"]["node"])
    assert mounts.get(str(spool)) == "spool", f"config spool resolves to {spool} in the container; mounts: {mounts}"
    for dest in (_node_config().get("destinations") or {}).values():
        if dest.get("type") == "folder":
            target = _in_container(str(dest["path"]))
            assert any(target == PurePosixPath(t) or PurePosixPath(t) in target.parents for t in mounts), \
                f"folder destination {target} is not on a volume: {mounts}"


def test_config_suits_the_compose_stack():
    """A worker needs the Redis broker, and loopback PACS addresses do not reach the orthanc service."""
    config = _node_config()
    problems = []
    broker = (config.get("queue") or {}).get("broker", "embedded")
    if not str(broker).startswith("redis://redis:"):
        problems.append(f"queue.broker is {broker!r}, the worker needs redis://redis:6379/0")
    for name, dest in (config.get("destinations") or {}).items():
        where = dest.get("host") or dest.get("url") or ""
        if "127.0.0.1" in where or "localhost" in where:
            problems.append(f"destinations.{name} points at {where!r}, not the orthanc service")
    assert not problems, problems


# -- docker/README.md ----------------------------------------------------------------------------------
def _readme_table(heading: str) -> list[list[str]]:
    """The rows of the docker README's table whose header row starts with ``| heading |``: the
    backquoted names of each row's first cell."""
    lines = (DOCKER / "README.md").read_text().splitlines()
    start = lines.index(f"| {heading} | what |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return rows


def test_docker_readme_names_every_compose_service_and_every_file(compose):
    services = [names for names in _readme_table("service")]
    assert all(len(names) == 1 for names in services), services
    assert sorted(n for [n] in services) == sorted(compose["services"])
    files = {n for names in _readme_table("file") for n in names}
    assert files == {p.name for p in DOCKER.iterdir() if p.is_file() and p.name != "README.md"}


def test_docker_readme_recipe_without_a_gpu_gives_the_node_the_embedded_queue(compose, tmp_path):
    """Without the worker, the node must run the jobs itself: the README's sed turns the stack's config
    into one with the embedded queue (and nothing else changed), which the `up` line mounts."""
    from node.config import load_config

    text = (DOCKER / "README.md").read_text()
    sed = re.search(r"^sed 's\|(.+?)\|(.+?)\|' config/node\.compose\.yaml > (\S+)$", text, re.M)
    assert sed, "docker/README.md: no `sed ... config/node.compose.yaml > FILE` line"
    up = re.search(r"^SRNODE_CONFIG=\$PWD/(\S+) docker compose -f docker/compose\.yaml up (?:--build )?(.+)$", text, re.M)
    assert up and up.group(1) == sed.group(3), "the `up` line must mount the file the sed line writes"
    started = up.group(2).split()
    assert "worker" not in started and set(started) <= set(compose["services"]) and "node" in started
    for need in compose["services"]["node"].get("depends_on", {}):
        assert need in started, f"the node depends on {need}"
    original = COMPOSE_CONFIG.read_text()
    changed = re.sub(sed.group(1), sed.group(2), original, flags=re.M)
    assert len(changed.splitlines()) == len(original.splitlines())
    (tmp_path / "node.cpu.yaml").write_text(changed)
    config = load_config(tmp_path / "node.cpu.yaml")
    assert config.queue.broker == "embedded"
    assert yaml.safe_load(changed) | {"queue": None} == _node_config() | {"queue": None}

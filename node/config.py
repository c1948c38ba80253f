"""The node's configuration: one YAML file, one typed model, checked before the port opens.

Relative paths (``node.spool``, folder destinations) are resolved against the directory of the
config file, so the node behaves the same whatever directory it is started from.
Secrets never live in the file: DICOMweb credentials name environment variables.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

AE_TITLE = r"^[ -~]{1,16}$"
SENDER = "sender"  # the pseudo-destination "back to the calling peer"
SPECIAL_MATCH_KEYS = {"calling_ae", "instances"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae(value: str) -> str:
    value = value.strip()
    if not re.match(AE_TITLE, value) or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return value


class NodeTls(Strict):
    """The DICOM TLS listener (PS3.15 B.9; TLS 1.2 minimum). Paths are relative to the config file."""

    port: int = Field(2762, ge=1, le=65535)  # IANA dicom-tls
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None  # verifies client certificates
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca(self) -> "NodeTls":
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that signs the clients)")
        return self


class Limits(Strict):
    """What one unauthenticated peer can make the DICOM listener hold (node.dicom_guard)."""

    max_pdu_bytes: int = Field(262144, ge=4096, le=2**28)  # advertised; a longer incoming PDU aborts
    association_request_timeout_s: float = Field(10, gt=0, le=300)  # TCP accept -> whole A-ASSOCIATE-RQ
    idle_timeout_s: float = Field(60, gt=0, le=3600)  # no PDU for this long -> A-ABORT
    max_associations_per_host: int = Field(4, ge=1)
    max_pending_per_host: int = Field(4, ge=1)  # connections not yet associated, per host
    # One incoming DIMSE data set (all its P-DATA fragments): past this the association is aborted. 2 GiB of decoded pixels (node.instance_checks refuses more)
    # plus 128 MiB of header (an enhanced multi-frame's per-frame functional groups).
    max_dataset_bytes: int = Field(2**31 + 2**27, ge=65536)
    # A data set whose fragments pass this continues in a file in the spool (node.spill) instead of
    # memory, and is checked there without loading its pixel data: what an association holds.
    spill_dataset_bytes: int = Field(2**24, ge=65536)


class NodeSection(Strict):
    ae_title: str = "SRNODE"
    port: int | None = Field(11112, ge=1, le=65535)  # plain DICOM; None: off
    tls: NodeTls | None = None
    limits: Limits = Limits()
    bind: str = "0.0.0.0"
    spool: Path = Path("../var/spool")
    max_associations: int = Field(16, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _check_ae = field_validator("ae_title")(_ae)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stow_port" in data:
            port = data["stow_port"]
            raise ValueError(
                "node.stow_port is gone: STOW-RS is served by the node's one HTTP service; remove "
                f"node.stow_port and write `http: {{port: {port if port else 8080}}}` instead (the peers keep their stow_auth)")
        return data

    @model_validator(mode="after")
    def _ports(self) -> "NodeSection":
        if self.port is None and self.tls is None:
            raise ValueError("port is null and there is no tls listener: the node would not listen for DICOM")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"port and tls.port are both {self.port}: each listener needs a port of its own")
        return self


class HttpToken(Strict):
    """A bearer token for people and tools (not for STOW-RS peers: they have ``stow_auth``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")  # shown in the log and the audit trail
    role: Literal["admin", "viewer"]
    token_env: str = Field(min_length=1)  # the environment variable holding the token


class HttpSection(Strict):
    """The node's one HTTP service (node.http): STOW-RS, health, metrics, admin API, status page.
    HTTPS when ``node.tls`` is set. No default token: without tokens only /healthz and STOW-RS."""

    port: int = Field(8080, ge=1, le=65535)
    bind: str = "0.0.0.0"
    tokens: list[HttpToken] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "HttpSection":
        for field in ("name", "token_env"):
            values = [getattr(t, field) for t in self.tokens]
            if len(values) != len(set(values)):
                raise ValueError(f"two tokens share a {field}")
        return self


class DicomwebAuth(Strict):
    """Credentials come from the environment, never from the file."""

    type: Literal["bearer", "basic"]
    token_env: str | None = None
    username: str | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "DicomwebAuth":
        if self.type == "bearer" and not self.token_env:
            raise ValueError("bearer auth needs token_env (the environment variable holding the token)")
        if self.type == "basic" and not (self.username and self.password_env):
            raise ValueError("basic auth needs username and password_env")
        return self

    @property
    def secret_env(self) -> str:
        """The environment variable that holds the secret: the token or the password."""
        return self.token_env if self.type == "bearer" else self.password_env


class Peer(Strict):
    """A modality or PACS allowed to send to us; ``port`` makes it a ``sender`` destination;
    ``stow_auth``, the credentials it sends with STOW-RS requests, lets it send over DICOMweb
    (its ``ae_title`` then names it for routing and ``sender``, as for C-STORE)."""

    ae_title: str
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    stow_auth: DicomwebAuth | None = None
    tls: bool = False  # its associations must come over the TLS listener; plain ones are rejected

    _check_ae = field_validator("ae_title")(_ae)

    def allows(self, address: str) -> bool:
        """Whether a connection from ``address`` may be this peer (``host``, when set, pins it)."""
        if self.host is None:
            return True
        try:
            return socket.gethostbyname(self.host) == address
        except OSError:
            return self.host == address


class DestinationTls(Strict):
    """DICOM TLS to a PACS: ``ca_certificates`` verifies it (the system's CAs when unset); the
    node's own certificate and key, when the PACS asks for a client certificate."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> "DestinationTls":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (the client certificate and its key)")
        return self


class DicomDestination(Strict):
    type: Literal["dicom"]
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None  # defaults to node.ae_title
    timeout_s: float = Field(30, gt=0)
    tls: DestinationTls | None = None

    _check_ae = field_validator("ae_title", "calling_ae_title")(_ae)


class DicomwebDestination(Strict):
    type: Literal["dicomweb"]
    url: str
    auth: DicomwebAuth | None = None
    batch_size: int = Field(50, ge=1)
    timeout_s: float = Field(60, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url {value!r} must start with http:// or https://")
        return value.rstrip("/")


class FolderDestination(Strict):
    type: Literal["folder"]
    path: Path


Destination = Annotated[
    Union[DicomDestination, DicomwebDestination, FolderDestination], Field(discriminator="type")
]


class Route(Strict):
    """A declarative rule: when ``match`` holds for a completed series, run ``pipeline``.

    ``match`` maps a DICOM keyword (Modality, BodyPartExamined, SeriesDescription, Rows,
    SliceThickness, ...) or ``calling_ae`` / ``instances`` to a condition: a value, a list of
    values (any of), ``{min: .., max: ..}`` (numbers, inclusive) or ``{pattern: "*glob*"}``
    (case-insensitive). All conditions must hold. The first matching route wins unless it says
    ``continue: true``.
    """

    name: str
    match: dict[str, Any] = Field(default_factory=dict)
    pipeline: str
    options: dict[str, Any] = Field(default_factory=dict)
    send_to: list[str] = Field(min_length=1)
    continue_: bool = Field(False, alias="continue")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("match")
    @classmethod
    def _known_keys(cls, match: dict[str, Any]) -> dict[str, Any]:
        for key, cond in match.items():
            if key not in SPECIAL_MATCH_KEYS and key not in keyword_dict:
                raise ValueError(f"match key {key!r} is not a DICOM keyword nor one of {sorted(SPECIAL_MATCH_KEYS)}")
            if isinstance(cond, dict):
                extra = set(cond) - {"min", "max", "pattern"}
                if extra or not cond or ("pattern" in cond and len(cond) > 1):
                    raise ValueError(
                        f"match.{key}: a condition mapping takes min and/or max, or pattern alone, got {sorted(cond)}"
                    )
                for bound in ("min", "max"):
                    value = cond.get(bound)
                    if bound in cond and (isinstance(value, bool) or not isinstance(value, (int, float))):
                        raise ValueError(f"match.{key}.{bound} must be a number, got {value!r}")
                if "pattern" in cond and not isinstance(cond["pattern"], str):
                    raise ValueError(f"match.{key}.pattern must be a text pattern, got {cond['pattern']!r}")
        return match


class Completion(Strict):
    quiet_seconds: float = Field(2.0, ge=0, le=600)
    # A STOW-RS peer that keeps sending holds a series it sent this long after its last instance
    # (node.http.stow.PeerSessions): a batch of the series may still be uploading in another request.
    stow_hold_seconds: float = Field(60.0, ge=0, le=3600)


class Queue(Strict):
    broker: str = "embedded"
    visibility_timeout_s: int = Field(3600, ge=1)

    @field_validator("broker")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("redis://", "rediss://")):
            raise ValueError(f"broker {value!r} must be 'embedded' or a redis:// URL")
        return value


class Dispatch(Strict):
    max_attempts: int = Field(20, ge=1)  # with the defaults: ~2 h of retries before parking
    backoff_initial_s: float = Field(5, gt=0)
    backoff_max_s: float = Field(600, gt=0)


class Retention(Strict):
    """How long finished work stays in the spool (node.retention); the ledger and the audit keep
    its record. ``min_free_bytes``: below this free space new instances are refused."""

    delivered_seconds: float = Field(604800, ge=0)
    failed_seconds: float = Field(2592000, ge=0)  # parked, failed and refused jobs: kept longer for replay
    min_free_bytes: int = Field(5_000_000_000, ge=0)


class Config(Strict):
    node: NodeSection = NodeSection()
    peers: list[Peer] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    completion: Completion = Completion()
    queue: Queue = Queue()
    dispatch: Dispatch = Dispatch()
    http: HttpSection | None = None  # no HTTP service (no STOW-RS, health, metrics) when absent
    retention: Retention = Retention()
    source: Path | None = None  # the file this was read from

    @model_validator(mode="after")
    def _references(self) -> "Config":
        names = [r.name for r in self.routes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"route names must be unique, repeated: {sorted(dupes)}")
        for field in ("username", "token_env"):
            used = [getattr(p.stow_auth, field) for p in self.peers if p.stow_auth and getattr(p.stow_auth, field)]
            if len(used) != len(set(used)):
                raise ValueError(f"peers: two peers share a stow_auth {field}; a STOW-RS sender must be one peer")
        if self.http is not None and self.http.port in (self.node.port, self.node.tls.port if self.node.tls else None):
            raise ValueError(f"http.port {self.http.port} is also a DICOM port: HTTP needs a port of its own")
        if SENDER in self.destinations:
            raise ValueError(f"'{SENDER}' is reserved (results back to the calling peer); rename that destination")
        for route in self.routes:
            for dest in route.send_to:
                if dest != SENDER and dest not in self.destinations:
                    raise ValueError(
                        f"route {route.name!r}: send_to {dest!r} is not a destination "
                        f"(known: {sorted(self.destinations)} or '{SENDER}')"
                    )
        return self

    def peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title), None)

    @property
    def spool(self) -> Path:
        return self.node.spool


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and the reason."""


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_paths(base: Path, section: Strict | None) -> Strict | None:
    """The same section with every Path field made absolute against ``base``."""
    if section is None:
        return None
    return section.model_copy(update={name: _resolve(base, value) for name, value in section
                                      if isinstance(value, Path)})


def load_config(path: str | os.PathLike, check_pipelines: bool = True) -> Config:
    """Read, validate and resolve a config file. Raises :class:`ConfigError` with every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = Config.model_validate({**raw, "source": path.resolve()})
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} problem(s)"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            got = err.get("input")  # a section or the whole file is no help to repeat
            lines.append(f"  {where + ': ' if where else ''}{message}"
                         + ("" if isinstance(got, (dict, list)) else f" (got {got!r})"))
        raise ConfigError("\n".join(lines)) from None
    base = path.resolve().parent
    node = config.node.model_copy(update={"spool": _resolve(base, config.node.spool),
                                           "tls": _resolve_paths(base, config.node.tls)})
    dests = {
        name: d.model_copy(update={"path": _resolve(base, d.path)}) if isinstance(d, FolderDestination)
        else d.model_copy(update={"tls": _resolve_paths(base, d.tls)}) if isinstance(d, DicomDestination)
        else d
        for name, d in config.destinations.items()
    }
    config = config.model_copy(update={"node": node, "destinations": dests})
    if check_pipelines:
        problems = check_routes(config)
        if problems:
            raise ConfigError("\n".join([f"{path}: {len(problems)} problem(s)", *("  " + p for p in problems)]))
    return config


def check_routes(config: Config) -> list[str]:
    """Pipeline names and options of every route, checked by the pipelines themselves."""
    import pipelines

    problems = []
    for i, route in enumerate(config.routes):
        try:
            pipeline = pipelines.get(route.pipeline)
            options = pipeline.validate_options(route.options)
        except ValueError as exc:
            problems.append(f"routes.{i} ({route.name}): {exc}")
            continue
        not_ready = getattr(pipeline, "not_ready", None)  # models: are their weights installed and intact?
        reason = not_ready(options) if not_ready else None
        if reason:
            problems.append(f"routes.{i} ({route.name}): pipeline {route.pipeline!r} cannot run: {reason}")
        if SENDER in route.send_to and not any(p.port for p in config.peers):
            problems.append(f"routes.{i} ({route.name}): send_to 'sender' but no peer has a port to send back to")
    return problems

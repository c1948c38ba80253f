"""DICOM TLS (PS3.15 B.9, the BCP 195 profile): SSL contexts for the listener and for ``dicom``
destinations, TLS 1.2 at least, and the certificate checks ``srnode config check`` runs.

``cryptography`` reads the certificates and keys for the checks (expiry, key matches certificate):
the ``ssl`` module can load a pair but cannot say when a certificate expires or which file is wrong.
"""
from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from node.config import Config, DestinationTls, NodeTls

EXPIRY_WARNING_DAYS = 30


def server_context(tls: NodeTls) -> ssl.SSLContext:
    """The listener's context: its certificate; client certificates verified against
    ``ca_certificates`` when given (required when ``require_client_certificate``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: DestinationTls) -> ssl.SSLContext:
    """A destination's context: the PACS's certificate verified (its CA, or the system's) and its
    name checked against the destination's host; the node's client certificate when configured."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


def peer_subject(sock: object) -> str | None:
    """The verified client certificate's subject ("CN=ct1,O=Hospital"), None without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST"}
    parts = [f"{short.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts).encode("ascii", "backslashreplace").decode("ascii").replace("\n", "\\n")


# -- checks for `srnode config check` -----------------------------------------------------------
def _certificates(path: Path, what: str, problems: list[str]):
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{what} {path}: cannot read: {exc.strerror}")
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(f"{what} {path}: no PEM certificate in it")
        return []


def _check_pair(cert_path: Path, key_path: Path, where: str, problems: list[str], warnings: list[str],
                now: dt.datetime) -> None:
    from cryptography.hazmat.primitives import serialization

    certs = _certificates(cert_path, f"{where}.certificate", problems)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        problems.append(f"{where}.private_key {key_path}: cannot read: {exc.strerror}")
        key = None
    except TypeError:
        problems.append(f"{where}.private_key {key_path}: encrypted with a password (not supported)")
        key = None
    except ValueError:
        problems.append(f"{where}.private_key {key_path}: no PEM private key in it")
        key = None
    if not certs:
        return
    cert = certs[0]
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key is not None and key.public_key().public_bytes(*pem) != cert.public_key().public_bytes(*pem):
        problems.append(f"{where}.private_key {key_path} does not match {where}.certificate {cert_path}")
    _check_dates(cert, f"{where}.certificate {cert_path}", problems, warnings, now)


def _check_dates(cert, what: str, problems: list[str], warnings: list[str], now: dt.datetime) -> None:
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc < now:
        problems.append(f"{what} ({subject}) expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif cert.not_valid_after_utc - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.append(f"{what} ({subject}) expires on {cert.not_valid_after_utc:%Y-%m-%d}, "
                        f"in less than {EXPIRY_WARNING_DAYS} days")
    if cert.not_valid_before_utc > now:
        problems.append(f"{what} ({subject}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")


def check_files(config: Config, now: dt.datetime | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) about every TLS file of the config: readable, a certificate / key,
    the key matches the certificate, not expired (a warning within 30 days)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    problems: list[str] = []
    warnings: list[str] = []
    sections = []
    if config.node.tls is not None:
        sections.append(("node.tls", config.node.tls))
    sections += [(f"destinations.{name}.tls", d.tls) for name, d in config.destinations.items()
                 if getattr(d, "tls", None) is not None]
    for where, tls in sections:
        if tls.certificate is not None:
            _check_pair(tls.certificate, tls.private_key, where, problems, warnings, now)
        if tls.ca_certificates is not None:
            for cert in _certificates(tls.ca_certificates, f"{where}.ca_certificates", problems):
                _check_dates(cert, f"{where}.ca_certificates {tls.ca_certificates}", problems, warnings, now)
    return problems, warnings

"""DICOMweb destination: STOW-RS (PS3.18 10.5) with the files sent exactly as they are.

Plain ``requests`` rather than dicomweb-client: STOW responses must be read per instance for 200,
202 and 409 alike (dicomweb-client raises on 409 before the body is read), and our outputs are
already encoded files that need no decode/re-encode round trip.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from xml.etree import ElementTree

import requests
from pydicom import Dataset, dcmread

from node.config import DicomwebDestination
from node.dispatch.outcome import Outcome, cstore_outcome

# Worth trying again: timeouts, rate limits and server-side trouble (507: the PACS's disk is full).
# 501/505 say the server will never do this, so they park like a 4xx.
TRANSIENT_HTTP = {408, 425, 429} | set(range(500, 600)) - {501, 505}


def session(dest: DicomwebDestination) -> requests.Session:
    """A session with the destination's credentials, read from the environment now (not at import)."""
    s = requests.Session()
    auth = dest.auth
    if auth is not None:
        if auth.type == "bearer":
            token = os.environ.get(auth.token_env or "")
            if not token:
                raise RuntimeError(f"environment variable {auth.token_env} (bearer token) is not set")
            s.headers["Authorization"] = f"Bearer {token}"
        else:
            password = os.environ.get(auth.password_env or "")
            if password is None:
                raise RuntimeError(f"environment variable {auth.password_env} (password) is not set")
            s.auth = (auth.username, password)
    return s


def _multipart(paths: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in paths:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _reasons(response: requests.Response) -> tuple[dict[str, int], dict[str, int]] | None:
    """(failure reason, warning reason) per SOP Instance UID from a STOW-RS response body in DICOM
    JSON or XML (PS3.18 10.5.3); None when there is no body or it cannot be read."""
    content_type = response.headers.get("Content-Type", "")
    if not response.content:
        return None
    try:
        if "xml" in content_type:
            return _xml_reasons(response.content)
        if "json" in content_type:
            body = response.json()
            result = Dataset.from_json(body[0] if isinstance(body, list) else body)
            failed = {str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0xC000))
                      for item in result.get("FailedSOPSequence", [])}
            warned = {str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("WarningReason", 0xB000))
                      for item in result.get("ReferencedSOPSequence", []) if "WarningReason" in item}
            return failed, warned
    except (ValueError, TypeError, KeyError, ElementTree.ParseError):
        return None
    return None


def _xml_reasons(content: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """:func:`_reasons` for a NativeDicomModel body (PS3.19 A.1)."""
    root = ElementTree.fromstring(content)

    def items(tag: str) -> list:
        return root.findall(f"./{{*}}DicomAttribute[@tag='{tag}']/{{*}}Item")

    def value(item, tag: str) -> str:
        found = item.find(f"./{{*}}DicomAttribute[@tag='{tag}']/{{*}}Value")
        return "" if found is None else (found.text or "").strip()

    failed = {value(i, "00081155"): int(value(i, "00081197") or 0xC000) for i in items("00081198")}
    warned = {value(i, "00081155"): int(value(i, "00081196")) for i in items("00081199") if value(i, "00081196")}
    return failed, warned


def store(dest: DicomwebDestination, paths: list[Path]) -> list[Outcome]:
    """STOW-RS ``paths`` in one request; one outcome per file, in order."""
    uids = [str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in paths]
    body, content_type = _multipart(paths)
    try:
        response = session(dest).post(f"{dest.url}/studies", data=body, timeout=dest.timeout_s,
                                      headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        down = isinstance(exc, (requests.ConnectionError, requests.Timeout))
        return [Outcome("retry", f"STOW-RS to {dest.url} failed: {type(exc).__name__}", unreachable=down)] * len(paths)
    except RuntimeError as exc:  # credentials missing: an admin must fix the environment
        return [Outcome("fail", str(exc))] * len(paths)
    code = response.status_code
    reasons = _reasons(response)
    if code == 202 and reasons is None:  # some failed, and which is unknown: none counts as stored
        return [Outcome("retry", "STOW-RS 202 (some instances failed) without a readable response")] * len(paths)
    failed, warned = reasons or ({}, {})
    if code in (200, 202, 409):
        outcomes = []
        for uid in uids:
            if uid in failed:
                reason = cstore_outcome(failed[uid])
                outcomes.append(Outcome(reason.kind, f"STOW-RS {code}, {reason.status}"))
            elif code == 409:  # all failed, this one without a stated reason
                outcomes.append(Outcome("fail", "STOW-RS 409 Conflict (no failure reason given)"))
            elif uid in warned:
                outcomes.append(Outcome("warning", f"STOW-RS {code}, {cstore_outcome(warned[uid]).status}"))
            else:
                outcomes.append(Outcome("sent", f"STOW-RS {code}"))
        return outcomes
    kind = "retry" if code in TRANSIENT_HTTP else "fail"
    text = f"STOW-RS HTTP {code} {response.reason}"
    if code in (401, 403):
        text += " (check the destination's credentials)"
    return [Outcome(kind, text)] * len(paths)


def unreachable_reason(exc: requests.RequestException, timeout_s: float) -> str:
    """One line for a request that got no HTTP answer (not requests' nested pool/retry text)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed (certificate or protocol)"
    if isinstance(exc, requests.ConnectionError):
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        return f"cannot connect ({cause.group(1).strip() if cause else 'connection failed'}): is it running?"
    return f"request failed: {type(exc).__name__}"


def check(dest: DicomwebDestination) -> tuple[bool, str]:
    """QIDO-RS for one study: reachable, and credentials accepted."""
    try:
        response = session(dest).get(f"{dest.url}/studies", params={"limit": 1}, timeout=dest.timeout_s,
                                     headers={"Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        return False, f"DICOMweb {dest.url}: {unreachable_reason(exc, dest.timeout_s)}"
    except RuntimeError as exc:  # credentials missing from the environment
        return False, f"DICOMweb {dest.url}: {exc}"
    ok = response.status_code in (200, 204)
    return ok, f"DICOMweb {dest.url}: QIDO-RS HTTP {response.status_code}"

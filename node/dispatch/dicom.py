"""DICOM destination: C-STORE over one association per batch, C-ECHO for ``srnode echo``; over
DICOM TLS when the destination has ``tls`` (the PACS verified by its CA and host name)."""
from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import Verification

from node.config import DicomDestination
from node.dispatch.outcome import Outcome, cstore_outcome
from node.fast_reactor import FastAE
from node.scp import set_nodelay
from node.tls import client_context

log = logging.getLogger(__name__)

NODELAY = [(evt.EVT_CONN_OPEN, set_nodelay)]


def _ae(calling_ae: str, dest: DicomDestination) -> FastAE:
    ae = FastAE(ae_title=dest.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    return ae


def _associate(ae: FastAE, dest: DicomDestination):
    tls_args = (client_context(dest.tls), dest.host) if dest.tls is not None else None
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=NODELAY, tls_args=tls_args)


def _not_associated(assoc, dest: DicomDestination) -> Outcome:
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        reason = f"association rejected by {where} (result {result}, source {getattr(rsp, 'result_source', None)}, reason {getattr(rsp, 'diagnostic', None)})"
        # A permanent rejection is a configuration problem at the PACS: park until someone fixes it.
        return Outcome("fail" if result == 0x01 else "retry", reason)
    # pynetdicom reports a refused or timed-out connection as an abort too.
    tls = " or TLS handshake failed" if dest.tls is not None else ""
    return Outcome("retry", f"no association with {where} (connection refused, timed out or aborted{tls})",
                   unreachable=True)


def store(dest: DicomDestination, calling_ae: str, paths: list[Path]) -> list[Outcome]:
    """C-STORE every file; one outcome per file, in order."""
    datasets = [dcmread(p) for p in paths]
    ae = _ae(calling_ae, dest)
    for uid in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = _associate(ae, dest)
    if not assoc.is_established:
        outcome = _not_associated(assoc, dest)
        return [outcome] * len(paths)
    outcomes = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(Outcome("retry", "association ended before this instance was sent"))
                continue
            accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID]
            if not accepted:
                outcomes.append(Outcome("fail", f"{dest.ae_title} does not accept SOP class {ds.SOPClassUID}"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, ValueError) as exc:  # association lost mid-send
                outcomes.append(Outcome("retry", f"C-STORE not completed: {exc}"))
                continue
            status = getattr(rsp, "Status", None) if rsp else None
            if status is None:
                outcomes.append(Outcome("retry", "no C-STORE response (timeout or abort)"))
            else:
                outcomes.append(cstore_outcome(int(status)))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def echo(dest: DicomDestination, calling_ae: str) -> tuple[bool, str]:
    ae = _ae(calling_ae, dest)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, dest)
    if not assoc.is_established:
        return False, _not_associated(assoc, dest).status
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
    finally:
        assoc.release()
    ok = status == 0x0000
    return ok, f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: " + (
        "success" if ok else f"status {status if status is None else hex(status)}")

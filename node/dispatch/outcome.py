"""What one delivery attempt of one instance came to, and what the dispatcher does next."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["sent", "warning", "retry", "fail"]


@dataclass(frozen=True)
class Outcome:
    """``sent``/``warning``: stored (a warning status is recorded); ``retry``: transient, try again
    with backoff; ``fail``: the destination will never accept it as is, park it now."""

    kind: Kind
    status: str
    unreachable: bool = False  # no connection at all: the destination is down, not this instance


# C-STORE response statuses, PS3.4 Annex B.2.3 and PS3.7 Annex C.
_CSTORE_NAMES = {
    0x0000: "Success",
    0x0001: "Warning: requested optional attributes not supported",
    0x0107: "Warning: attribute list error",
    0xB000: "Warning: coercion of data elements",
    0xB006: "Warning: elements discarded",
    0xB007: "Warning: data set does not match SOP class",
    0x0110: "Failure: processing failure",
    0x0122: "Failure: SOP class not supported",
    0x0124: "Failure: not authorized",
    0x0210: "Failure: duplicate invocation",
    0x0211: "Failure: unrecognized operation",
    0x0212: "Failure: mistyped argument",
    0x0213: "Failure: resource limitation",
    0xFE00: "Cancel",
}


def cstore_outcome(status: int) -> Outcome:
    """Map a C-STORE status to what to do: out-of-resources and processing failures are
    transient; a data set the SCP cannot accept (A9xx, Cxxx, unsupported class) is not."""
    if 0xA700 <= status <= 0xA7FF:
        name = "Refused: out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        name = "Error: data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        name = "Error: cannot understand"
    else:
        name = _CSTORE_NAMES.get(status, "unknown status")
    text = f"C-STORE 0x{status:04X} {name}"
    if status == 0x0000:
        return Outcome("sent", text)
    if status in (0x0001, 0x0107) or 0xB000 <= status <= 0xBFFF:
        return Outcome("warning", text)
    if 0xA700 <= status <= 0xA7FF or status in (0x0110, 0x0213, 0xFE00):
        return Outcome("retry", text)
    return Outcome("fail", text)

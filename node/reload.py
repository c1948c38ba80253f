"""Config reload (SIGHUP, ``srnode reload``, ``POST /api/config/reload``): what may change while
the node runs, and what changed.

The new file is validated exactly as at start (``load_config``); a file that fails, or that changes
something only a restart can apply (the listeners' addresses and AE title, the spool, the queue),
is refused with the reasons and the running config stays. A good one is swapped in whole: new
associations are checked against its peers, completed series take its routes, new jobs its
destinations and limits. Jobs already created keep the route options and destinations they were
made with (the ledger holds them); a destination that the new file drops is still used for the
deliveries already pending to it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from node.config import Config, ConfigError, load_config

# node.* keys a reload may change (for new associations); every other node.* key (listeners, TLS,
# spool), queue and http's port/bind need a restart.
NODE_RELOADABLE = {"max_associations", "log_level", "limits"}
RESTART_SECTIONS = ("queue",)
HTTP_RESTART_KEYS = ("port", "bind")


def restart_only(old: Config, new: Config) -> list[str]:
    """Why ``new`` cannot be applied without a restart (empty when it can)."""
    reasons = []
    for key in type(old.node).model_fields:
        if key not in NODE_RELOADABLE and getattr(old.node, key) != getattr(new.node, key):
            reasons.append(f"node.{key} changed ({getattr(old.node, key)!r} -> {getattr(new.node, key)!r}): "
                           "it needs a restart")
    for section in RESTART_SECTIONS:
        if getattr(old, section) != getattr(new, section):
            reasons.append(f"{section} changed: it needs a restart")
    old_http, new_http = getattr(old, "http", None), getattr(new, "http", None)
    if (old_http is None) != (new_http is None):  # the HTTP service is started (or not) with the node
        reasons.append(f"the http section was {'added' if new_http is not None else 'removed'}: "
                       "starting or stopping the HTTP service needs a restart")
    for key in HTTP_RESTART_KEYS:
        if old_http is not None and new_http is not None and getattr(old_http, key, None) != getattr(new_http, key, None):
            reasons.append(f"http.{key} changed: it needs a restart")
    return reasons


def _names(items) -> dict[str, Any]:
    if isinstance(items, dict):
        return items
    return {getattr(i, "ae_title", None) or getattr(i, "name", None) or repr(i): i for i in items}


def changes(old: Config, new: Config) -> list[str]:
    """What differs, by section and name ("peers: + PACS2", "routes: ~ ct"): for the log and audit."""
    out = []
    for section in type(old).model_fields:
        if section == "source":
            continue
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        if isinstance(a, (list, dict)):
            a, b = _names(a), _names(b)
            parts = [f"+ {n}" for n in b if n not in a] + [f"- {n}" for n in a if n not in b] + \
                    [f"~ {n}" for n in a if n in b and a[n] != b[n]]
            if section == "routes" and not parts:
                parts = ["order"]
            out.append(f"{section}: {', '.join(parts)}")
        elif section == "http":
            out.append("http: tokens" if getattr(a, "tokens", None) != getattr(b, "tokens", None) else "http")
        else:
            fields = [k for k in type(a).model_fields if getattr(a, k) != getattr(b, k)]
            out.append(f"{section}: {', '.join(fields)}")
    return out


def prepare(current: Config, path: Path | None = None) -> tuple[Config | None, list[str]]:
    """(the new config, []) when the file at ``path`` (default: the running one's) can be applied,
    else (None, reasons)."""
    path = Path(path or current.source)
    try:
        new = load_config(path)
    except ConfigError as exc:
        return None, [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = restart_only(current, new)
    return (None, reasons) if reasons else (new, [])


# -- the node's answer to `srnode reload` (which signals it with SIGHUP) -------------------------
def pid_path(spool_root: Path) -> Path:
    return Path(spool_root) / "node.pid"


def answer_path(spool_root: Path) -> Path:
    return Path(spool_root) / "reload.json"


def write_answer(spool_root: Path, ok: bool, reasons: list[str], changed: list[str]) -> None:
    from node.spool import write_json

    write_json(answer_path(spool_root), {"at": time.time(), "ok": ok, "reasons": reasons, "changes": changed,
                                         "pid": os.getpid()})


def read_answer(spool_root: Path) -> dict[str, Any] | None:
    try:
        return json.loads(answer_path(spool_root).read_text())
    except (OSError, ValueError):
        return None


def request_path(spool_root: Path) -> Path:
    return Path(spool_root) / "reload-request.json"


def take_request(spool_root: Path) -> str | None:
    """The actor ``srnode reload`` left for the node before signalling it (else the signal came from
    elsewhere, e.g. ``kill -HUP`` or systemd's ExecReload)."""
    path = request_path(spool_root)
    try:
        actor = json.loads(path.read_text()).get("actor")
        path.unlink()
    except (OSError, ValueError, AttributeError):
        return None
    return str(actor) if actor else None

"""Declarative routing: which routes a completed series goes to, and why.

Rules are evaluated in order on one header of the series (plus the calling AE and the instance
count); the first matching rule wins unless it says ``continue: true``. :func:`explain` gives the
reason for every condition, which ``srnode route --dry-run`` prints.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from node.config import Config, Route


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at: one instance's header, who sent it, how many instances."""

    header: Dataset
    calling_ae: str | None
    instances: int

    def value(self, key: str) -> Any:
        if key == "calling_ae":
            return self.calling_ae
        if key == "instances":
            return self.instances
        return self.header.get(key)


@dataclass(frozen=True)
class Verdict:
    route: Route
    matched: bool
    reasons: list[str]


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        return _number(actual) == float(wanted)
    return str(actual).strip().casefold() == str(wanted).strip().casefold()


def check(key: str, cond: Any, actual: Any) -> tuple[bool, str]:
    """One condition against one attribute value: (holds, human-readable reason)."""
    shown = "absent" if actual is None else repr(str(actual) if not isinstance(actual, (int, float)) else actual)
    values = _values(actual)
    if isinstance(cond, dict):
        if "pattern" in cond:
            ok = any(fnmatch.fnmatchcase(str(v).casefold(), str(cond["pattern"]).casefold()) for v in values)
            return ok, f"{key} {shown} {'matches' if ok else 'does not match'} {cond['pattern']!r}"
        numbers = [n for n in map(_number, values) if n is not None]
        lo, hi = cond.get("min"), cond.get("max")
        # A multi-valued attribute (Rows/PixelSpacing...) is in range when every value is.
        ok = bool(numbers) and all((lo is None or n >= lo) and (hi is None or n <= hi) for n in numbers)
        bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if b)
        return ok, f"{key} {shown} {'is' if ok else 'is not'} {bounds}"
    wanted = cond if isinstance(cond, list) else [cond]
    ok = any(_same(v, w) for v in values for w in wanted)
    return ok, f"{key} {shown} {'is' if ok else 'is not'} {' or '.join(map(str, wanted))}"


def explain(config: Config, facts: SeriesFacts) -> list[Verdict]:
    """Every route with whether it matched and why (in evaluation order)."""
    verdicts = []
    for route in config.routes:
        reasons, matched = [], True
        for key, cond in route.match.items():
            ok, why = check(key, cond, facts.value(key))
            reasons.append(("ok: " if ok else "no: ") + why)
            matched = matched and ok
        if not route.match:
            reasons.append("ok: no conditions (matches everything)")
        verdicts.append(Verdict(route, matched, reasons))
    return verdicts


def select(config: Config, facts: SeriesFacts) -> list[Route]:
    """The routes a series goes to: first match wins, unless that route says continue."""
    chosen = []
    for verdict in explain(config, facts):
        if verdict.matched:
            chosen.append(verdict.route)
            if not verdict.route.continue_:
                break
    return chosen

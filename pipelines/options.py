"""Option checks every pipeline shares: known keys, and the geometry options (an in-plane factor, a
slice factor, or a ``target_spacing`` that replaces them) with their defaults and conflicts."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any


def check_keys(options: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for a non-mapping or unknown keys, naming them and the known ones."""
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


def number(options: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    """Option ``key`` as a float in [low, high], or None when absent."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"option {key!r} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"option {key!r} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def parse_target_spacing(value: Any) -> list[float | None] | None:
    """``target_spacing`` as [row, col, slice] with None for unset axes: a number is the slice
    spacing, [row, col] the in-plane spacing."""
    if value is None:
        return None
    if isinstance(value, Real) and not isinstance(value, bool):
        values: list[Any] = [None, None, value]
    elif isinstance(value, (list, tuple)) and len(value) in (2, 3):
        values = [*value, None] if len(value) == 2 else list(value)
    else:
        raise ValueError(f"option 'target_spacing' must be a number, [row, col] or [row, col, slice], got {value!r}")
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"option 'target_spacing' values must be positive numbers (mm), got {value!r}")
    if (values[0] is None) != (values[1] is None):
        raise ValueError(f"option 'target_spacing' must give both row and column spacing, got {value!r}")
    if all(v is None for v in values):
        return None
    return [None if v is None else float(v) for v in values]


def geometry(options: Mapping[str, Any], scale_key: str, factor: Callable[[Mapping[str, Any], str], Any],
             default_scale: Any) -> tuple[Any, Any, list[float | None] | None]:
    """(in-plane factor, slice factor, target) with the shared rules: ``target_spacing`` replaces the
    factor of each axis it sets (giving both is an error); with no geometry option at all the
    in-plane factor is ``default_scale``; an axis left unset keeps factor 1; all-1 is an error.
    A factor is ``None`` where the target sets that axis. ``factor(options, key)`` parses one."""
    inplane, through = factor(options, scale_key), factor(options, "through_scale")
    target = parse_target_spacing(options.get("target_spacing"))
    if target is not None and target[0] is not None and inplane is not None:
        raise ValueError(f"option 'target_spacing' sets the in-plane spacing: drop option {scale_key!r}")
    if target is not None and target[2] is not None and through is not None:
        raise ValueError("option 'target_spacing' sets the slice spacing: drop option 'through_scale'")
    if inplane is None and through is None and target is None:
        inplane = default_scale
    if inplane is None and (target is None or target[0] is None):
        inplane = type(default_scale)(1)
    if through is None and (target is None or target[2] is None):
        through = type(default_scale)(1)
    if inplane == 1 and through == 1 and target is None:
        raise ValueError(f"options ask for no change: {scale_key!r} and 'through_scale' are both 1")
    return inplane, through, target


def without_slices(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Validated ``opts`` with the slice axis left alone (slice factor 1, no slice target)."""
    target = opts.get("target_spacing")
    if target is not None:
        target = None if target[0] is None else [target[0], target[1], None]
    return {**opts, "through_scale": 1, "target_spacing": target}

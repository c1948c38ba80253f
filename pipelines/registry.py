"""Name -> pipeline. Modules are imported lazily so that ``srnode config check`` stays fast."""
from __future__ import annotations

import importlib

from pipelines.base import Pipeline

_PIPELINES = {
    "arbitrary": "pipelines.arbitrary:PIPELINE",
    "cxr": "pipelines.cxr:PIPELINE",
    "interp": "pipelines.interp:PIPELINE",
    "sr3d": "pipelines.sr3d:PIPELINE",
}


def names() -> list[str]:
    return sorted(_PIPELINES)


def get(name: str) -> Pipeline:
    try:
        target = _PIPELINES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(names())}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)

"""Super-resolution pipelines: DICOM series in, DICOM datasets out, no networking.

``pipelines.get(name)`` returns a registered pipeline; ``pipelines.names()`` lists them.
Adding a pipeline = one module that defines an object following :class:`pipelines.base.Pipeline`
and registers it in :mod:`pipelines.registry`.
"""
from pipelines.base import InvalidOutput, Pipeline, Refusal, RunContext
from pipelines.registry import get, names

__all__ = ["InvalidOutput", "Pipeline", "Refusal", "RunContext", "get", "names"]

"""The contract every pipeline follows: pure functions from DICOM datasets to DICOM datasets.

A pipeline never touches the network or the node's state. It gets the instances of one series
(already read from disk), validated options and a :class:`RunContext`, and yields output datasets
one at a time so that callers can stream large outputs to disk.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from pydicom import Dataset

# Name-based UUIDs (RFC 4122 v5) under this namespace become "2.25.<128-bit integer>" UIDs
# (PS3.5 B.2): deterministic, unique, and no organisation root needed.
UID_NAMESPACE = uuid.UUID("6b0d3d4e-8a8e-5a4f-9a53-7372736e6f64")


class Refusal(Exception):
    """The input cannot be processed by this pipeline; ``str(exc)`` says why.

    A refusal is final for that input (no retry): the series is not a volume, the matrix is too
    small, the UIDs are missing, ... It carries no patient data.
    """


class InvalidOutput(Exception):
    """The pipeline made an output that must not be delivered (NaN or infinite values); ``str(exc)``
    says what. The job fails with that reason (no patient data in it)."""


@dataclass(frozen=True)
class RunContext:
    """What a pipeline needs from outside besides the instances and the options.

    ``uid_seed`` makes output UIDs deterministic: the same input instances, pipeline, options and
    software give the same Series/SOP Instance UIDs, so a job that runs twice (worker killed,
    ``srnode retry``) yields the same instances and never a duplicate series at the PACS.
    ``version`` counts runs of the same route on the same series (late instances start version 2,
    ...), shown in the SeriesDescription so the newer output is recognisably the same series.
    """

    uid_seed: str
    version: int = 1
    software_version: str = ""
    progress: Callable[[int, int], None] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def uid(self, *parts: object) -> str:
        """A deterministic UID for one output object (``parts`` name it inside this run)."""
        name = "\x1f".join([self.uid_seed, *map(str, parts)])
        return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


class Pipeline(Protocol):
    """What the registry holds. See ``pipelines/interp.py`` for the reference implementation."""

    name: str

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return normalised options (defaults filled in); raise ``ValueError`` naming the bad key."""

    def not_ready(self, options: Mapping[str, Any]) -> str | None:  # optional
        """Why this pipeline cannot run with these (validated) options on this machine (e.g. the
        weights they need are missing), else None."""

    def run(
        self, datasets: Sequence[Dataset], options: Mapping[str, Any], context: RunContext
    ) -> Iterator[Dataset]:
        """Return an iterator of output datasets; raise :class:`Refusal` for input it cannot process.

        Everything that can be told from the instances and options is refused by the call itself,
        before the first output is taken; outputs are computed as they are taken (``srnode route
        --dry-run`` calls ``run`` and takes nothing, so ``run`` itself is not a generator)."""

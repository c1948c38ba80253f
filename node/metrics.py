"""The node's Prometheus metrics (``GET /metrics``, prometheus_client's text exposition).

Everything is counted in the node process, workers included: a worker (embedded or a Redis
worker on another host) writes each job's outcome and run time into the job's ``result.json`` in
the shared spool, and the node counts them when it collects the result. No multiprocess mode:
its mmap files would have to be shared with workers on other hosts (NFS: mmap is unreliable
there) and outlive the processes that wrote them; the spool already carries each result once, and
counting at collection counts every job once however often a worker ran it. Counters start at
zero when the node starts (Prometheus' ``rate``/``increase`` handle the reset). Gauges (queue
depth, free space, associations) are read from the node at each scrape.

Labels carry only names from the config and fixed words: never a UID, an AE title sent by a
peer, or anything from a data set.
"""
from __future__ import annotations


from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

disable_created_metrics()  # no *_created series: counters reset when the node starts, Prometheus sees that
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

INSTANCES_RECEIVED = Counter("srnode_instances_received", "Instances stored (acknowledged), by how they came",
                             ["source"], registry=REGISTRY)
INSTANCES_REFUSED = Counter("srnode_instances_refused", "Instances refused, by reason", ["reason"], registry=REGISTRY)
SERIES_COMPLETED = Counter("srnode_series_completed", "Series found complete and routed", registry=REGISTRY)
JOBS = Counter("srnode_jobs", "Jobs reaching a state (pending, queued, done, failed, refused, delivered, parked)",
               ["pipeline", "state"], registry=REGISTRY)
JOB_DURATION = Histogram("srnode_job_duration_seconds", "Run time of a job in its worker", ["pipeline"],
                         buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)
COMPLETION_LATENCY = Histogram("srnode_completion_latency_seconds",
                               "From a series' last instance to its job on the queue",
                               buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 90, 120, 300), registry=REGISTRY)
DELIVERIES = Counter("srnode_deliveries", "Delivery attempts of output instances, by destination and outcome "
                     "(sent, warning, retry, parked)", ["destination", "outcome"], registry=REGISTRY)

for _source in ("dimse", "stow"):
    INSTANCES_RECEIVED.labels(_source)
SERIES_COMPLETED.inc(0)

# Ingest's refusal reasons (the labels of srnode_instances_refused_total)
CANNOT_PARSE = "cannot_parse"  # 0xC000: not a data set, or pixel data cut short
BAD_UIDS = "bad_uids"  # 0xA900: missing or invalid UIDs, not the SOP / study the request named
SOP_CLASS = "sop_class_not_supported"  # 0x0122
TRANSFER_SYNTAX = "transfer_syntax_not_supported"  # 0xC122
DISK_FULL = "disk_full"  # 0xA700: below retention.min_free_bytes, or ENOSPC
SPOOL_ERROR = "spool_error"  # 0xA700: another write error
LEDGER_ERROR = "ledger_error"  # 0xA700: the ledger cannot be written
TOO_LARGE = "too_large"  # 0xA700: a deflated data set inflating past node.limits.max_dataset_bytes
for _reason in (CANNOT_PARSE, BAD_UIDS, SOP_CLASS, TRANSFER_SYNTAX, DISK_FULL, SPOOL_ERROR, LEDGER_ERROR, TOO_LARGE):
    INSTANCES_REFUSED.labels(_reason)


class _NodeGauges:
    """Gauges read from the running node at each scrape."""

    def __init__(self) -> None:
        self.node = None

    def collect(self):
        node = self.node
        if node is None:
            return
        active = GaugeMetricFamily("srnode_associations_active", "DICOM associations in progress (incoming)")
        active.add_metric([], node.scp.active_associations())
        yield active
        depth = GaugeMetricFamily("srnode_queue_depth", "Jobs waiting for or running on a worker (pending or queued)")
        depth.add_metric([], node.ledger.count_jobs(["pending", "queued"]))
        yield depth
        space = node.ingest.free_bytes()
        if space is None:  # the spool's folder is gone: no sample (/healthz says why)
            return
        free = GaugeMetricFamily("srnode_spool_free_bytes", "Free space on the spool's file system", unit="")
        free.add_metric([], space)
        yield free


_GAUGES = _NodeGauges()
REGISTRY.register(_GAUGES)


def attach(node) -> None:
    """The node whose gauges /metrics shows (one node per process)."""
    _GAUGES.node = node


def exposition(node) -> tuple[bytes, str]:
    attach(node)
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

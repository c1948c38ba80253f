"""Celery tasks: thin wrappers that pass job ids, never objects (logic lives in node.jobs)."""
from __future__ import annotations

from pathlib import Path

from node.celery_app import app
from node.jobs import execute_job
from node.spool import Spool


@app.task(name="srnode.run_job", acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: int) -> str:
    """Run one job from the shared spool; idempotent, so a redelivered message is harmless."""
    return execute_job(Spool(Path(app.conf.srnode_spool)), job_id)["state"]

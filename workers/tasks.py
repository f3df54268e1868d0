"""Celery tasks: thin wrappers that take a job id and hand it to :mod:`workers.jobs`."""

from __future__ import annotations

from service.queue import DELIVER_WEBHOOK, RUN_JOB

from .celery_app import app
from .deps import get_deps
from .jobs import run


@app.task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str) -> None:
    run(job_id, get_deps(), queue=(self.request.delivery_info or {}).get("routing_key"))


@app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(job_id: str) -> None:
    """A webhook message from before the outbox (a rolling upgrade): owe it there instead."""
    get_deps().store.owe_webhook(job_id)

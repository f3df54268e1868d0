"""Celery tasks: thin wrappers that take a job id and hand it to :mod:`workers.jobs`."""

from __future__ import annotations

from service.queue import DELIVER_WEBHOOK, RUN_JOB

from .celery_app import app
from .deps import get_deps
from .jobs import run
from .webhooks import deliver


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    run(job_id, get_deps())


@app.task(name=DELIVER_WEBHOOK, bind=True, max_retries=None)
def deliver_webhook(self, job_id: str) -> None:
    delay = deliver(job_id, get_deps(), attempt=self.request.retries + 1)
    if delay is not None:
        raise self.retry(countdown=delay)

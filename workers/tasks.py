"""Celery tasks: thin wrappers that take a job id and hand it to :mod:`workers.jobs`."""

from __future__ import annotations

from service.queue import RUN_JOB

from .celery_app import app
from .deps import get_deps
from .jobs import RetryLater, run


@app.task(name=RUN_JOB, bind=True, max_retries=None)
def run_job(self, job_id: str) -> None:
    try:
        run(job_id, get_deps())
    except RetryLater as later:
        raise self.retry(countdown=later.delay) from None

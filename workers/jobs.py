"""Running a job: the state machine around the publish and pull steps.

Plain functions over a :class:`~workers.deps.Deps`, so a test can run a job without a broker. The
task in ``workers/tasks.py`` only adds Celery's redelivery and retry scheduling around ``run``.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from service import errors
from service.jobstore import TERMINAL_STATES, utcnow

from .deps import Deps
from .publish import publish
from .pull import pull

log = logging.getLogger(__name__)

STEPS = {"publish": publish, "pull": pull}


class RetryLater(Exception):
    """The job failed transiently and has attempts left: run it again after ``delay`` seconds."""

    def __init__(self, delay: float):
        super().__init__(f"retry in {delay:.1f}s")
        self.delay = delay


class Progress:
    """The job record while it runs: changes are written at most every ``interval`` seconds,
    and at once for anything but byte counts."""

    def __init__(self, job: dict[str, Any], deps: Deps, interval: float = 0.5):
        self.job, self.deps, self.interval = job, deps, interval
        self._last_write = 0.0

    def save(self, *, previous_state: str | None = None, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < self.interval:
            return
        self._last_write = now
        self.deps.store.save(self.job, previous_state=previous_state)

    def transition(self, state: str, **fields: Any) -> None:
        previous = self.job["state"]
        self.job["state"] = state
        self.job.update(fields)
        self.save(previous_state=previous)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def run(job_id: str, deps: Deps) -> None:
    job = deps.store.get(job_id)
    if job is None:
        log.warning("job %s is not in the store (expired?); dropping the message", job_id)
        return
    if job["state"] in TERMINAL_STATES:
        log.info("job %s already ended %s; ignoring a duplicate delivery", job_id, job["state"])
        return
    progress = Progress(job, deps)
    progress.transition(
        "running", attempts=job["attempts"] + 1, started_at=job["started_at"] or utcnow(), next_attempt_at=None
    )
    log.info("job started", extra={"job_id": job_id, "kind": job["kind"], "attempt": job["attempts"]})
    try:
        STEPS[job["kind"]](job, deps, progress)
    except errors.ImagepubError as exc:
        _failed(progress, exc)
        return
    except Exception:
        log.exception("job %s failed unexpectedly", job_id)
        _failed(progress, errors.ImagepubError("an unexpected error stopped the job; it has been logged"))
        return
    progress.transition("succeeded", finished_at=utcnow(), error=None)
    log.info("job succeeded", extra={"job_id": job_id})


def _failed(progress: Progress, exc: errors.ImagepubError) -> None:
    job, policy = progress.job, progress.deps.settings.retry
    error = exc.to_dict()
    if exc.transient and job["attempts"] < policy.max_attempts:
        delay = backoff(job["attempts"], policy.backoff_base_seconds, policy.backoff_max_seconds)
        at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        progress.transition("retrying", last_error=error, next_attempt_at=at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        log.warning("job will retry", extra={"job_id": job["id"], "code": exc.code, "delay": round(delay, 2)})
        raise RetryLater(delay)
    progress.transition("failed", finished_at=utcnow(), error=error, last_error=error)
    log.warning("job failed", extra={"job_id": job["id"], "code": exc.code})

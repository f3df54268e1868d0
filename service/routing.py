"""Where a job runs: the Celery queue its message goes to, decided from the job alone.

- A job whose source is an image in a daemon (a publish of ``"source": "app:1"``), and a pull
  that names its ``daemon``, must run next to that daemon: its queue is the daemon's
  (``imagepub.daemon.<name>``), which only that daemon's workers consume.
- A build, and a pull that names no daemon, need a daemon, any daemon: the daemons' queue,
  which every worker with a daemon consumes; the job records the daemon it ran on.
- Everything else (copies between registries, uploaded archives) needs no daemon: the shared
  jobs queue, which every worker consumes.

The API routes a new job; the supervisor routes a job again (a retry that is due, a job whose
worker died) by the same rule, so a re-run lands where the first run would have.
"""

from __future__ import annotations

from typing import Any

from .queue import DAEMONS_QUEUE, JOBS_QUEUE, daemon_queue


def needs_daemon(job: dict[str, Any]) -> bool:
    """Does the job read or write a daemon's image store?"""
    if job["kind"] in ("build", "pull"):
        return True
    return job["kind"] == "publish" and "source" in job["request"]


def queue_for(job: dict[str, Any]) -> str:
    if job["kind"] == "publish" and "source" in job["request"] and job.get("daemon"):
        return daemon_queue(job["daemon"])
    if job["kind"] == "pull" and job["request"].get("daemon"):
        return daemon_queue(job["request"]["daemon"])
    if needs_daemon(job):
        return DAEMONS_QUEUE
    return JOBS_QUEUE

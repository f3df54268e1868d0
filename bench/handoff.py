"""The floor of a job's time outside its push on this machine: the hand-offs any queued design
with an API process, a queue in Redis and a worker process makes, and no work at all.

- ``app``: a bare WSGI app, run under gunicorn as the API runs. ``POST /v1/publish`` pushes a
  new job id onto a Redis list and answers 202 with it; ``GET /v1/jobs/{id}/events`` answers
  server-sent events from the job's Redis stream (``XREAD BLOCK``) until its terminal one.
- ``python -m bench.handoff worker``: a process blocked on that list (``BRPOP``). For each
  id it writes a ``running`` event, then the ``succeeded`` one, with ``started_at`` and
  ``finished_at`` stamped between them, as a worker stamps its push.

What the service adds to this (Celery's hand-off to its pool process, the job's lease and record,
its snapshots, validation, the audit trail) is what "time outside the push" measures above it.
Both read ``HANDOFF_REDIS_URL``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import datetime, timezone

import redis

QUEUE = "handoff:queue"
STREAM = "handoff:job:{}"
EXPIRE_SECONDS = 600

_redis = redis.Redis.from_url(os.environ.get("HANDOFF_REDIS_URL", "redis://127.0.0.1:6379/0"))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def app(environ, start_response):
    path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
    if method == "POST" and path == "/v1/publish":
        environ["wsgi.input"].read()
        job_id = str(uuid.uuid4())
        _redis.lpush(QUEUE, job_id)
        body = json.dumps({"id": job_id, "state": "queued"}).encode()
        start_response("202 Accepted", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if method == "GET" and path.startswith("/v1/jobs/") and path.endswith("/events"):
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return _events(STREAM.format(path.split("/")[3]))
    if method == "GET" and path == "/":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


def _events(key: str):
    last = "0-0"
    while True:
        for _, entries in _redis.xread({key: last}, block=30_000) or []:
            for last, fields in entries:
                yield b"data: " + fields[b"job"] + b"\n\n"
                if json.loads(fields[b"job"])["state"] == "succeeded":
                    return


def worker() -> None:
    while True:
        _, job_id = _redis.brpop([QUEUE])
        key = STREAM.format(job_id.decode())
        job = {"id": job_id.decode(), "state": "running", "started_at": _now()}
        _redis.xadd(key, {"job": json.dumps(job)})
        job.update(state="succeeded", finished_at=_now())
        pipe = _redis.pipeline(transaction=False)
        pipe.xadd(key, {"job": json.dumps(job)})
        pipe.expire(key, EXPIRE_SECONDS)
        pipe.execute()


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    worker()

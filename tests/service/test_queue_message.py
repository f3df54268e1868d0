"""The job message the API writes straight into Redis is the one Celery itself would send."""

from __future__ import annotations

import base64
import json

from service.jobstore import new_job_id
from service.queue import JOBS_QUEUE, RUN_JOB, JobQueue

# What differs between any two sends of the same task: fresh ids, and who sent it.
PER_SEND = {("headers", "id"), ("headers", "root_id"), ("headers", "origin"),
            ("properties", "correlation_id"), ("properties", "delivery_tag")}


def _comparable(raw: str) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for section, field in PER_SEND:
        assert message[section].pop(field), (section, field)  # present, and not empty
    return message


def test_job_message_matches_what_celery_sends(settings, redis_client):
    queue = JobQueue.from_config(settings)
    job_id = new_job_id()
    queue.celery.send_task(RUN_JOB, args=[job_id], ignore_result=True)  # kombu's producer, routed by the app
    celerys = redis_client.lpop(JOBS_QUEUE)
    assert celerys is not None and redis_client.llen(JOBS_QUEUE) == 0
    assert _comparable(queue.message(job_id)) == _comparable(celerys)

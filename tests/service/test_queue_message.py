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
    assert message["headers"]["id"] == message["headers"]["root_id"] == message["properties"]["correlation_id"]
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
    # every message after the first is made from the first: still Celery's, with its own ids
    again, other = json.loads(queue.message(job_id)), json.loads(queue.message(new_job_id(), "imagepub.daemon.x"))
    assert _comparable(json.dumps(again)) == _comparable(celerys)
    assert again["headers"]["id"] != other["headers"]["id"] and again["properties"]["delivery_tag"] != other["properties"]["delivery_tag"]
    assert other["properties"]["delivery_info"] == {"exchange": "", "routing_key": "imagepub.daemon.x"}
    assert JobQueue.job_of(json.dumps(other)) != job_id


def test_an_unacknowledged_job_message_is_restored_to_the_jobs_queue(settings, redis_client):
    """kombu puts a message a consumer took but never acknowledged (a worker's warm shutdown, an
    expired visibility timeout) back by its delivery_info: it must land on the jobs queue again,
    not in kombu's dead-letter queue."""
    queue = JobQueue.from_config(settings)
    job_id = new_job_id()
    redis_client.lpush(JOBS_QUEUE, queue.message(job_id))
    with queue.celery.connection_for_read() as connection:
        channel = connection.default_channel
        taken = channel.basic_get(JOBS_QUEUE, no_ack=False)
        assert taken is not None and taken.payload == [[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        assert redis_client.llen(JOBS_QUEUE) == 0
        channel.qos.restore_unacked()
    assert redis_client.llen(JOBS_QUEUE) == 1
    assert json.loads(base64.b64decode(json.loads(redis_client.lindex(JOBS_QUEUE, 0))["body"]))[0] == [job_id]
    assert not [key for key in redis_client.keys("*") if "undeliver" in key]

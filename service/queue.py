"""The Celery application both sides share: the API only sends to it, workers consume it.

Tasks are addressed by name, so the API never imports the worker code (and with it Docker and
boto3). Messages carry the job id and nothing else: requests live in the job store, credentials
stay on the workers.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from typing import Any

import orjson
from celery import Celery
from kombu import Queue

from .config import Settings

RUN_JOB = "imagepub.run_job"
# Webhooks go through the job store's outbox (workers/outbox.py); messages of this name, sent by
# a version before it, are still taken and moved there.
DELIVER_WEBHOOK = "imagepub.deliver_webhook"
# Routing (see service/routing.py): a job that needs one daemon's image store goes on that
# daemon's queue; one that needs a daemon, any daemon, on the daemons' queue; one that needs none
# (copies, uploaded archives) on the shared jobs queue, which every worker consumes.
JOBS_QUEUE = "imagepub.jobs"
DAEMONS_QUEUE = "imagepub.daemons"
CONTROL_QUEUE = "imagepub.control"


def daemon_queue(daemon: str) -> str:
    """The queue of the jobs that must run next to ``daemon``."""
    return f"imagepub.daemon.{daemon}"


def job_queues(daemon: str | None) -> list[str]:
    """The job queues a worker of ``daemon`` (None: without one) takes jobs from, in order: the
    daemon's own queue first, then the daemons' (any daemon), then the shared one."""
    return ([daemon_queue(daemon), DAEMONS_QUEUE] if daemon else []) + [JOBS_QUEUE]


# What no broker keeps: which jobs have a message waiting in a queue. kombu's Redis transport
# runs without its acknowledgement emulation (make_celery), so a message a worker has taken is
# in that worker's memory only until its pool process takes the job's lock. Every message of a
# job put on a queue (JobStore.create, JobQueue.enqueue) enters the queue's waiting index too,
# scored with when it was put there; the pool process that takes the job's lock removes it in
# the same round trip (workers/jobs.py, Guard.acquire). Each queue is a FIFO list, so an entry
# scored well before the message next in line belongs to a message that was taken: one still
# there, without a lock, a scan later, was lost with its worker (workers/supervisor.py).
QUEUES_KEY = "imagepub:queues"  # the job queues workers take from (each worker's supervisor adds its own)


def waiting_key(queue: str) -> str:
    return f"imagepub:queue:{queue}:waiting"


def make_celery(settings: Settings) -> Celery:
    app = Celery("imagepub", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue=JOBS_QUEUE,
        task_queues=[Queue(JOBS_QUEUE), Queue(DAEMONS_QUEUE), Queue(CONTROL_QUEUE)],  # and each daemon's, made when consumed
        task_routes={RUN_JOB: {"queue": JOBS_QUEUE}, DELIVER_WEBHOOK: {"queue": CONTROL_QUEUE}, "imagepub.control.*": {"queue": CONTROL_QUEUE}},
        # A job is acknowledged only when it has ended, and goes back to the queue if the worker
        # process dies under it; each worker process takes one job at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.job_timeout_seconds + 60,
        task_soft_time_limit=settings.job_timeout_seconds,
        task_ignore_result=True,
        result_expires=300,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # No acknowledgement emulation: kombu's record of every message it delivered cost each
        # job a Redis transaction in the worker's main process before the pool could start it,
        # and another when it ended, and a message lost with its worker came back only after the
        # visibility timeout. imagepub finds such jobs itself, from its own records (the waiting
        # index above, and the job's lease once it runs: workers/supervisor.py).
        broker_transport_options={"ack_emulation": False},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


class JobQueue:
    """Puts job ids on the queue.

    A job message is written straight into kombu's Redis list for the jobs queue, so that it can
    go in the same Redis transaction as the job record: one round trip, and a job is stored and
    queued together or not at all. The message is the one Celery itself would send — headers,
    properties and body come from Celery's own protocol-2 builder (``as_task_v2``) and are
    wrapped the way kombu's virtual transport wraps them — only the round trips through kombu's
    producer (connection pool, exchange lookup, declarations) are skipped. Every job of the test
    suite travels this way to a real Celery worker.
    """

    def __init__(self, celery: Celery):
        self.celery = celery
        self._origin = f"imagepub-api@{socket.gethostname()}"
        self._template: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None

    @classmethod
    def from_config(cls, settings: Settings) -> "JobQueue":
        return cls(make_celery(settings))

    def message(self, job_id: str, queue: str = JOBS_QUEUE) -> str:
        """The kombu/Celery message that runs ``job_id`` from ``queue``, as the Redis transport
        stores it (in the list named by the queue). Celery's builder makes the first; the rest
        are that one with their own ids (the builder took ~45 µs of every submission)."""
        headers, properties, embed = self._template or self._build_template()
        task_id = str(uuid.uuid4())
        body = orjson.dumps([[job_id], {}, embed])
        return orjson.dumps({
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {**headers, "id": task_id, "root_id": task_id, "argsrepr": f"[{job_id!r}]"},
            "properties": {**properties, "correlation_id": task_id, "reply_to": self.celery.thread_oid,
                           "delivery_tag": str(uuid.uuid4()),
                           # the default exchange, as Celery routes it: kombu restores an unacknowledged
                           # message (a worker's warm shutdown) by this exchange and routing key
                           "delivery_info": {"exchange": "", "routing_key": queue}},
        }).decode()

    def _build_template(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """What every job message shares, from Celery's own protocol-2 builder (``as_task_v2``),
        with the properties kombu's virtual transport adds."""
        task_id = str(uuid.uuid4())
        headers, properties, body, _ = self.celery.amqp.as_task_v2(
            task_id, RUN_JOB, args=[""], kwargs={}, ignore_result=True, origin=self._origin,
            argsrepr="['']", kwargsrepr="{}",  # what saferepr() would say, without its cost
        )
        if not headers["id"] == headers["root_id"] == properties["correlation_id"] == task_id:
            raise RuntimeError("Celery's message builder places the task id where JobQueue.message does not look")
        properties.update(delivery_mode=2, priority=0, body_encoding="base64")
        self._template = (headers, properties, body[2])
        return self._template

    @staticmethod
    def job_of(raw: str | bytes | None) -> str | None:
        """The job id of a message as it lies in a queue; None for any other task's message, or
        for what cannot be read as one."""
        try:
            message = json.loads(raw)
            if message["headers"]["task"] != RUN_JOB:
                return None
            args = json.loads(base64.b64decode(message["body"]))[0]
            return args[0] if args and isinstance(args[0], str) else None
        except (TypeError, ValueError, KeyError, IndexError):
            return None

    def enqueue(self, job_id: str, queue: str = JOBS_QUEUE) -> None:
        """Queue ``job_id`` on ``queue``, and into the queue's waiting index (the API queues new
        jobs with their record: JobStore.create)."""
        with self.celery.pool.acquire(block=True) as connection:
            pipe = connection.default_channel.client.pipeline(transaction=True)
            pipe.lpush(queue, self.message(job_id, queue))
            pipe.zadd(waiting_key(queue), {job_id: time.time()})
            pipe.execute()

"""The Celery application both sides share: the API only sends to it, workers consume it.

Tasks are addressed by name, so the API never imports the worker code (and with it Docker and
boto3). Messages carry the job id and nothing else: requests live in the job store, credentials
stay on the workers.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid

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
        broker_transport_options={"visibility_timeout": settings.job_timeout_seconds + 300},
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

    @classmethod
    def from_config(cls, settings: Settings) -> "JobQueue":
        return cls(make_celery(settings))

    def message(self, job_id: str, queue: str = JOBS_QUEUE) -> str:
        """The kombu/Celery message that runs ``job_id`` from ``queue``, as the Redis transport
        stores it (in the list named by the queue)."""
        task_id = str(uuid.uuid4())
        headers, properties, body, _ = self.celery.amqp.as_task_v2(
            task_id, RUN_JOB, args=[job_id], kwargs={}, ignore_result=True, origin=self._origin,
            argsrepr=f"[{job_id!r}]", kwargsrepr="{}",  # what saferepr() would say, without its cost
            reply_to=self.celery.thread_oid,
        )
        properties.update(
            delivery_mode=2,
            priority=0,
            body_encoding="base64",
            delivery_tag=str(uuid.uuid4()),
            # the default exchange, as Celery routes it: kombu restores an unacknowledged
            # message (a worker's warm shutdown) by this exchange and routing key
            delivery_info={"exchange": "", "routing_key": queue},
        )
        return json.dumps({
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        })

    @staticmethod
    def job_of(held: str | bytes | None) -> str | None:
        """The job id of a message as kombu's Redis transport holds one it delivered and has
        not had acknowledged (``[message, exchange, routing key]``, in its ``unacked`` hash);
        None for any other task's message, or for what cannot be read as one."""
        try:
            message = json.loads(held)[0]
            if message["headers"]["task"] != RUN_JOB:
                return None
            args = json.loads(base64.b64decode(message["body"]))[0]
            return args[0] if args and isinstance(args[0], str) else None
        except (TypeError, ValueError, KeyError, IndexError):
            return None

    def enqueue(self, job_id: str, queue: str = JOBS_QUEUE) -> None:
        """Queue ``job_id`` on ``queue`` (the API queues new jobs with their record:
        JobStore.create)."""
        with self.celery.pool.acquire(block=True) as connection:
            connection.default_channel.client.lpush(queue, self.message(job_id, queue))

"""The worker's Celery application: ``celery -A workers.celery_app worker`` (or ``imagepub worker``)."""

from __future__ import annotations

import os
import socket

from celery import signals

from service import config
from service.jobstore import JobStore
from service.logs import configure_logging
from service.queue import JobQueue, make_celery

settings = config.load()
configure_logging(settings.log_level)  # now, so that even Celery's start-up warnings are JSON lines
app = make_celery(settings)
app.conf.include = ["workers.tasks", "workers.control"]


@signals.setup_logging.connect
def _keep_our_logging(**_):
    """Connected so that Celery leaves the logging configured above alone."""


@signals.worker_ready.connect
def _start_supervisor(sender=None, **_):
    """Heartbeats (this worker and its daemon in the fleet), the daemon's image index, due retries
    and recovery of jobs whose worker died: from the main process."""
    from service.fleet import Fleet

    from .docker_engine import DockerEngine
    from .fleet import DaemonIndex
    from .supervisor import Supervisor

    name = f"{getattr(sender, 'hostname', None) or socket.gethostname()}:{os.getpid()}"
    store = JobStore.from_config(settings)
    info = {"hostname": socket.gethostname(), "pid": os.getpid(), "daemon": settings.daemon_name,
            "concurrency": getattr(getattr(sender, "controller", None), "concurrency", None)}
    index = None
    if settings.daemon_name:
        engine = DockerEngine.from_config(settings)
        try:
            info["docker_version"] = engine.version()
        except Exception:  # the daemon is not up yet: the index says so until it is
            info["docker_version"] = None
        index = DaemonIndex(Fleet(store.redis, store.prefix), engine, settings.daemon_name)
        index.start()
    supervisor = Supervisor(settings, store, JobQueue(app), name, info)
    supervisor.start()

    def stop(**_):
        supervisor.stop()
        if index:
            index.stop()

    signals.worker_shutdown.connect(stop, weak=False)


@signals.worker_ready.connect
def _start_webhook_dispatcher(**_):
    """Webhooks owed by ended jobs, on threads of the main process: never in the pool that runs
    jobs and control calls (see workers/outbox.py)."""
    from .outbox import Dispatcher

    dispatcher = Dispatcher(settings, JobStore.from_config(settings))
    dispatcher.start()
    signals.worker_shutdown.connect(lambda **_: dispatcher.stop(), weak=False)

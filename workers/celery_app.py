"""The worker's Celery application: ``celery -A workers.celery_app worker`` (or ``imagepub worker``)."""

from __future__ import annotations

import logging
import socket
import threading

from celery import signals

from service import config
from service.logs import configure_logging
from service.queue import make_celery

settings = config.load()
app = make_celery(settings)
app.conf.include = ["workers.tasks", "workers.control"]

HEARTBEAT_SECONDS = 10.0
log = logging.getLogger(__name__)


@signals.setup_logging.connect
def _setup_logging(**_):
    configure_logging(settings.log_level)


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_):
    """Tell the API (``/readyz``) that a worker is alive, every few seconds, from the main process."""
    from service.jobstore import JobStore

    store = JobStore.from_config(settings)
    name = getattr(sender, "hostname", None) or socket.gethostname()
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.heartbeat(name)
            except Exception as exc:  # Redis away: readiness will say so; keep trying
                log.warning("heartbeat failed: %s", exc.__class__.__name__)

    store.heartbeat(name)
    threading.Thread(target=beat, name="imagepub-heartbeat", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)

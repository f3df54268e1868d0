"""The webhook outbox's dispatcher: a thread in each worker's main process that delivers the
webhooks jobs owe, on a small thread pool of its own.

A job owes its webhook from the moment it ends: the job store adds it to the outbox (a Redis
sorted set, scored by due time) in the same step that saves the terminal state. Deliveries do
not go through Celery, for two reasons:

- a slow or hostile receiver must never hold up a job or a control call: Celery gives a worker
  one pool, which jobs and registry operations share. Here deliveries run on
  ``webhooks.concurrency`` threads of their own, each ending within ``webhooks.timeout_seconds``;
- a Celery message (or a ``countdown`` retry, held unacknowledged in a worker's memory) of a
  worker killed with ``kill -9`` is gone with it (kombu's acknowledgement emulation, which
  imagepub turns off, would bring it back only after a visibility timeout of over an hour). An outbox entry is leased instead: claimed atomically by one dispatcher (its score
  moves to now + lease, where no other dispatcher looks), settled when the attempt ends, and due
  again when the lease passes without that — a killed worker delays its webhooks by one lease.

Delivery is at least once; ``X-Imagepub-Delivery`` is stable so receivers can de-duplicate.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import redis

from service.config import Settings
from service.jobstore import JobStore

from .webhooks import deliver

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# A lease outlives its delivery's deadline by this much (reading the job, settling): a live
# dispatcher always settles before another one may take the entry.
LEASE_MARGIN_SECONDS = 5.0


class Dispatcher:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings, self.store = settings, store
        self.concurrency = settings.webhooks.concurrency
        self.lease_seconds = settings.webhooks.timeout_seconds + LEASE_MARGIN_SECONDS
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="imagepub-webhook")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagepub-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take no more; wait for the deliveries in flight (each ends by its deadline), so that
        none is left to its lease and delivered twice."""
        self._stop.set()
        self._thread.join(POLL_SECONDS * 4)
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.dispatch_due()
            except redis.exceptions.RedisError as exc:  # Redis away: entries wait there for us
                log.warning("webhook outbox: Redis error %s", exc.__class__.__name__)
            except Exception:
                log.exception("webhook outbox loop failed; continuing")

    def dispatch_due(self) -> int:
        """Claim as many due webhooks as there are free threads, and start them."""
        with self._busy_lock:
            free = self.concurrency - self._busy
        if free <= 0 or self._stop.is_set():
            return 0
        claimed = self.store.claim_webhooks(free, self.lease_seconds)
        for job_id, token, attempt in claimed:
            with self._busy_lock:
                self._busy += 1
            self._pool.submit(self._deliver, job_id, token, attempt)
        return len(claimed)

    def _deliver(self, job_id: str, token: str, attempt: int) -> None:
        try:
            retry_in = deliver(job_id, self.store, self.settings, attempt)
            if not self.store.settle_webhook(job_id, token, retry_in):
                log.warning("webhook lease had passed to another worker", extra={"job_id": job_id})
        except Exception:  # left leased: due again when the lease passes
            log.exception("webhook delivery failed unexpectedly", extra={"job_id": job_id, "attempt": attempt})
        finally:
            with self._busy_lock:
                self._busy -= 1

"""The worker's supervisor: a thread in each worker's main process that

- sends a heartbeat (``/readyz`` wants a recent one) and touches ``worker_alive_file``
  (a liveness probe checks its age),
- enqueues jobs whose retry is due (retries wait in a Redis sorted set, not in a worker's
  memory as Celery ETA tasks would, so a worker that dies takes no waiting retry with it),
- finds jobs whose worker died — ``running`` but with no live job lock, or still ``queued``
  with their message taken off its queue (the worker died handing the job to its pool) — and
  enqueues them again, so that a killed worker (or machine) delays a job by about a minute,
- removes uploads from the artifact store that no job will delete: their job ended (a worker
  died before deleting it) or does not exist (it expired, or its API process died between
  storing the upload and the job).

Every worker runs one; a short Redis lock lets one at a time do the sweeping.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from service.artifacts import ORPHAN_GRACE_SECONDS
from service.config import Settings
from service.fleet import Fleet
from service.jobstore import TERMINAL_STATES, JobStore
from service.queue import QUEUES_KEY, JobQueue, job_queues, waiting_key
from service.routing import queue_for

from .artifacts import Artifacts
from .artifacts import from_config as artifacts_from_config

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
UNTAKEN_SCAN_BATCH = 1000
UPLOAD_SWEEP_SECONDS = 300.0
REQUEUE_MARK_SECONDS = 600


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue, name: str, info: dict | None = None,
                 artifacts: Artifacts | None = None):
        self.settings, self.store, self.queue, self.name = settings, store, queue, name
        self.artifacts = artifacts or artifacts_from_config(settings)
        self.fleet = Fleet(store.redis, store.prefix)
        self.info = info or {}  # what the fleet shows of this worker: its daemon, host, concurrency
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagepub-supervisor", daemon=True)

    def start(self) -> None:
        self.register_queues()
        self.fleet.register(self.name, self.info)
        self._touch_alive_file()
        self._thread.start()

    def register_queues(self) -> None:
        """Add the job queues this worker takes from to those recover_untaken looks at: a message
        is only ever taken, and lost, from a queue some worker takes from."""
        self.store.redis.sadd(QUEUES_KEY, *job_queues(self.settings.daemon_name))

    def stop(self) -> None:
        """At a warm shutdown: leave the fleet at once (not after the heartbeat's age) and
        remove the alive file (a leftover would claim a worker that is gone)."""
        self._stop.set()
        try:
            self.fleet.unregister(self.name)
        except redis.exceptions.RedisError:
            pass
        if self.settings.worker_alive_file:
            try:
                os.unlink(self.settings.worker_alive_file)
            except OSError:
                pass

    def _loop(self) -> None:
        last_beat = last_scan = last_upload_sweep = 0.0
        while not self._stop.wait(0.5):
            now = time.monotonic()
            try:
                if now - last_beat >= HEARTBEAT_SECONDS:
                    # The alive file says this process's loop runs, whatever Redis does: a Redis
                    # outage shows in readiness, and must not get every worker restarted.
                    self._touch_alive_file()
                    last_beat = now
                    self.fleet.register(self.name, self.info)
                self.enqueue_due()
                if now - last_scan >= self.settings.recovery.scan_interval_seconds:
                    self.recover_orphans()
                    self.recover_untaken()
                    last_scan = now
                if now - last_upload_sweep >= UPLOAD_SWEEP_SECONDS:
                    last_upload_sweep = now
                    self.sweep_uploads()
            except redis.exceptions.RedisError as exc:  # Redis away: readiness says so; keep trying
                log.warning("supervisor: Redis error %s", exc.__class__.__name__)
            except Exception:
                log.exception("supervisor loop failed; continuing")

    def _touch_alive_file(self) -> None:
        """For a liveness probe: the file's age says when this worker last reached Redis."""
        path = self.settings.worker_alive_file
        if path:
            try:
                with open(path, "a"):
                    os.utime(path)
            except OSError as exc:
                log.warning("cannot touch %s: %s", path, exc.strerror)

    def _sweep_lock(self, what: str, ttl: float) -> bool:
        return bool(self.store.redis.set(f"imagepub:supervisor:{what}", self.name, nx=True, px=int(ttl * 1000)))

    def enqueue_due(self) -> int:
        due = self.store.due(time.time())
        if not due or not self._sweep_lock("due", 5):
            return 0
        for job_id in due:
            # Enqueue first, then forget: a crash in between means a duplicate delivery, which
            # the job lock and the state check absorb; the other order could lose the job.
            self._enqueue(job_id)
            self.store.unschedule(job_id)
        log.info("enqueued due retries", extra={"count": len(due)})
        return len(due)

    def recover_orphans(self) -> list[str]:
        if not self._sweep_lock("orphans", max(1.0, self.settings.recovery.scan_interval_seconds)):
            return []
        requeued = []
        for job_id in self._without_lock(self.store.running_ids()):
            if self._mark_requeued(job_id):
                log.warning("job lost its worker; enqueueing it again", extra={"job_id": job_id})
                self._enqueue(job_id)
                requeued.append(job_id)
        return requeued

    def _without_lock(self, job_ids: list[str]) -> list[str]:
        """Those of ``job_ids`` whose job lock nobody holds (one round trip)."""
        if not job_ids:
            return []
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self.store.job_lock_key(job_id))
        return [job_id for job_id, locked in zip(job_ids, pipe.execute()) if not locked]

    def _mark_requeued(self, job_id: str) -> bool:
        """Whether this supervisor may queue ``job_id`` again: once, until a worker takes the job
        (which clears the mark), or the mark expires (that message was lost too, or with an
        unpersisted Redis)."""
        return bool(self.store.redis.set(self.store.requeued_key(job_id), self.name, nx=True, ex=REQUEUE_MARK_SECONDS))

    def recover_untaken(self) -> list[str]:
        """Jobs whose message a worker took off its queue, and which it never started: it died
        while it handed the job to its pool (``kill -9``, a machine lost). Such a job is still
        ``queued`` (or ``retrying``, its retry enqueued), and its message is gone with the
        worker's memory; only the queue's waiting index still has it (service/queue.py).

        A queue is a FIFO list: a message put there well before (``lock_ttl_seconds``: more than
        any two API processes' clocks or stalls differ by) the one next in line, or at all when
        the queue is empty, was taken. Its pool process removes its entry when it takes the
        job's lock, milliseconds later; an entry of a job without a lock that is still there on
        the next scan belongs to a message lost with its worker. The job is queued again (once,
        like an orphan). Entries of jobs that have ended, run or wait for their retry's time are
        left over (a version before the index, a worker that died at the wrong moment): removed."""
        if not self._sweep_lock("untaken", max(1.0, self.settings.recovery.scan_interval_seconds)):
            return []
        client = self.store.redis
        margin = self.settings.recovery.lock_ttl_seconds
        requeued = []
        for queue in client.smembers(QUEUES_KEY):
            key, bound = waiting_key(queue), time.time() - margin
            head = client.lindex(queue, -1)  # the message next in line (consumers BRPOP)
            if head is not None:
                score = client.zscore(key, JobQueue.job_of(head) or "")
                if score is None:
                    continue  # taken meanwhile, or from before the index: look again next scan
                bound = min(bound, score - margin)
            taken = client.zrangebyscore(key, "-inf", f"({bound}", start=0, num=UNTAKEN_SCAN_BATCH)
            requeued += [job_id for job_id in self._without_lock(taken) if self._requeue_untaken(job_id, queue)]
        return requeued

    def _requeue_untaken(self, job_id: str, queue: str) -> bool:
        client, key = self.store.redis, waiting_key(queue)
        job = self.store.get(job_id)
        if job is None or job["state"] not in ("queued", "retrying") or (job["state"] == "retrying" and self.store.is_scheduled(job_id)):
            client.zrem(key, job_id)  # left over: the job ended, runs (orphans are recover_orphans'), or waits for its time
            return False
        # seen twice, a scan apart: a live worker takes the job's lock milliseconds after its message
        seen = f"imagepub:supervisor:untaken:{job_id}"
        if client.set(seen, self.name, nx=True, ex=int(max(10, 3 * self.settings.recovery.scan_interval_seconds))):
            return False
        if not self._mark_requeued(job_id):
            return False  # queued again already: looked at again once the mark expires
        log.warning("job's message was taken by a worker that died before it started the job; enqueueing it again",
                    extra={"job_id": job_id})
        self.queue.enqueue(job_id, queue)  # its entry's score becomes now: a message in line again
        client.delete(seen)
        return True

    def sweep_uploads(self) -> list[str]:
        """Delete the uploads whose job has ended, or has not existed for ORPHAN_GRACE_SECONDS
        (the API stores an upload a moment before its job); the keys deleted."""
        if not self._sweep_lock("uploads", UPLOAD_SWEEP_SECONDS / 2):
            return []
        swept = []
        for key, age in self.artifacts.listing():
            job = self.store.get(key)
            if (job is None and age > ORPHAN_GRACE_SECONDS) or (job is not None and job["state"] in TERMINAL_STATES):
                self.artifacts.delete(key)
                swept.append(key)
        if self.artifacts.sweep_incoming() or swept:
            log.info("swept uploads no job will delete", extra={"count": len(swept)})
        return swept

    def _enqueue(self, job_id: str) -> None:
        """Queue the job where its first run was queued (service/routing.py): a job that needs
        one daemon goes back to that daemon's queue."""
        job = self.store.get(job_id)
        if job is not None:
            self.queue.enqueue(job_id, queue_for(job))

"""Running a job: the state machine around the publish and pull steps.

Plain functions over a :class:`~workers.deps.Deps`, so a test can run a job without a broker; the
Celery task in ``workers/tasks.py`` only hands over the job id.

Delivery is at least once (late acks; the supervisor re-enqueues jobs whose worker died), so a
job may be delivered again while, or after, it runs. A per-job lock in Redis, kept alive while
the job runs, lets exactly one delivery run it; a delivery of a job that has ended does nothing.
A job whose every run killed its worker ends ``failed`` (``worker_lost``) after
``recovery.max_worker_losses`` deliveries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import redis
from celery.exceptions import SoftTimeLimitExceeded

from service import errors
from service.artifacts import has_upload
from service.jobstore import TERMINAL_STATES, load_record, utcnow
from service.queue import DAEMONS_QUEUE, JOBS_QUEUE, daemon_queue, waiting_key
from service.routing import needs_daemon, queue_for

from .deps import Deps
from .leases import Leases
from .archive import publish_archive
from .build import build
from .copy import copy
from .publish import publish
from .pull import pull

log = logging.getLogger(__name__)

STEPS = {"publish": publish, "pull": pull, "build": build, "copy": copy}
# How often a job waiting for another job's lease looks again (and for a cancellation).
LEASE_POLL_SECONDS = 0.1


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


class Guard:
    """While a job runs: holds its leases (its job lock first) and keeps them alive, and notices
    a cancellation, from the process' watcher thread (:class:`_Watcher`)."""

    def __init__(self, deps: Deps, job_id: str, queue: str | None = None):
        self.deps, self.job_id, self.queue = deps, job_id, queue
        self.ttl = deps.settings.recovery.lock_ttl_seconds
        self.leases = Leases(deps.redis, self.ttl)
        self.cancelled = threading.Event()
        self._watched = False
        self._ticking = threading.Lock()  # a tick and the release never overlap
        self._last_renewal = 0.0

    def acquire(self) -> tuple[bool, dict[str, Any] | None]:
        """Take the job's lock and, in the same round trip, read its record (current: nobody
        else runs the job), clear its re-enqueued mark (taken: if this worker dies too, the
        supervisor re-enqueues it again; a duplicate delivery that finds the lock taken clears a
        mark the taker has cleared already) and take it out of the waiting index of the queue
        its message came from (service/queue.py). Whether the lock was taken, and the record."""
        store = self.deps.store

        def also(pipe):
            pipe.delete(store.requeued_key(self.job_id)).get(store.job_key(self.job_id))
            if self.queue:
                pipe.zrem(waiting_key(self.queue), self.job_id)

        taken, (_, raw, *_) = self.leases.take_with(store.job_lock_key(self.job_id), also)
        if not taken:
            return False, None
        self._last_renewal = time.monotonic()
        self._watched = True
        _Watcher.of_this_process().add(self)
        return True, load_record(raw) if raw else None

    def release(self) -> None:
        with self._ticking:
            self._watched = False
        _Watcher.of_this_process().discard(self)
        self.leases.give_back_all()

    def tick(self) -> None:
        """The watcher's visit, every WATCH_SECONDS: a cancellation noticed, the leases renewed
        once a third of their TTL has passed."""
        with self._ticking:
            if not self._watched:
                return
            try:
                if not self.cancelled.is_set() and self.deps.store.cancel_requested(self.job_id):
                    self.cancelled.set()
                if time.monotonic() - self._last_renewal > self.ttl / 3:
                    self.leases.renew()
                    self._last_renewal = time.monotonic()
            except redis.exceptions.RedisError as exc:  # Redis hiccup: try again next tick
                log.warning("job guard: %s", exc.__class__.__name__, extra={"job_id": self.job_id})

    def check(self) -> None:
        """Raise :class:`~service.errors.Cancelled` once the job has been cancelled."""
        if self.cancelled.is_set():
            raise errors.Cancelled("cancelled while running")


class _Watcher:
    """One thread per process that visits every running job's :class:`Guard`. Started with the
    process' first job and kept: a thread started for each job cost that job ~0.13 ms before it
    could start (docs/benchmarks.md). A pool process forked from a parent with a watcher starts
    its own (threads do not survive a fork)."""

    WATCH_SECONDS = 0.25
    _mutex = threading.Lock()
    _instance: "_Watcher | None" = None

    def __init__(self):
        self._guards: set[Guard] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="job-guards", daemon=True).start()

    @classmethod
    def of_this_process(cls) -> "_Watcher":
        if cls._instance is None:
            with cls._mutex:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    def add(self, guard: Guard) -> None:
        with self._lock:
            self._guards.add(guard)

    def discard(self, guard: Guard) -> None:
        with self._lock:
            self._guards.discard(guard)

    def _run(self) -> None:
        while True:
            time.sleep(self.WATCH_SECONDS)
            with self._lock:
                guards = list(self._guards)
            for guard in guards:
                try:
                    guard.tick()
                except Exception:  # one guard's bug must not stop the renewals of the others
                    log.exception("job guard failed", extra={"job_id": guard.job_id})

    @classmethod
    def _forget_in_child(cls) -> None:
        cls._mutex, cls._instance = threading.Lock(), None  # the parent's may have been held at the fork


os.register_at_fork(after_in_child=_Watcher._forget_in_child)


class Progress:
    """The job record while it runs: changes are written at most every ``interval`` seconds,
    and at once for anything but byte counts. Every write also checks for cancellation."""

    def __init__(self, job: dict[str, Any], deps: Deps, guard: Guard | None = None, interval: float = 0.5):
        self.job, self.deps, self.guard, self.interval = job, deps, guard, interval
        # Without a guard (a test calling a step directly) leases are not renewed: they lapse
        # after the TTL, which is all a short step needs.
        self.leases = guard.leases if guard else Leases(deps.redis, deps.settings.recovery.lock_ttl_seconds)
        self._last_write = 0.0

    def check(self) -> None:
        if self.guard:
            self.guard.check()

    def save(self, *, force: bool = True, event: str = "progress") -> None:
        self.check()
        now = time.monotonic()
        if not force and now - self._last_write < self.interval:
            return
        self._last_write = now
        if not self.deps.store.save(self.job, event=event):
            # The stored job ended under us: a caller cancelled it before we noticed.
            raise errors.Cancelled("the job was ended by a caller")

    @contextlib.contextmanager
    def exclusive(self, key: str, what: str) -> Iterator[None]:
        """Hold the lease ``key`` for the block. While another job holds it, this job says so
        (``waiting_for``: ``what``, in the record and its events) and stays cancellable; a
        holder that died lets go within ``recovery.lock_ttl_seconds``."""
        if not self.leases.take(key):
            self.job["waiting_for"] = what
            self.save()
            log.info("job waits for %s", what, extra={"job_id": self.job["id"]})
            try:
                while not self._take_while_waiting(key):
                    self.check()
                    time.sleep(LEASE_POLL_SECONDS)
            finally:  # taken, or cancelled while waiting: either way no longer waiting
                self.job.pop("waiting_for", None)
            self.save()
        try:
            yield
        finally:
            self.leases.give_back(key)

    def _take_while_waiting(self, key: str) -> bool:
        """One more try at a lease this job waits for. Redis away (a restart, a failover) is
        one more reason to wait, not the end of the job: the holder cannot finish either."""
        try:
            return self.leases.take(key)
        except redis.exceptions.RedisError as exc:
            log.warning("job waits for Redis: %s", exc.__class__.__name__, extra={"job_id": self.job["id"]})
            return False

    def transition(self, state: str, **fields: Any) -> None:
        self.job["state"] = state
        self.job.update(fields)
        if not self.deps.store.save(self.job, event="state") and state not in TERMINAL_STATES:
            raise errors.Cancelled("the job was ended by a caller")


def step_for(job: dict[str, Any]) -> Callable[[dict[str, Any], Deps, "Progress"], None]:
    """What runs a job: its kind's step; a publish's source is a daemon's image or an archive."""
    if job["kind"] == "publish" and "archive" in job:
        return publish_archive
    return STEPS[job["kind"]]


def serves(queue: str, daemon: str | None) -> bool:
    """May a worker of ``daemon`` (None: a worker without one) run a job routed to ``queue``?"""
    if queue == JOBS_QUEUE:
        return True
    if queue == DAEMONS_QUEUE:
        return daemon is not None
    return daemon is not None and queue == daemon_queue(daemon)


def run(job_id: str, deps: Deps, queue: str | None = None) -> None:
    """Run the job ``job_id``, whose message came from ``queue``."""
    # The lock, then the record: one round trip (Guard.acquire).
    guard = Guard(deps, job_id, queue)
    taken, job = guard.acquire()
    if not taken:
        log.info("job is running elsewhere; ignoring a duplicate delivery", extra={"job_id": job_id})
        return
    try:
        if job is None:
            log.warning("job is not in the store (expired?); dropping the message", extra={"job_id": job_id})
            return
        if job["state"] in TERMINAL_STATES:
            log.info("job already ended; ignoring a duplicate delivery", extra={"job_id": job_id, "state": job["state"]})
            return
        route = queue_for(job)
        if not serves(route, deps.settings.daemon_name):
            # on a queue this worker should not have taken it from (a message from before the
            # fleet's routing, say): send it where it runs
            log.warning("job belongs on %s; moving it there", route, extra={"job_id": job_id})
            deps.queue.enqueue(job_id, route)
            return
        if job["state"] == "retrying":
            deps.store.unschedule(job_id)  # due now (or delivered twice): it runs here
        if needs_daemon(job):
            job["daemon"] = deps.settings.daemon_name  # where it ran (a build, a pull: any daemon)
        job.pop("waiting_for", None)  # what a killed attempt waited for is nothing this one waits for
        _run_locked(job, deps, guard)
    finally:
        guard.release()
    # A webhook the job owes went into the outbox with its terminal state (JobStore.save).
    if job["state"] in TERMINAL_STATES and has_upload(job):
        deps.artifacts.delete(job_id)  # if this fails, or the worker dies first: the sweeper


def _run_locked(job: dict[str, Any], deps: Deps, guard: Guard) -> None:
    progress = Progress(job, deps, guard)
    if job["state"] == "running":
        # The last delivery died mid-run (its worker was killed): count it, and stop a job
        # that kills every worker it lands on.
        job["worker_losses"] = job.get("worker_losses", 0) + 1
        deps.store.metrics.incr("imagepub_job_worker_losses", kind=job["kind"])
        log.warning("job was running on a worker that died", extra={"job_id": job["id"], "losses": job["worker_losses"]})
        if job["worker_losses"] >= deps.settings.recovery.max_worker_losses:
            error = errors.ImagepubError(
                f"the job's worker died {job['worker_losses']} times while running it; not trying again",
                code="worker_lost",
            )
            progress.transition("failed", finished_at=utcnow(), error=error.to_dict())
            return
    try:
        progress.transition("running", attempts=job["attempts"] + 1, started_at=job["started_at"] or utcnow(), next_attempt_at=None)
        log.info("job started", extra={"job_id": job["id"], "kind": job["kind"], "attempt": job["attempts"]})
        step_for(job)(job, deps, progress)
    except errors.Cancelled:
        job.pop("worker_losses", None)
        progress.transition("cancelled", finished_at=utcnow(), error={"code": "cancelled", "message": "cancelled while running"})
        log.info("job cancelled", extra={"job_id": job["id"]})
        return
    except errors.ImagepubError as exc:
        _failed(progress, exc)
        return
    except redis.exceptions.RedisError as exc:
        # Redis away longer than redis-py's retries (a restart under load): worth another
        # attempt. If Redis is still away for this record too, the job keeps its `running` state
        # without a live lease, and the supervisor runs it again once Redis is back.
        log.warning("job interrupted: Redis unavailable (%s)", exc.__class__.__name__, extra={"job_id": job["id"]})
        _failed(progress, errors.TransientError(f"the job store was unavailable ({exc.__class__.__name__})", code="store_unavailable"))
        return
    except SoftTimeLimitExceeded:
        limit = deps.settings.job_timeout_seconds
        _failed(progress, errors.JobFailed(f"the job ran longer than job_timeout_seconds ({limit} s)", code="timeout"))
        return
    except Exception:
        log.exception("job failed unexpectedly", extra={"job_id": job["id"]})
        _failed(progress, errors.ImagepubError("an unexpected error stopped the job; it has been logged"))
        return
    progress.transition("succeeded", finished_at=utcnow(), error=None)
    log.info("job succeeded", extra={"job_id": job["id"]})


def _failed(progress: Progress, exc: errors.ImagepubError) -> None:
    job, deps = progress.job, progress.deps
    policy = deps.settings.retry
    error = exc.to_dict()
    if exc.transient and job["attempts"] < policy.max_attempts:
        delay = backoff(job["attempts"], policy.backoff_base_seconds, policy.backoff_max_seconds)
        due = time.time() + delay
        # Scheduled before the state says so: a crash in between leaves a job the supervisor
        # finds (running, unlocked) rather than one that waits forever.
        deps.store.schedule(job["id"], due)
        deps.store.metrics.incr("imagepub_job_retries", kind=job["kind"], code=exc.code)
        progress.transition("retrying", last_error=error, next_attempt_at=_iso(due))
        log.warning("job will retry", extra={"job_id": job["id"], "code": exc.code, "delay": round(delay, 2)})
        return
    progress.transition("failed", finished_at=utcnow(), error=error, last_error=error)
    log.warning("job failed", extra={"job_id": job["id"], "code": exc.code})

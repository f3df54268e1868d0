"""Leases: the Redis locks a job holds while it works, alive exactly as long as their holder.

Every lock a job takes — its own job lock, the push lock of a repository — is taken with a short
TTL (``recovery.lock_ttl_seconds``) and renewed by the job's guard thread every third of it. A
worker that dies (``kill -9``, a lost machine) renews nothing: its leases lapse within the TTL,
so nobody ever waits on a dead holder for longer than that, and the supervisor re-runs the job.
A lease is never held past the ``with`` block or the job that took it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Callable

import redis
from redis.lock import Lock

log = logging.getLogger(__name__)


class Leases:
    """The locks one job holds. ``take`` and ``give_back`` from the job's thread, ``renew`` from
    its guard thread."""

    def __init__(self, client: redis.Redis, ttl: float):
        self.client, self.ttl = client, ttl
        self._held: dict[str, Lock] = {}
        self._mutex = threading.Lock()

    def take(self, key: str) -> bool:
        """Take ``key`` if nobody holds it; True when this job now holds it."""
        return self.take_with(key, lambda pipe: None)[0]

    def take_with(self, key: str, also: Callable[[redis.client.Pipeline], Any]) -> tuple[bool, list[Any]]:
        """``take(key)`` and, in the same round trip, the commands ``also`` puts on the pipeline
        after it (they run whether or not the lease was taken): whether it was, and their answers.
        The lease is redis-py's Lock as ``take`` makes it, with the token it would choose."""
        token = uuid.uuid1().hex.encode()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, token, nx=True, px=int(self.ttl * 1000))
        also(pipe)
        taken, *answers = pipe.execute()
        if not taken:
            return False, answers
        lock = self.client.lock(key, timeout=self.ttl, thread_local=False)
        lock.local.token = token
        with self._mutex:
            self._held[key] = lock
        return True, answers

    def give_back(self, key: str) -> None:
        with self._mutex:
            lock = self._held.pop(key, None)
        if lock is not None:
            try:
                lock.release()
            except redis.exceptions.LockError:  # lapsed meanwhile (Redis away too long): nothing to give
                log.warning("lease %s had lapsed before it was given back", key)

    def renew(self) -> None:
        """Reset every held lease to the full TTL. A lease that lapsed (Redis unreachable for
        longer than the TTL) is reported and dropped: someone else may hold it now."""
        with self._mutex:
            held = list(self._held.items())
        for key, lock in held:
            try:
                lock.reacquire()
            except redis.exceptions.LockNotOwnedError:
                log.error("lease %s lapsed while held (Redis unreachable for longer than its TTL?)", key)
                with self._mutex:
                    self._held.pop(key, None)

    def give_back_all(self) -> None:
        for key in list(self._held):
            self.give_back(key)

    def holds(self, key: str) -> bool:
        with self._mutex:
            return key in self._held

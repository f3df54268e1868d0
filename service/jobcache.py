"""Job records as an API process reads them: a cache in the process that Redis keeps honest.

Pipelines poll their jobs (``GET /v1/jobs/{id}``, ``imagepub --wait`` without a stream): the same
few hundred records, read again and again, and written only when a job moves. Each read used to
be a round trip to Redis, a third of the cost of serving it (docs/benchmarks.md). Here a record
read once is served from memory until Redis says it changed: Redis' server-assisted client-side
caching (``CLIENT TRACKING`` in broadcasting mode, https://redis.io/docs/latest/develop/reference/client-side-caching/).
One connection per process asks Redis to tell it of every write to a job's keys and listens:
when any process anywhere writes a job (a worker's snapshot, a cancel, retention's expiry,
``FLUSHDB``), Redis pushes the key's name to every API process, which forgets it.

What keeps a read current:

* The listener's pending messages are read before every lookup, without waiting: a write that
  Redis acknowledged before this read began has had its invalidation sent already.
* A record fetched while its key was invalidated is not kept (the fetch may have read the old
  value): each fetch notes the key's invalidation count and keeps the answer only if it did
  not move.
* The cache is used only while the listener is known alive: it pings every
  ``PING_SECONDS`` and the cache serves nothing once no answer came for ``HEALTHY_SECONDS``.
  A listener that fails, and a Redis that restarts, empty the cache; reads go to Redis until a
  new listener has subscribed (tried again every ``RETRY_SECONDS``).
* Entries are bounded in number (least recently used go first) and in age.

redis-py has client-side caching of its own, but only against Redis 7.4 or later (its
``CacheProxyConnection``); Debian 12 ships 7.0, where tracking in broadcasting mode with a
redirect to the listener itself is available (Redis 6.0+). Where ``CLIENT TRACKING`` is refused
(an ACL, a proxy), the cache stays off and every read goes to Redis, as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

CHANNEL = "__redis__:invalidate"
PING_SECONDS = 0.25
HEALTHY_SECONDS = 1.0
RETRY_SECONDS = 1.0
MAX_AGE_SECONDS = 60.0
MAX_ENTRIES = 4096
# Redis writes at most 64 KiB to a client per turn of its event loop, and keeps the rest in its
# own buffer: after a long quiet spell, what the socket held need not be all that was sent. A
# drain that long (about 30 KiB of messages) forgets everything instead of trusting the rest.
BACKLOG_MESSAGES = 400


class JobCache:
    """Values of keys under ``prefix``, read through :meth:`get` (a missing key, None, is never
    kept)."""

    def __init__(self, client: redis.Redis, prefix: str, *, max_entries: int = MAX_ENTRIES):
        self._pool = client.connection_pool
        self.prefix = prefix
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._fetching: dict[str, list[int]] = {}  # key → [fetches in flight, invalidations meanwhile]
        self._epoch = 0  # moves when the whole cache is forgotten
        self._listener: redis.Connection | None = None
        self._listener_pid = 0
        self._retry_at = float("-inf")
        self._pinged_at = self._pong_at = float("-inf")
        self._refused = False
        # One reader of the listener at a time (greenlets or threads); whoever finds it taken
        # reads Redis directly instead of waiting.
        self._lock = threading.Lock()

    # --- reading ---

    def get(self, key: str, fetch: Callable[[], str | None]) -> str | None:
        """The value of ``key``: from memory when Redis has not said it changed since it was
        read, else ``fetch()`` (which reads Redis), kept for the next reader."""
        if not self._lock.acquire(blocking=False):
            return fetch()
        try:
            if not self._listening():
                state = None
            else:
                entry = self._entries.get(key)
                if entry is not None and time.monotonic() - entry[0] < MAX_AGE_SECONDS:
                    self._entries.move_to_end(key)
                    return entry[1]
                state = self._fetching.setdefault(key, [0, 0])
                state[0] += 1
                seen, epoch = state[1], self._epoch
        finally:
            self._lock.release()
        if state is None:
            return fetch()
        value = None
        try:
            value = fetch()
            return value
        finally:
            self._done_fetching(key, value, seen, epoch)

    def _done_fetching(self, key: str, value: str | None, seen: int, epoch: int) -> None:
        with self._lock:
            listening = self._listening(connect=False)  # first: what Redis said while the fetch was out
            state = self._fetching[key]
            state[0] -= 1
            if state[0] == 0:
                del self._fetching[key]
            if listening and value is not None and state[1] == seen and epoch == self._epoch:
                self._entries[key] = (time.monotonic(), value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)

    @property
    def size(self) -> int:
        return len(self._entries)

    # --- the listener (called with the lock held) ---

    def _listening(self, connect: bool = True) -> bool:
        """Read what Redis sent without waiting, ping now and then; whether the cache may serve.
        Without a listener, subscribe one if ``connect`` (at most every ``RETRY_SECONDS``)."""
        now = time.monotonic()
        if self._listener is not None and self._listener_pid != os.getpid():
            self._listener = None  # the parent's, inherited by a fork: never read it here
            self._forget_all()
        if self._listener is None:
            if self._refused or not connect or now < self._retry_at:
                return False
            self._retry_at = now + RETRY_SECONDS
            try:
                self._subscribe()
            except (redis.RedisError, OSError) as exc:
                self._drop()
                if isinstance(exc, redis.ResponseError):  # tracking refused: stay off for good
                    self._refused = True
                    log.warning("job cache off: Redis refused CLIENT TRACKING (%s); every read goes to Redis", exc)
                return False
            now = time.monotonic()
        try:
            read = 0
            while self._listener.can_read(0):
                self._handle(self._listener.read_response())
                read += 1
            if read >= BACKLOG_MESSAGES:
                self._forget_all()
            if now - self._pinged_at >= PING_SECONDS:
                self._listener.send_command("PING", check_health=False)
                self._pinged_at = now
        except (redis.RedisError, OSError):
            self._drop()
            return False
        return now - self._pong_at < HEALTHY_SECONDS

    def _subscribe(self) -> None:
        # no retries of its own: a Redis that does not answer is tried again RETRY_SECONDS later,
        # and the request that tried reads Redis as if there were no cache
        kwargs = {**self._pool.connection_kwargs, "health_check_interval": 0, "retry": Retry(NoBackoff(), 0)}
        listener = self._pool.connection_class(**kwargs)
        self._listener, self._listener_pid = listener, os.getpid()
        listener.connect()
        listener.send_command("CLIENT", "ID")
        own_id = listener.read_response()
        # Broadcasting mode: Redis tells of every key under the prefix, read or not, and keeps
        # no table of what this process read. The redirect sends them to this connection.
        listener.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix, "REDIRECT", own_id)
        listener.read_response()
        listener.send_command("SUBSCRIBE", CHANNEL)
        listener.read_response()
        self._forget_all()  # whatever was written while nobody listened
        self._pong_at = self._pinged_at = time.monotonic()

    def _handle(self, message: list) -> None:
        message = [part.decode() if isinstance(part, bytes) else part for part in message[:2]] + message[2:]
        kind = message[0]
        if kind == "pong":
            self._pong_at = time.monotonic()
        elif kind == "message" and message[1] == CHANNEL:
            keys = message[2]
            if keys is None:  # FLUSHDB, FLUSHALL: everything
                self._forget_all()
                return
            for key in keys:
                key = key.decode() if isinstance(key, bytes) else key
                self._entries.pop(key, None)
                state = self._fetching.get(key)
                if state is not None:
                    state[1] += 1

    def _forget_all(self) -> None:
        self._entries.clear()
        self._epoch += 1

    def _drop(self) -> None:
        self._forget_all()
        self._pong_at = float("-inf")
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.disconnect()

"""Live event streams: one Redis reader per API process, fanning each job's events out to its followers.

A follower of a running job (``GET /v1/jobs/{id}/events``) used to block in an ``XREAD`` of its
own: a Redis connection per follower, and each snapshot read from Redis and handed over once per
follower. Pipelines that all ``--wait`` make that a thousand connections and a thousand reads of
every snapshot. Here one reader per process (a thread; a greenlet under the API's gevent worker)
reads the streams of every job its followers follow in one ``XREAD``, from the oldest position any
of them has reached, and hands each event to the followers that have not seen it. A follower
never misses an event: it subscribes at the last event it sent, and the reader reads each job's
stream from the lowest of its followers' positions.

A new follower wakes the reader, which is blocked in an ``XREAD`` of the other followers'
streams (or of its own job's, from a later position): it adds an entry to the process' wake stream, which every read includes
(read from the last entry the reader saw, so a wake-up sent before the read began still wakes
it). The new follower joins the next read at once; before, it waited for the read to time out
(``BLOCK_MS``), and a short job could end unseen for up to that long. The reader stops when the
last follower leaves and starts again with the next. When Redis fails
the read, every follower's wait raises the error (its stream ends cleanly; the client resumes
with ``Last-Event-ID``), and the next follower starts a new reader.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque
from typing import Any

import redis

from .jobstore import client_like

log = logging.getLogger(__name__)

BLOCK_MS = 100  # how long a read waits (a new follower wakes it sooner)
COUNT = 100  # events per stream per read
WAKE_TTL_SECONDS = 300  # a process' wake stream outlives its last use by this


def _position(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """One follower of one job: the events after ``after``, as the reader hands them over."""

    def __init__(self, job_id: str, after: str):
        self.job_id, self.after = job_id, after
        self._events: deque[tuple[str, str, str]] = deque()
        self._ready = threading.Event()
        self._error: Exception | None = None

    def wait(self, timeout: float) -> list[tuple[str, str, str]]:
        """The events handed over since the last call (event id, type, job JSON), waiting up
        to ``timeout`` seconds for one; [] when none came. Raises the reader's Redis error."""
        if not self._events and self._error is None:
            self._ready.wait(timeout)
        self._ready.clear()  # before taking: an event handed from now on sets it again
        out = []
        while self._events:
            out.append(self._events.popleft())  # one at a time: the reader may be appending meanwhile
        if not out and self._error is not None:
            raise self._error
        return out

    def _hand(self, event: tuple[str, str, str]) -> None:
        self._events.append(event)
        self.after = event[0]
        self._ready.set()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._ready.set()


class Followers:
    """The reader of one API process (one per store, started on demand, per process)."""

    def __init__(self, store, block_ms: int = BLOCK_MS):
        self.store, self.block_ms = store, block_ms
        self._by_job: dict[str, set[Subscription]] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._pid = os.getpid()
        self._client: redis.Redis | None = None
        self._new_wake_stream()

    def _new_wake_stream(self) -> None:
        self._wake_key = f"{self.store.prefix}followers:wake:{uuid.uuid4().hex}"
        self._wake_seen = "0-0"

    def subscribe(self, job_id: str, after: str) -> Subscription:
        sub = Subscription(job_id, after)
        with self._lock:
            if self._pid != os.getpid():  # a forked process: start afresh, nothing is shared
                self._by_job, self._reader, self._client, self._pid = {}, None, None, os.getpid()
                self._new_wake_stream()
            self._by_job.setdefault(job_id, set()).add(sub)
            reading = self._reader is not None and self._reader.is_alive()
            if not reading:
                self._reader = threading.Thread(target=self._read, name="imagepub-followers", daemon=True)
                self._reader.start()
        if reading:  # a new stream, or an older position in one: the read in progress has neither
            self._wake()
        return sub

    def _wake(self) -> None:
        """Wake the reader from its read, so that the next one includes the new stream. If this
        fails, the stream joins when the read times out (``BLOCK_MS``)."""
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, WAKE_TTL_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("live event streams: could not wake the reader (%s)", exc.__class__.__name__)

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._by_job.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_job[sub.job_id]

    def following(self) -> int:
        """How many followers this process' reader serves now."""
        with self._lock:
            return sum(len(subs) for subs in self._by_job.values())

    def _redis(self) -> redis.Redis:
        """A connection of the reader's own: its XREAD blocks, and no request should wait for it."""
        if self._client is None:
            self._client = client_like(self.store.redis, decode_responses=True)
        return self._client

    def _read(self) -> None:
        while True:
            with self._lock:
                if not self._by_job:
                    self._reader = None
                    return
                jobs = {self.store.events_key(job_id): job_id for job_id in self._by_job}
                streams = {key: min((s.after for s in self._by_job[job_id]), key=_position) for key, job_id in jobs.items()}
                streams[self._wake_key] = self._wake_seen
            try:
                answer = self._redis().xread(streams, count=COUNT, block=self.block_ms)
            except redis.RedisError as exc:
                log.warning("live event streams ended: Redis failed the read (%s)", exc.__class__.__name__)
                with self._lock:
                    everyone = [sub for subs in self._by_job.values() for sub in subs]
                    self._by_job.clear()
                    self._reader = None
                for sub in everyone:
                    sub._fail(exc)
                return
            self._hand(jobs, streams, answer)

    def _hand(self, jobs: dict[str, str], read_from: dict[str, str], answer: list[Any]) -> None:
        for key, entries in answer:
            if key == self._wake_key:  # woken: the next read has the new streams
                self._wake_seen = entries[-1][0]
                continue
            start = _position(read_from[key])
            with self._lock:
                # a follower that joined during the read with an older position gets its events
                # from the next read, which starts there: handing it these would skip the gap
                subs = [sub for sub in self._by_job.get(jobs[key], ()) if _position(sub.after) >= start]
            for event_id, fields in entries:
                position = _position(event_id)
                for sub in subs:
                    if position > _position(sub.after):
                        sub._hand((event_id, fields["type"], fields["job"]))

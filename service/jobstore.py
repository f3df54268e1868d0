"""The job store: one JSON record per job in Redis, indexed for listing.

Keys (all under one prefix, so one Redis can serve several deployments):

- ``job:{id}``                       the job record (JSON), O(1) to read
- ``jobs``                           every job id, newest first
- ``jobs:state:{state}``, ``jobs:kind:{kind}``, ``jobs:kind:{kind}:state:{state}``  the filters

Job ids are UUIDv7, so their text order is their creation order: the indexes are sorted sets
with score 0 read with ``ZREVRANGEBYLEX``, and a page costs O(log n + page size) whatever the
size of the store. The cursor is the last id of the previous page.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Iterable

import redis

KINDS = ("publish", "pull", "build")
STATES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


def new_job_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def utcnow() -> str:
    """RFC 3339 timestamp with microseconds, in UTC."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "imagepub:"):
        self.redis = client
        self.prefix = prefix

    @classmethod
    def from_config(cls, settings) -> "JobStore":
        return cls(redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30))

    # --- keys ---

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _indexes(self, kind: str, state: str) -> tuple[str, ...]:
        p = self.prefix
        return (f"{p}jobs", f"{p}jobs:state:{state}", f"{p}jobs:kind:{kind}", f"{p}jobs:kind:{kind}:state:{state}")

    def _state_indexes(self, kind: str) -> Iterable[str]:
        for state in STATES:
            yield f"{self.prefix}jobs:state:{state}"
            yield f"{self.prefix}jobs:kind:{kind}:state:{state}"

    def _index_for(self, state: str | None, kind: str | None) -> str:
        p = self.prefix
        if state and kind:
            return f"{p}jobs:kind:{kind}:state:{state}"
        if state:
            return f"{p}jobs:state:{state}"
        if kind:
            return f"{p}jobs:kind:{kind}"
        return f"{p}jobs"

    # --- records ---

    def create(self, job: dict[str, Any], pipe: redis.client.Pipeline | None = None) -> None:
        """Store a new job and index it; with ``pipe``, only queue the commands on it."""
        own = pipe is None
        pipe = pipe if pipe is not None else self.redis.pipeline()
        pipe.set(self._job_key(job["id"]), json.dumps(job, separators=(",", ":")))
        for key in self._indexes(job["kind"], job["state"]):
            pipe.zadd(key, {job["id"]: 0})
        if own:
            pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._job_key(job_id))
        return json.loads(raw) if raw else None

    def save(self, job: dict[str, Any], *, previous_state: str | None = None) -> None:
        """Write the whole record; when the state changed, move it between the state indexes."""
        job["updated_at"] = utcnow()
        pipe = self.redis.pipeline()
        pipe.set(self._job_key(job["id"]), json.dumps(job, separators=(",", ":")))
        if previous_state is not None and previous_state != job["state"]:
            for key in self._state_indexes(job["kind"]):
                pipe.zrem(key, job["id"])
            for key in self._indexes(job["kind"], job["state"])[1:]:
                if ":state:" in key:
                    pipe.zadd(key, {job["id"]: 0})
        pipe.execute()

    def list(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
        index = self._index_for(state, kind)
        upper = f"({cursor}" if cursor else "+"
        ids = self.redis.zrevrangebylex(index, upper, "-", start=0, num=limit + 1)
        more = len(ids) > limit
        ids = ids[:limit]
        if not ids:
            return [], None
        raws = self.redis.mget([self._job_key(i) for i in ids])
        jobs = [json.loads(raw) for raw in raws if raw]
        return jobs, (ids[-1] if more else None)

    def delete(self, job: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self._job_key(job["id"]))
        for key in self._indexes(job["kind"], job["state"]):
            pipe.zrem(key, job["id"])
        pipe.execute()

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # --- worker liveness ---

    def heartbeat(self, worker: str) -> None:
        self.redis.zadd(f"{self.prefix}workers", {worker: time.time()})

    def live_workers(self, max_age: float) -> list[str]:
        now = time.time()
        key = f"{self.prefix}workers"
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(key, "-inf", now - 24 * 3600)  # forget long-gone workers
        pipe.zrangebyscore(key, now - max_age, "+inf")
        return pipe.execute()[1]

"""The job store: one JSON record per job in Redis, indexed for listing, with its events.

Keys (all under one prefix, so one Redis can serve several deployments):

- ``job:{id}``                 the job record (JSON), O(1) to read
- ``job:{id}:events``          a stream of the record's snapshots, for live progress (SSE),
                               kept for an hour after the job ends
- ``job:{id}:cancel``          set when a caller cancels a running job
- ``jobs``, ``jobs:state:{state}``, ``jobs:kind:{kind}``, ``jobs:kind:{kind}:state:{state}``
                               the listing indexes, and the same under ``jobs:client:{name}``
                               for each client's own jobs
- ``idem:{client}:{sha256(key)}``  an idempotency key → ``{job id} {request hash}``
- ``delayed``                  jobs waiting for their next attempt, scored by due time
- ``webhooks``                 the webhook outbox: ended jobs whose callback is owed, scored by
                               when a dispatcher may (next) take them; ``webhooks:attempts``
                               counts each one's delivery attempts (see workers/outbox.py)
- ``workers``                  worker heartbeats

Job ids are UUIDv7, so their text order is their creation order: the indexes are sorted sets
with score 0 read with ``ZREVRANGEBYLEX``, and a page costs O(log n + page size) whatever the
size of the store. The cursor is the last id of the previous page.

A terminal state is final: the save script refuses to overwrite it, so a worker that finishes
after a caller cancelled cannot resurrect the job. Finished jobs, their events and their
idempotency keys expire after the retention period.

A finished record never changes again and is read rarely, but it is most of what the store
holds for a week: it is kept compact (``~1:`` + base64 of raw DEFLATE with a preset dictionary
of the record's own vocabulary, about a third of the JSON). Readers go through ``load_record``; a
record that does not start with ``{`` is a finished one (the save script relies on that).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
import zlib
from datetime import datetime, timezone
from typing import Any

import orjson
import redis

from .jobcache import JobCache
from .metrics import KEY as METRICS_KEY
from .metrics import Metrics, metric_field
from .queue import JOBS_QUEUE, waiting_key

KINDS = ("publish", "pull", "build", "copy")
STATES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
EVENTS_MAXLEN = 2000
# A finished job's event history (every snapshot) is kept this long for late followers and
# resumptions; afterwards its events endpoint replays the record itself. The record lives for
# the whole retention period: the history would be most of a finished job's memory.
EVENTS_AFTER_END_SECONDS = 3600
# A worker whose heartbeat (every 10 s) is older than this is not counted as alive.
WORKER_HEARTBEAT_MAX_AGE = 30.0

# KEYS: job, events, idempotency key (or a dummy), webhook outbox. ARGV: record, new state, kind,
# prefix, id, event type, ttl of a finished job, client, ttl of a finished job's events, the value
# to store (the record itself, or its compact form once finished), '1' when the job has a
# callback. The webhook is owed in the same step that ends the job: no path to an end, and no
# crash right after one, can forget it; and a terminal state is written once, so owed once.
_SAVE = """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if string.sub(current, 1, 1) ~= '{' then return 0 end
local state = cjson.decode(current)['state']
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
local new, kind, id = ARGV[2], ARGV[3], ARGV[5]
redis.call('SET', KEYS[1], ARGV[10])
if state ~= new then
  for _, base in ipairs({ARGV[4] .. 'jobs', ARGV[4] .. 'jobs:client:' .. ARGV[8]}) do
    redis.call('ZREM', base .. ':state:' .. state, id)
    redis.call('ZREM', base .. ':kind:' .. kind .. ':state:' .. state, id)
    redis.call('ZADD', base .. ':state:' .. new, 0, id)
    redis.call('ZADD', base .. ':kind:' .. kind .. ':state:' .. new, 0, id)
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', %d, '*', 'type', ARGV[6], 'job', ARGV[1])
if new == 'succeeded' or new == 'failed' or new == 'cancelled' then
  local ttl = tonumber(ARGV[7])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], math.min(ttl, tonumber(ARGV[9])))
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ttl) end
  if ARGV[11] == '1' then redis.call('ZADD', KEYS[4], 'NX', 0, id) end
end
return 1
""" % EVENTS_MAXLEN


# KEYS: job, events, jobs queue, idempotency key (or a dummy), the fleet's daemons hash, the
# index of queued jobs, the queue's waiting index (service/queue.py), then every index the job
# belongs to (JobStore._indexes). ARGV: record, id, metric field, queue
# message ('' for none), the idempotency key's lifetime ('' for none) and its binding
# (``{id} {request hash}``), the number of daemons the placement saw ('' for no check) and the
# one it chose ('' for none), the most jobs that may be queued ('' for no cap), the time the
# message is queued (its score in the waiting index).
# Nothing is done (0) when the key's claim lapsed and another request bound it meanwhile, nor
# (2) when the fleet is no longer the one the job was placed in (a per-process view of a second
# ago: service/fleet.py), nor (3) when the queue is at its cap. One command: the record, its
# indexes, its first event, the submission counter, the Celery message and the idempotency
# key's binding for the retention period, together or not at all.
CREATE = """
if ARGV[5] ~= '' then
  local bound = redis.call('GET', KEYS[4])
  if bound and bound ~= ARGV[6] then return 0 end
end
if ARGV[7] ~= '' then
  if tostring(redis.call('HLEN', KEYS[5])) ~= ARGV[7] then return 2 end
  if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[5], ARGV[8]) == 0 then return 2 end
end
if ARGV[9] ~= '' and redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[9]) then return 3 end
redis.call('SET', KEYS[1], ARGV[1])
for i = 8, #KEYS do
  redis.call('ZADD', KEYS[i], 0, ARGV[2])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', %d, '*', 'type', 'state', 'job', ARGV[1])
redis.call('HINCRBY', '%s', ARGV[3], 1)
if ARGV[4] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('ZADD', KEYS[7], ARGV[10], ARGV[2])
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[6], 'EX', tonumber(ARGV[5])) end
return 1
""" % (EVENTS_MAXLEN, METRICS_KEY)


# The webhook outbox (KEYS: outbox, attempts). Redis' clock is the only clock: every worker
# compares due times with the same one.
# Claim: ARGV: at most this many, lease seconds. Each due entry is leased (its score moved to now +
# lease, so no other dispatcher takes it meanwhile, and it is due again if this one dies) and its
# attempts counted. Returns id, lease token (the new score, as Redis prints it), attempt, ...
_CLAIM_WEBHOOKS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
  table.insert(claimed, id)
  table.insert(claimed, redis.call('ZSCORE', KEYS[1], id))
  table.insert(claimed, redis.call('HINCRBY', KEYS[2], id, 1))
end
return claimed
"""

# Settle a claimed entry: ARGV: id, lease token, '' to forget it (delivered, refused, out of
# attempts) or the seconds until its next attempt. Only while the lease is still this claim's.
_SETTLE_WEBHOOK = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[1])
end
return 1
"""


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


def epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _dumps(job: dict[str, Any]) -> str:
    return orjson.dumps(job).decode()  # compact, as json.dumps with separators=(",", ":"), and faster


# The preset dictionary of compact records, version 1: what every record repeats (field names,
# states, the usual values), most frequent last, where DEFLATE reaches it with the shortest
# distances. Never edit it: records written with it live for the whole retention period. To
# change it, add version 2 beside it and keep reading version 1.
_COMPACT_V1 = "~1:"
_ZDICT_V1 = (
    '"kind":"pull","request":{"registry":"","repository":"","tag":"latest"},"result":{"layers":['
    '{"id":"","status":"pulled","current":null,"total":null}],"reference":"","digest":"sha256:",'
    '"image_id":"sha256:"},"kind":"build","dockerfile":"Dockerfile","build_args":{},'
    '"build":{"image_id":"sha256:","log":["Step 1/2 : FROM scratch\\n"," ---> ",'
    '"Successfully built "],"log_truncated":false},'
    '"state":"cancelled","error":{"code":"cancelled","message":"cancelled before it ran"},'
    '"state":"failed","error":{"code":"","message":""},"last_error":{"code":"","message":""},'
    '"idempotency_key":"","callback_url":"https://",'
    '{"id":"","status":"pushed","current":null,"total":null},'
    '{"id":"","status":"mounted","current":null,"total":null},'
    '{"id":"","status":"exists","current":null,"total":null}],"repository_created":false}],'
    '"client":"","source_image_id":"sha256:'
    '{"id":"","kind":"publish","state":"succeeded","created_at":"20","updated_at":"20",'
    '"started_at":"20","finished_at":"20","attempts":1,"next_attempt_at":null,'
    '"request":{"source":"","targets":[{"registry":"","repository":"","tags":["latest"]}],'
    '"create_repository":false,"callback_url":null},"error":null,"last_error":null,'
    '"targets":[{"registry":"","repository":"","tags":["latest"],"state":"succeeded",'
    '"references":[""],"digest":"sha256:","size":,"layers":['
).encode()


def _compact(record: str) -> str:
    """A finished record's compact form (see the module docstring)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_ZDICT_V1)
    return _COMPACT_V1 + base64.b64encode(deflate.compress(record.encode()) + deflate.flush()).decode("ascii")


def load_record(raw: str) -> dict[str, Any]:
    """A stored record, whichever form it is in."""
    if raw.startswith(_COMPACT_V1):
        inflate = zlib.decompressobj(-15, zdict=_ZDICT_V1)
        return orjson.loads(inflate.decompress(base64.b64decode(raw[len(_COMPACT_V1):])) + inflate.flush())
    return orjson.loads(raw)


# Every wait on Redis is bounded: a connect within 5 s, a reply within 30 s (the longest blocking
# read, an event stream's XREAD, waits 15 s), so a Redis that hangs (a full disk, a shutdown in
# progress, a half-open connection) fails a request with 503 instead of holding it for ever.
REDIS_OPTIONS = {"health_check_interval": 30, "socket_connect_timeout": 5, "socket_timeout": 30, "socket_keepalive": True}


def client_like(client: redis.Redis, **overrides: Any) -> redis.Redis:
    """A client of the same server, with connections of its own (a pool of its own) and
    ``overrides`` of its options (``decode_responses``, say)."""
    pool = client.connection_pool
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, **overrides}))


class FleetChanged(Exception):
    """The fleet changed since the per-process view a job was placed with: place it again."""


class QueueFull(Exception):
    """As many jobs as the cap allows are waiting already: nothing was stored."""


def created(answer: int, record: str) -> str | None:
    """What CREATE's answer means: the record stored, None (an idempotency claim lapsed),
    FleetChanged or QueueFull."""
    if answer == 2:
        raise FleetChanged()
    if answer == 3:
        raise QueueFull()
    return record if answer == 1 else None


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "imagepub:", *, retention_seconds: int = 7 * 86400):
        self.redis = client
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.metrics = Metrics(client)
        self._binary_client: redis.Redis | None = None
        self._depth, self._depth_read_at = 0, float("-inf")
        # The API's reads of job records go through a cache Redis keeps current (service/jobcache.py);
        # the workers', which write them, do not.
        self.cache: JobCache | None = None
        self._save = client.register_script(_SAVE)
        self._create = client.register_script(CREATE)
        self._claim_webhooks = client.register_script(_CLAIM_WEBHOOKS)
        self._settle_webhook = client.register_script(_SETTLE_WEBHOOK)

    @classmethod
    def from_config(cls, settings) -> "JobStore":
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, **REDIS_OPTIONS)
        return cls(client, retention_seconds=settings.retention_seconds)

    # --- keys ---

    @property
    def job_prefix(self) -> str:
        """What every key of a job starts with: its record, events and cancel mark."""
        return f"{self.prefix}job:"

    def job_key(self, job_id: str) -> str:
        """Where a job's record is."""
        return f"{self.job_prefix}{job_id}"

    def events_key(self, job_id: str) -> str:
        """The stream of a job's snapshots (service/followers.py reads many at once)."""
        return f"{self.job_prefix}{job_id}:events"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:cancel"

    def job_lock_key(self, job_id: str) -> str:
        """The lock a running job's worker holds (and keeps alive); the supervisor takes a
        running job without one for an orphan."""
        return f"{self.prefix}lock:job:{job_id}"

    def requeued_key(self, job_id: str) -> str:
        """Set while a job whose worker died waits, re-enqueued, for a worker to take it: the
        supervisor enqueues it once, not at every scan (its daemon may be down for long)."""
        return f"{self.job_prefix}{job_id}:requeued"

    def repository_lock_key(self, repository_ref: str) -> str:
        """The lease a job holds while it tags and pushes to ``host/repository`` (one at a time,
        fleet-wide: the daemon's tags are shared state)."""
        return f"{self.prefix}lock:ref:{repository_ref}"

    def idempotency_key(self, client: str, key: str) -> str:
        return f"{self.prefix}idem:{client}:{hashlib.sha256(key.encode()).hexdigest()}"

    def index_key(self, *, client: str | None = None, state: str | None = None, kind: str | None = None) -> str:
        key = f"{self.prefix}jobs" + (f":client:{client}" if client is not None else "")
        if kind:
            key += f":kind:{kind}"
        if state:
            key += f":state:{state}"
        return key

    def _indexes(self, job: dict[str, Any], state: str | None = None) -> list[str]:
        """Every index a job belongs to (with ``state``, when given, in place of its own)."""
        state = state or job["state"]
        return [
            self.index_key(client=owner, state=s, kind=k)
            for owner in (None, job.get("client") or "")
            for s in (None, state)
            for k in (None, job["kind"])
        ]

    # --- records ---

    def create(self, job: dict[str, Any], message: str | None = None, idempotency: tuple[str, int] | None = None,
               queue: str = JOBS_QUEUE, fleet: tuple[str, int, str] | None = None, max_queued: int | None = None) -> str | None:
        """Store a new job, index it, start its event stream and (with ``message``) queue it:
        one atomic script, one round trip (``message`` goes on ``queue``). A job with an ``idempotency_key`` (claimed for a
        moment by ``claim_idempotency_key``) binds it with ``idempotency`` = (request hash,
        lifetime in seconds). With ``fleet`` = (the daemons hash, how many daemons the placement
        saw, the one it chose or ''), nothing is stored unless the fleet is still so: raises
        FleetChanged. With ``max_queued``, nothing is stored when that many jobs are queued
        already, counted in the same step (exact, however many submit at once): raises
        QueueFull. Returns the stored JSON; None (nothing stored) when the claim had lapsed and
        another request holds the key now."""
        keys, args, record = self.create_call(job, message, idempotency, queue, fleet, max_queued)
        return created(self._create(keys=keys, args=args), record)

    def create_call(self, job: dict[str, Any], message: str | None = None, idempotency: tuple[str, int] | None = None,
                    queue: str = JOBS_QUEUE, fleet: tuple[str, int, str] | None = None,
                    max_queued: int | None = None) -> tuple[list[str], list[str], str]:
        """The keys and arguments of ``CREATE`` for :meth:`create` (and for the audit trail's
        create-and-record script, service/audit.py), and the record it stores."""
        record = _dumps(job)
        idem = self.idempotency_key(job.get("client") or "", job["idempotency_key"]) if job.get("idempotency_key") else None
        request_hash, ttl = idempotency if idem and idempotency else ("", "")
        fleet_key, daemons, chosen = fleet if fleet else (f"{self.prefix}fleet:daemons", "", "")
        keys = [self.job_key(job["id"]), self.events_key(job["id"]), queue, idem or self.job_key(job["id"]) + ":no-idem",
                fleet_key, self.index_key(state="queued"), waiting_key(queue), *self._indexes(job)]
        args = [record, job["id"], metric_field("imagepub_jobs_submitted", {"kind": job["kind"]}), message or "",
                str(ttl), f"{job['id']} {request_hash}", str(daemons), chosen, "" if max_queued is None else str(max_queued),
                f"{time.time():.6f}"]
        return keys, args, record

    def _count_finished(self, job: dict[str, Any], pipe=None) -> None:
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        code = (job.get("error") or {}).get("code", "") if job["state"] != "succeeded" else ""
        self.metrics.incr("imagepub_jobs_finished", pipe=pipe, kind=job["kind"], state=job["state"], code=code)
        started, finished = epoch(job.get("created_at")), epoch(job.get("finished_at"))
        if started is not None and finished is not None:
            self.metrics.observe("imagepub_job_duration_seconds", max(0.0, finished - started), pipe=pipe, kind=job["kind"], state=job["state"])
        if own:
            pipe.execute()

    def get(self, job_id: str) -> dict[str, Any] | None:
        key = self.job_key(job_id)
        raw = self.redis.get(key) if self.cache is None else self.cache.get(key, lambda: self.redis.get(key))
        return load_record(raw) if raw else None

    def save(self, job: dict[str, Any], *, event: str = "progress") -> bool:
        """Write the whole record and append it to the job's events; move it between the state
        indexes when its state changed. False when the stored job had already ended (cancelled
        by a caller, say) or expired: nothing was written."""
        job["updated_at"] = utcnow()
        idem = self.idempotency_key(job.get("client") or "", job["idempotency_key"]) if job.get("idempotency_key") else self.job_key(job["id"]) + ":no-idem"
        record = _dumps(job)
        result = self._save(
            keys=[self.job_key(job["id"]), self.events_key(job["id"]), idem, self.webhooks_key],
            args=[record, job["state"], job["kind"], self.prefix, job["id"], event, self.retention_seconds,
                  job.get("client") or "", EVENTS_AFTER_END_SECONDS,
                  _compact(record) if job["state"] in TERMINAL_STATES else record,
                  "1" if job["request"].get("callback_url") else ""],
        )
        if result == 1 and job["state"] in TERMINAL_STATES:
            self._count_finished(job)
        return result == 1

    def list(
        self, *, client: str | None = None, state: str | None = None, kind: str | None = None, limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of jobs (of one client, or of all), newest first, and the cursor of the next
        page (None on the last)."""
        index = self.index_key(client=client, state=state, kind=kind)
        jobs: list[dict[str, Any]] = []
        upper = f"({cursor}" if cursor else "+"
        while True:
            wanted = limit + 1 - len(jobs)
            ids = self.redis.zrevrangebylex(index, upper, "-", start=0, num=wanted)
            if not ids:
                return jobs, None
            raws = self.redis.mget([self.job_key(i) for i in ids])
            expired = [i for i, raw in zip(ids, raws) if raw is None]
            if expired:  # finished jobs past retention: forget them in the indexes
                self._unindex(expired, client)
            for job_id, raw in zip(ids, raws):
                if raw is None:
                    continue
                if len(jobs) == limit:
                    return jobs, jobs[-1]["id"]
                jobs.append(load_record(raw))
            if len(ids) < wanted:
                return jobs, None
            upper = f"({ids[-1]}"

    def _unindex(self, ids: list[str], client: str | None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for owner in {None, client}:
            pipe.zrem(self.index_key(client=owner), *ids)
            for state in STATES:
                pipe.zrem(self.index_key(client=owner, state=state), *ids)
            for kind in KINDS:
                pipe.zrem(self.index_key(client=owner, kind=kind), *ids)
                for state in STATES:
                    pipe.zrem(self.index_key(client=owner, state=state, kind=kind), *ids)
        pipe.execute()

    def delete(self, job: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self.job_key(job["id"]), self.events_key(job["id"]))
        for key in self._indexes(job):
            pipe.zrem(key, job["id"])
        pipe.execute()

    def running_ids(self) -> list[str]:
        return self.redis.zrange(self.index_key(state="running"), 0, -1)

    # --- build contexts, from the API to whichever worker runs the build ---

    def _context_key(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:context"

    def put_context(self, job_id: str, data: bytes) -> None:
        # bytes through a client that decodes replies: written here, read back raw by workers
        self.redis.set(self._context_key(job_id), data, ex=self.retention_seconds)

    def get_context(self, job_id: str) -> bytes | None:
        return self._binary().get(self._context_key(job_id))

    def _binary(self) -> redis.Redis:
        """A client on the same server that returns bytes (the main one decodes to str)."""
        if self._binary_client is None:
            self._binary_client = client_like(self.redis, decode_responses=False)
        return self._binary_client

    def drop_context(self, job_id: str) -> None:
        self.redis.delete(self._context_key(job_id))

    def queue_depth(self, max_age: float = 0.1) -> int:
        """Jobs waiting for a worker (on whichever queue: the state index counts them all), read at most
        every ``max_age`` seconds per process: a cap needs no exact count on every request."""
        now = time.monotonic()
        if now - self._depth_read_at > max_age:
            # every queue (the shared one, the daemons', each daemon's) holds only queued jobs
            self._depth, self._depth_read_at = self.redis.zcard(self.index_key(state="queued")), now
        return self._depth

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # --- idempotency ---

    def claim_idempotency_key(self, client: str, key: str, job_id: str, request_hash: str, ttl: float) -> tuple[str, str] | None:
        """Bind ``key`` to a new job for ``ttl`` seconds — a short lease: ``create`` binds it for
        the retention period with the job, so a claim whose API process died before storing the
        job lapses soon instead of answering "in progress" for days. When the key is bound
        already: its (job id, request hash)."""
        name = self.idempotency_key(client, key)
        if self.redis.set(name, f"{job_id} {request_hash}", nx=True, px=max(1, int(ttl * 1000))):
            return None
        value = self.redis.get(name)
        if value is None:  # expired between the two calls: claim it again
            return self.claim_idempotency_key(client, key, job_id, request_hash, ttl)
        bound_id, _, bound_hash = value.partition(" ")
        return bound_id, bound_hash

    def release_idempotency_key(self, client: str, key: str) -> None:
        self.redis.delete(self.idempotency_key(client, key))

    # --- cancellation ---

    def cancel(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        """Cancel a job: ``("cancelled", job)`` when it had not started (it never will run),
        ``("requested", job)`` when it is running (its worker stops it), ``("finished", job)``
        when it had already ended, ``("missing", None)``."""
        key = self.job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return "missing", None
                    job = load_record(raw)
                    if job["state"] in TERMINAL_STATES:
                        pipe.unwatch()
                        return "finished", job
                    pipe.multi()
                    pipe.set(self.cancel_key(job_id), "1", ex=self.retention_seconds)
                    if job["state"] == "running":
                        pipe.execute()
                        return "requested", job
                    previous = job["state"]
                    job.update(state="cancelled", finished_at=utcnow(), updated_at=utcnow(),
                               error={"code": "cancelled", "message": "cancelled before it ran"}, next_attempt_at=None)
                    record = _dumps(job)
                    pipe.set(key, _compact(record), ex=self.retention_seconds)
                    stale, fresh = set(self._indexes(job, previous)), set(self._indexes(job, "cancelled"))
                    for index in stale - fresh:
                        pipe.zrem(index, job_id)
                    for index in fresh - stale:
                        pipe.zadd(index, {job_id: 0})
                    pipe.zrem(self.delayed_key, job_id)
                    if job["request"].get("callback_url"):  # owed with the end, as in the save script
                        pipe.zadd(self.webhooks_key, {job_id: 0}, nx=True)
                    pipe.xadd(self.events_key(job_id), {"type": "state", "job": record}, maxlen=EVENTS_MAXLEN, approximate=True)
                    pipe.expire(self.events_key(job_id), min(self.retention_seconds, EVENTS_AFTER_END_SECONDS))
                    self._count_finished(job, pipe)
                    pipe.execute()
                    return "cancelled", job
                except redis.WatchError:
                    continue

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    # --- events ---

    def latest_event(self, job_id: str) -> tuple[str, str, str] | None:
        """The newest event (event id, type, job JSON), if any."""
        entries = self.redis.xrevrange(self.events_key(job_id), count=1)
        if not entries:
            return None
        event_id, fields = entries[0]
        return event_id, fields["type"], fields["job"]

    def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 100) -> list[tuple[str, str, str]]:
        """Events after ``after``: (event id, type, job JSON); waits up to ``block_ms`` for one."""
        answer = self.redis.xread({self.events_key(job_id): after}, count=count, block=block_ms)
        return [(event_id, fields["type"], fields["job"]) for _, entries in answer for event_id, fields in entries]

    # --- retries waiting for their time ---

    @property
    def delayed_key(self) -> str:
        return f"{self.prefix}delayed"

    def schedule(self, job_id: str, due: float) -> None:
        self.redis.zadd(self.delayed_key, {job_id: due})

    def due(self, now: float, limit: int = 100) -> list[str]:
        return self.redis.zrangebyscore(self.delayed_key, "-inf", now, start=0, num=limit)

    def unschedule(self, job_id: str) -> None:
        self.redis.zrem(self.delayed_key, job_id)

    def is_scheduled(self, job_id: str) -> bool:
        return self.redis.zscore(self.delayed_key, job_id) is not None

    # --- the webhook outbox (the save and cancel steps fill it; workers/outbox.py empties it) ---

    @property
    def webhooks_key(self) -> str:
        return f"{self.prefix}webhooks"

    def owe_webhook(self, job_id: str) -> None:
        """Owe ``job_id``'s webhook now (once: an entry already there is left as it is)."""
        self.redis.zadd(self.webhooks_key, {job_id: 0}, nx=True)

    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[tuple[str, str, int]]:
        """Up to ``limit`` due webhooks, each leased for ``lease_seconds``: (job id, lease token,
        attempt number)."""
        flat = self._claim_webhooks(keys=[self.webhooks_key, self.webhooks_key + ":attempts"], args=[limit, lease_seconds])
        return [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]

    def settle_webhook(self, job_id: str, token: str, retry_in: float | None = None) -> bool:
        """Forget a claimed webhook (``retry_in`` None) or make it due again in ``retry_in``
        seconds. False when the lease had passed to another claim (which then settles it)."""
        args = [job_id, token, "" if retry_in is None else repr(float(retry_in))]
        return self._settle_webhook(keys=[self.webhooks_key, self.webhooks_key + ":attempts"], args=args) == 1

    def webhooks_pending(self) -> int:
        return self.redis.zcard(self.webhooks_key)

    # --- worker liveness ---

    def live_workers(self, max_age: float = WORKER_HEARTBEAT_MAX_AGE) -> list[str]:
        now = time.time()
        key = f"{self.prefix}workers"
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(key, "-inf", now - 24 * 3600)  # forget long-gone workers
        pipe.zrangebyscore(key, now - max_age, "+inf")
        return pipe.execute()[1]

"""The audit trail: who asked for what, who was refused, and which digest went where.

One entry per accepted or refused submission (publish, pull, build, copy, cancel, repository
create: the API records them, ``service/views_audit.py``) and per tag a worker wrote and
verified, with the digest the registry serves, or failed to write (``push_tag``, ``copy_tag``:
``workers/publish.py``, ``workers/copy.py``). An entry names the client, the request id, the
job and its attempt, the registry, repository and tag, the outcome (``accepted``, ``refused``,
``written``, ``failed``) and the error's code; never a request body, a token or a credential.

Kept apart from jobs, in one Redis stream whose entry ids are its time (Redis' clock, ms):

- ``audit``         the entries: ``b`` the body (compact JSON, short keys), ``p`` the previous
                    entry's hash (32 bytes), ``n`` the entry's number (from 1, no gaps)
- ``audit:head``    the newest entry's hash, number and id (and when retention is next checked)
- ``audit:anchor``  the oldest kept entry's id, number and ``p``, once retention has trimmed

Tamper-evident: an entry's hash is SHA-256 of ``p || sha256(b) || "<id> <n>"`` (:func:`link`),
and the next entry stores it as its ``p``; one Lua script reads the head and appends
(``service/audit_lua.py``), so concurrent API processes and workers never fork the chain. A
stream entry cannot be changed in place, so an edit means rewriting the stream; :meth:`verify`
recomputes every link from the anchor to the head and names the first entry that does not fit.
Someone who can write to Redis could rewrite the whole chain consistently: the JSON log line
every entry also becomes (logger ``audit``, with its ``hash``), shipped elsewhere, is the
witness against that.

Retention is the trail's own (``audit.retention_days``, 400 by default): the append script trims
entries older than that about once an hour, and records the new oldest entry as the anchor, so
the chain stays verifiable. Job retention and job deletion never touch it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator

import orjson
import redis

from . import audit_lua
from .errors import ImagepubError
from .jobstore import CREATE, REDIS_OPTIONS, client_like, created

log = logging.getLogger(__name__)
# The trail's own logger: every entry as one JSON line for a log shipper to keep. Not a debug
# aid, so it speaks at INFO whatever `log_level` says.
trail = logging.getLogger("audit")
trail.setLevel(logging.INFO)

GENESIS = bytes(32)  # the first entry's `p`
DECISIONS = ("publish", "pull", "build", "copy", "cancel", "create_repository")
WRITES = ("push_tag", "copy_tag")
ACTIONS = DECISIONS + WRITES
OUTCOMES = ("accepted", "refused", "written", "failed")
# An entry's fields as the API names them, and the keys of the stored body (memory: most of
# an entry is its values, so the names are kept to a letter or two).
_SHORT = {
    "action": "a", "outcome": "o", "status": "s", "code": "e", "reason": "w", "client": "c",
    "request_id": "q", "job_id": "j", "attempt": "t", "registry": "g", "repository": "r", "tag": "tg",
    "digest": "d", "source": "src", "targets": "T",
}
_LONG = {short: name for name, short in _SHORT.items()}
# A stream id as a cursor: 19 digits always fit the unsigned 64 bits of each part (and every id
# Redis makes has 13 and a few)
STREAM_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}", re.ASCII)
RETENTION_CHECK_SECONDS = 3600
# A page reads at most this many entries, matching or not, so that a filter nothing matches
# costs a bounded time; the page is then short (even empty) and its cursor goes on from there.
SCAN_LIMIT = 10_000
_BATCH = 500


# --- entries ------------------------------------------------------------------------------


def encode(entry: dict[str, Any]) -> bytes:
    """The stored body of ``entry`` (API field names): compact JSON with short keys, absent and
    null fields left out, targets as ``[registry, repository, tags]``."""
    body = {_SHORT[name]: value for name, value in entry.items() if value is not None}
    if "T" in body:
        body["T"] = [[t["registry"], t["repository"], t.get("tags") or []] for t in body["T"]]
    return json.dumps(body, separators=(",", ":")).encode()


def decode(body: bytes) -> dict[str, Any]:
    """A stored body as API fields (only those it has)."""
    stored = orjson.loads(body)
    entry = {_LONG[key]: value for key, value in stored.items()}
    if "targets" in entry:
        entry["targets"] = [{"registry": g, "repository": r, "tags": tags} for g, r, tags in entry["targets"]]
    return entry


def link(prev: bytes, body: bytes, entry_id: str, seq: int) -> bytes:
    """An entry's hash, as the append script computes it (and the next entry stores)."""
    return hashlib.sha256(prev + hashlib.sha256(body).digest() + f"{entry_id} {seq}".encode()).digest()


def is_stream_id(text: str) -> bool:
    return bool(STREAM_ID.fullmatch(text))


def time_of(entry_id: str) -> str:
    """The time an entry was appended (its stream id: Redis' clock), RFC 3339 in UTC."""
    ms = int(entry_id.split("-", 1)[0])
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _ms(moment: datetime) -> int:
    """A stream id's time part: milliseconds since 1970, never below (ids have no sign)."""
    return max(0, int(moment.timestamp() * 1000))


def _log_line(entry: dict[str, Any]) -> None:
    """The entry as its JSON log line (logger ``audit``), with its job's id beside it as every
    line about a job has it: an accepted submission's only line in the API's log."""
    trail.info("audit", extra={"audit": entry, **({"job_id": entry["job_id"]} if entry.get("job_id") else {})})


def shown(entry_id: str, seq: int, prev: bytes, hash_: bytes, entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as the API, the export and the log line show it: every field, null when absent."""
    out: dict[str, Any] = {"id": entry_id, "seq": seq, "time": time_of(entry_id)}
    out.update({name: entry.get(name) for name in _SHORT})
    out.update(prev=prev.hex(), hash=hash_.hex())
    return out


def write(action: str, job: dict[str, Any], record: dict[str, Any], tag: str | None, *,
          digest: str | None = None, error: BaseException | None = None) -> dict[str, Any]:
    """A worker's entry for one tag of a target (``record``, one of ``job["targets"]``):
    ``written`` with the digest the registry serves, or ``failed`` with the error's code."""
    entry = {"action": action, "outcome": "written" if error is None else "failed", "client": job.get("client"),
             "job_id": job["id"], "attempt": job.get("attempts"), "registry": record["registry"],
             "repository": record["repository"], "tag": tag, "digest": digest}
    if error is not None:
        entry["code"] = error.code if isinstance(error, ImagepubError) else "internal_error"
    return entry


@dataclass(frozen=True)
class Query:
    """What ``GET /v1/audit`` filters by; ``repository`` is a glob pattern (``team/*``)."""

    client: str | None = None
    registry: str | None = None
    repository: str | None = None
    digest: str | None = None
    action: str | None = None
    outcome: str | None = None
    job: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        for name, field in (("client", "client"), ("action", "action"), ("outcome", "outcome"), ("job", "job_id"),
                            ("digest", "digest")):
            wanted = getattr(self, name)
            if wanted is not None and entry.get(field) != wanted:
                return False
        places = [(entry.get("registry"), entry.get("repository"))]
        places += [(t["registry"], t["repository"]) for t in entry.get("targets") or []]
        if self.registry is not None and not any(registry == self.registry for registry, _ in places):
            return False
        return self.repository is None or any(repo and fnmatchcase(repo, self.repository) for _, repo in places)


@dataclass(frozen=True)
class Verdict:
    """What :meth:`AuditLog.verify` found: the chain holds (``ok``), or where it breaks."""

    ok: bool
    entries: int
    oldest: str | None = None
    newest: str | None = None
    entry: str | None = None  # the entry the break is laid to
    problem: str | None = None

    def __str__(self) -> str:
        if not self.ok:
            return f"audit chain broken at entry {self.entry}: {self.problem}"
        if not self.entries:
            return "audit chain intact: no entries"
        return f"audit chain intact: {self.entries} entries, {self.oldest} to {self.newest}"


# --- the store ------------------------------------------------------------------------------


class AuditLog:
    def __init__(self, client: redis.Redis, prefix: str = "imagepub:", *, retention_seconds: int = 400 * 86400,
                 check_every_seconds: float = RETENTION_CHECK_SECONDS):
        self.redis = client  # replies as bytes: hashes are stored as they are
        self.key, self.head_key, self.anchor_key = f"{prefix}audit", f"{prefix}audit:head", f"{prefix}audit:anchor"
        self.retention_ms = int(retention_seconds * 1000)
        self.check_every_ms = int(check_every_seconds * 1000)
        self._append = client.register_script(audit_lua.APPEND)
        self._create_and_append = client.register_script(audit_lua.create_and_append(CREATE))

    @classmethod
    def from_config(cls, settings, prefix: str = "imagepub:") -> "AuditLog":
        client = redis.Redis.from_url(settings.redis_url, **REDIS_OPTIONS)
        return cls(client, prefix, retention_seconds=settings.audit.retention_days * 86400)

    # --- writing ---

    def record(self, *entries: dict[str, Any]) -> list[dict[str, Any]]:
        """Append ``entries`` (in one step) and log each; what was appended, as shown. Redis
        trouble is logged, never raised: the caller's request or job goes on, and the log line
        (``"stored": false``) still carries the entry."""
        bodies, args = self._arguments(entries)
        try:
            flat = self._append(keys=[self.key, self.head_key, self.anchor_key], args=args)
        except redis.RedisError as exc:
            log.error("audit entries not stored: %s", exc.__class__.__name__)
            for entry in entries:
                _log_line({**{name: entry.get(name) for name in _SHORT}, "stored": False})
            return []
        return self._appended(bodies, flat)

    def create_job(self, store, entry: dict[str, Any], **create: Any) -> str | None:
        """``store.create(**create)`` and, when it stored the job, the ``entry`` that records
        its acceptance, in one script (one round trip: see audit_lua.create_and_append). The
        stored record or None as ``create`` answers, and FleetChanged as it raises it. Redis trouble is raised: nothing was
        written, and the request is refused (its refusal is recorded as any other)."""
        keys, args, record = store.create_call(**create)
        bodies, audit_args = self._arguments((entry,))
        flat = self._create_and_append(keys=[*keys, self.key, self.head_key, self.anchor_key],
                                       args=[len(keys), len(args), *args, *audit_args])
        if len(flat) == 1:  # not created: why (jobstore.created)
            return created(flat[0], record)
        self._appended(bodies, flat)
        return record

    def _arguments(self, entries: Iterable[dict[str, Any]]) -> tuple[list[bytes], list[Any]]:
        bodies = [encode(entry) for entry in entries]
        args: list[Any] = [self.retention_ms, self.check_every_ms]
        for body in bodies:
            args += [body, hashlib.sha256(body).digest()]
        return bodies, args

    def _appended(self, bodies: list[bytes], flat: list[Any]) -> list[dict[str, Any]]:
        out = []
        for i, body in enumerate(bodies):
            entry_id, seq, prev, hash_ = flat[4 * i: 4 * i + 4]
            out.append(shown(entry_id.decode(), int(seq), prev, hash_, decode(body)))
            _log_line(out[-1])
        return out

    # --- reading ---

    def page(self, query: Query, limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Entries matching ``query``, newest first, and the cursor of the next page (None at
        the end). A page reads at most SCAN_LIMIT entries: it may hold fewer than ``limit``."""
        if cursor is not None:
            ms, seq = (int(part) for part in cursor.split("-"))
            if ms == seq == 0:  # nothing comes before the first possible id, however it is written
                return [], None
            cursor = f"{ms}-{seq}"
        upper = f"({cursor}" if cursor else (str(_ms(query.until)) if query.until else "+")
        lower = str(_ms(query.since)) if query.since else "-"
        found: list[dict[str, Any]] = []
        scanned = 0
        while True:
            batch = self.redis.xrevrange(self.key, upper, lower, count=_BATCH)
            for raw_id, fields in batch:
                scanned += 1
                entry_id, entry = raw_id.decode(), decode(fields[b"b"])
                if query.matches(entry):
                    seq = int(fields[b"n"])
                    found.append(shown(entry_id, seq, fields[b"p"], link(fields[b"p"], fields[b"b"], entry_id, seq), entry))
                if len(found) == limit or scanned >= SCAN_LIMIT:
                    return found, entry_id
            if len(batch) < _BATCH:
                return found, None
            upper = f"({batch[-1][0].decode()}"

    def _scan(self, start: str = "-", end: str = "+") -> Iterator[tuple[str, dict[bytes, bytes]]]:
        """Stored entries from ``start`` to ``end`` (stream ids or ms), oldest first."""
        while True:
            batch = self.redis.xrange(self.key, start, end, count=_BATCH)
            for raw_id, fields in batch:
                yield raw_id.decode(), fields
            if len(batch) < _BATCH:
                return
            start = f"({batch[-1][0].decode()}"

    def export(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[dict[str, Any]]:
        """Every entry from ``since`` to ``until``, oldest first, as shown (with its hash)."""
        start = str(_ms(since)) if since else "-"
        end = str(_ms(until)) if until else "+"
        for entry_id, fields in self._scan(start, end):
            seq, prev, body = int(fields[b"n"]), fields[b"p"], fields[b"b"]
            yield shown(entry_id, seq, prev, link(prev, body, entry_id, seq), decode(body))

    # --- checking ---

    def verify(self) -> Verdict:
        """Recompute the chain from the anchor (or the first entry) to the head: the first entry
        that is missing, unreadable or does not hash to what its successor holds is named."""
        with self.redis.pipeline(transaction=True) as pipe:
            head, anchor = pipe.hgetall(self.head_key).hgetall(self.anchor_key).execute()
        expected_prev, expected_seq = (anchor[b"p"], int(anchor[b"n"])) if anchor else (GENESIS, 1)
        oldest = previous = None
        count = 0

        def broken(entry: str | None, problem: str) -> Verdict:
            return Verdict(False, count, oldest, previous, entry, problem)

        for entry_id, fields in self._scan("-", head[b"id"].decode() if head else "+"):
            if oldest is None:
                oldest = entry_id
                if anchor and entry_id != anchor[b"id"].decode():
                    return broken(entry_id, f"the oldest entry is {entry_id}, but retention last kept {anchor[b'id'].decode()} "
                                            f"(#{expected_seq}) as the oldest: entries before {entry_id} were removed")
            try:
                seq, prev, body = int(fields[b"n"]), fields[b"p"], fields[b"b"]
                decode(body)
            except (KeyError, ValueError, TypeError):
                return broken(entry_id, f"entry {entry_id} is unreadable (its fields were changed)")
            if seq != expected_seq:
                after = f" after entry {previous}" if previous else ""
                if seq > expected_seq and prev != expected_prev:  # the link skips too: entries were taken out
                    return broken(entry_id, f"{_missing(expected_seq, seq - 1)}{after}, before entry {entry_id} (#{seq})")
                return broken(entry_id, f"entry {entry_id} is numbered #{seq}, where #{expected_seq} was due{after}")
            if prev != expected_prev:
                if previous is None:
                    return broken(entry_id, f"entry {entry_id} (#{seq}) does not link to what came before it "
                                            f"(it holds {prev.hex()[:16]}…, the chain's start is {expected_prev.hex()[:16]}…)")
                return broken(previous, f"entry {previous} (#{seq - 1}) was altered: its content hashes to "
                                        f"{expected_prev.hex()[:16]}…, but entry {entry_id} (#{seq}) holds {prev.hex()[:16]}… for it")
            expected_prev, expected_seq, previous = link(prev, body, entry_id, seq), seq + 1, entry_id
            count += 1
        if not head:
            return broken(oldest, "entries without a head: the head record was removed") if count else Verdict(True, 0)
        newest_seq, newest_id = int(head[b"n"]), head[b"id"].decode()
        if newest_seq != expected_seq - 1:
            after = f"after entry {previous} (#{expected_seq - 1})" if previous else "from the start"
            return broken(newest_id, f"{_missing(expected_seq, newest_seq)} {after}: the newest entry is {newest_id} (#{newest_seq})")
        if head[b"h"] != expected_prev:
            return broken(previous, f"entry {previous} (#{newest_seq}) was altered: its content no longer hashes to the head's hash")
        return Verdict(True, count, oldest, previous)


def _missing(first: int, last: int) -> str:
    return f"entry #{first} is missing" if first == last else f"entries #{first} to #{last} are missing"


# --- where the API and the workers get theirs ---------------------------------------------------


_logs: "weakref.WeakKeyDictionary[Any, AuditLog]" = weakref.WeakKeyDictionary()


def for_store(store, settings) -> AuditLog:
    """The audit trail beside a job store (same Redis and prefix), one per store."""
    trail_log = _logs.get(store)
    if trail_log is None:
        client = client_like(store.redis, decode_responses=False)
        trail_log = _logs[store] = AuditLog(client, store.prefix, retention_seconds=settings.audit.retention_days * 86400)
    return trail_log


@contextlib.contextmanager
def writes(store, settings, action: str, job: dict[str, Any], record: dict[str, Any],
           tag: str | None = None) -> Iterator[Callable[[str, str], None]]:
    """Around a worker's writes to one target: ``written(tag, digest)`` for each tag written
    and verified, recorded when the block ends; when it raises, a ``failed`` entry too (for
    ``tag``, the one being written, if one is), with the error's code."""
    done: list[dict[str, Any]] = []
    try:
        yield lambda written_tag, digest: done.append(write(action, job, record, written_tag, digest=digest))
    except BaseException as exc:
        for_store(store, settings).record(*done, write(action, job, record, tag, error=exc))
        raise
    if done:
        for_store(store, settings).record(*done)

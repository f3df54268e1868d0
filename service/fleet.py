"""The fleet in Redis: which workers serve which Docker daemon, and what each daemon holds.

Many workers and many daemons share one Redis. Every worker registers itself (and its daemon:
name, Docker version) with each heartbeat; a worker with a daemon also keeps that daemon's image
index here — the names and ids of its images, rewritten whenever the daemon reports an image
event and at least every ``INDEX_MAX_AGE`` seconds (``workers/fleet.py``). The API reads both to
route a job to the daemon that holds its source, to list the fleet's images (the same answer
from every API process on every call), and to say which daemons are up. It never asks a
daemon itself.

Keys (under the store's prefix):

- ``fleet:workers``                  worker id → JSON (hostname, pid, daemon, concurrency, …)
- ``fleet:daemons``                  daemon name → JSON (name, Docker version, index refreshed at)
- ``fleet:daemon:{name}:images``     the daemon's ``docker image ls`` as JSON
- ``fleet:daemon:{name}:refs``       every name an image answers to (canonical) → image id
- ``fleet:refresh``                  when an API process last asked every daemon to re-index
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import redis

from . import sources
from .config import DAEMON_NAME  # noqa: F401 - the name's grammar, for the schemas
from .errors import Conflict, ValidationFailed
from .jobstore import WORKER_HEARTBEAT_MAX_AGE
from .queue import daemon_queue

DEFAULT_DAEMON = "default"
# Workers and daemons not heard of for this long are forgotten.
FORGET_AFTER = 24 * 3600
# How old this process' view of the fleet may be where a read per request would cost too much:
# the reason a queued job waits (GET /v1/jobs/{id}), and the placement of a publish in a fleet of
# at most one daemon (checked by the create script: see Fleet.place). The fleet endpoints, and
# placement among several daemons, read afresh.
VIEW_SECONDS = 1.0
# A daemon's index is rewritten at least this often, whatever its events say.
INDEX_MAX_AGE = 30.0


def canonical_refs(image: dict[str, Any]) -> dict[str, str]:
    """Every reference an image of ``docker image ls`` answers to, spelt canonically
    (``docker.io/library/app:1``, ``host/path@sha256:…``), → its id."""
    refs = {}
    for name in list(image.get("tags") or []) + list(image.get("digests") or []):
        parsed = sources.parse(name)
        if parsed is not None:
            refs[_key(parsed)] = image["id"]
    return refs


def _key(name: sources.ImageName) -> str:
    if name.digest:
        return f"{name.domain}/{name.path}@{name.digest}"
    return f"{name.domain}/{name.path}:{name.tag or 'latest'}"


@dataclass
class Daemon:
    name: str
    up: bool
    workers: list[dict[str, Any]] = field(default_factory=list)
    docker_version: str | None = None
    queue: str = ""
    queue_depth: int = 0
    images_refreshed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": "up" if self.up else "down", "docker_version": self.docker_version,
            "workers": self.workers, "queue": self.queue, "queue_depth": self.queue_depth,
            "images_refreshed_at": _iso(self.images_refreshed_at),
        }


def _iso(epoch: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else None


@dataclass(frozen=True)
class Placement:
    """Where a job runs, and (when read from a view that may be a second old) what the fleet
    looked like: the daemons hash, how many daemons it held, the one chosen (JobStore.create
    checks it)."""

    daemon: str
    fleet: tuple[str, int, str] | None = None


class Fleet:
    def __init__(self, client: redis.Redis, prefix: str = "imagepub:"):
        self.redis, self.prefix = client, prefix
        # the last read: when (monotonic), the workers, the daemons' records
        self._seen: tuple[float, list[dict[str, Any]], dict[str, dict[str, Any]]] = (-VIEW_SECONDS, [], {})

    # --- keys ---

    @property
    def _workers(self) -> str:
        return f"{self.prefix}fleet:workers"

    @property
    def _daemons(self) -> str:
        return f"{self.prefix}fleet:daemons"

    def _images(self, daemon: str) -> str:
        return f"{self.prefix}fleet:daemon:{daemon}:images"

    def _refs(self, daemon: str) -> str:
        return f"{self.prefix}fleet:daemon:{daemon}:refs"

    @property
    def _refresh(self) -> str:
        return f"{self.prefix}fleet:refresh"

    # --- written by workers ---

    def register(self, worker: str, info: dict[str, Any]) -> None:
        """A worker's heartbeat: who it is, which daemon it serves (``info["daemon"]``, or None)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._workers, worker, json.dumps({**info, "worker": worker, "heartbeat_at": now}))
        pipe.zadd(f"{self.prefix}workers", {worker: now})
        if info.get("daemon"):
            daemon = self.daemon_record(info["daemon"]) or {"name": info["daemon"]}
            daemon.update(docker_version=info.get("docker_version") or daemon.get("docker_version"), seen_at=now)
            pipe.hset(self._daemons, info["daemon"], json.dumps(daemon))
        pipe.execute()

    def unregister(self, worker: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self._workers, worker)
        pipe.zrem(f"{self.prefix}workers", worker)
        pipe.execute()

    def write_index(self, daemon: str, images: list[dict[str, Any]], listed_at: float) -> None:
        """Replace ``daemon``'s image index with ``images``, as listed at ``listed_at`` (one
        transaction: readers see the old index or the new)."""
        refs: dict[str, str] = {}
        for image in images:
            refs.update(canonical_refs(image))
            refs[image["id"]] = image["id"]
        record = self.daemon_record(daemon) or {"name": daemon}
        record["images_refreshed_at"] = listed_at
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self._images(daemon), json.dumps(images, separators=(",", ":")))
        pipe.delete(self._refs(daemon))
        if refs:
            pipe.hset(self._refs(daemon), mapping=refs)
        pipe.hset(self._daemons, daemon, json.dumps(record))
        pipe.execute()

    def refresh_wanted(self) -> float:
        """When an API process last asked for fresh indexes (0 if never)."""
        return float(self.redis.get(self._refresh) or 0)

    # --- read by the API ---

    def daemon_record(self, daemon: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self._daemons, daemon)
        return json.loads(raw) if raw else None

    def _read(self) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """The live workers and the daemon records, in one round trip; entries silent for a
        day are forgotten on the way."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._workers)
        pipe.hgetall(self._daemons)
        raw_workers, raw_daemons = pipe.execute()
        now = time.time()
        workers, stale_workers = [], []
        for worker, raw in raw_workers.items():
            info = json.loads(raw)
            age = now - info.get("heartbeat_at", 0)
            if age > FORGET_AFTER:
                stale_workers.append(worker)
            else:
                workers.append({**info, "alive": age <= WORKER_HEARTBEAT_MAX_AGE})
        records, stale_daemons = {}, []
        for name, raw in raw_daemons.items():
            record = json.loads(raw)
            if now - record.get("seen_at", now) > FORGET_AFTER:
                stale_daemons.append(name)
            else:
                records[name] = record
        if stale_workers:
            self.redis.hdel(self._workers, *stale_workers)
        if stale_daemons:
            self.redis.hdel(self._daemons, *stale_daemons)
        workers.sort(key=lambda w: w["worker"])
        self._seen = (time.monotonic(), workers, records)
        return workers, records

    def workers(self) -> list[dict[str, Any]]:
        return self._read()[0]

    def daemons(self, read: tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None = None) -> list[Daemon]:
        """Every daemon a worker served in the last day, with its live workers and queue depth
        (from ``read``, the workers and records just read, when the caller has them)."""
        workers, records = read or self._read()
        names = sorted(records)
        depths: list[int] = []
        if names:
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.llen(daemon_queue(name))
            depths = pipe.execute()
        found = []
        for name, depth in zip(names, depths):
            own = [w for w in workers if w.get("daemon") == name]
            live = [w for w in own if w["alive"]]
            found.append(Daemon(
                name=name, up=bool(live), docker_version=records[name].get("docker_version"),
                workers=[{k: w.get(k) for k in ("worker", "hostname", "concurrency", "alive")} | {"heartbeat_at": _iso(w.get("heartbeat_at"))}
                         for w in own],
                queue=daemon_queue(name), queue_depth=depth, images_refreshed_at=records[name].get("images_refreshed_at"),
            ))
        return found

    def images(self, daemons: Iterable[str]) -> list[dict[str, Any]]:
        """The indexed images of ``daemons``, each with its ``daemon``, newest first."""
        names = list(daemons)
        raws = self.redis.mget([self._images(name) for name in names]) if names else []
        found = [{**image, "daemon": name} for name, raw in zip(names, raws) for image in json.loads(raw or "[]")]
        return sorted(found, key=lambda image: (image.get("created") or "", image["daemon"]), reverse=True)

    def holders(self, reference: str, daemons: Iterable[str]) -> dict[str, str]:
        """Which of ``daemons`` hold the image ``reference`` names, and its id in each. Read
        as the daemon reads it: by name first; a hexadecimal reference then as an image id or
        a unique prefix of one, with or without ``sha256:``."""
        names = list(daemons)
        parsed = sources.parse(reference)
        if parsed is not None:
            key = _key(parsed)
        elif not reference.startswith("sha256:"):
            key = f"{sources.DOCKER_HUB}/library/{reference}:latest"  # `cafe` is a name first
        else:
            key = None
        found: dict[str, str] = {}
        if key:
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hget(self._refs(name), key)
            found = {name: image_id for name, image_id in zip(names, pipe.execute()) if image_id}
        if found or parsed is not None:
            return found
        prefix = reference if reference.startswith("sha256:") else f"sha256:{reference}"
        for name in names:
            ids = {i for i in self.redis.hkeys(self._refs(name)) if "/" not in i and i.startswith(prefix)}
            if len(ids) == 1:
                found[name] = ids.pop()
        return found

    def ask_for_fresh_indexes(self, up: list[Daemon], timeout: float = 3.0) -> None:
        """Ask every daemon's workers to re-index now and wait (``timeout`` at most) until the
        daemons that are up have: a name that a pipeline gave an image a moment ago is then
        found even if the image's event has not been handled yet."""
        asked = time.time()
        self.redis.set(self._refresh, repr(asked), ex=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = [self.daemon_record(d.name) or {} for d in up]
            if all((r.get("images_refreshed_at") or 0) >= asked for r in records):
                return
            time.sleep(0.05)

    # --- placement: where a job that needs a daemon runs ---

    def check_known(self, daemon: str, field: str = "daemon") -> None:
        """422 ``daemon_not_found`` unless a worker has served ``daemon`` (in the last day)."""
        known = [d.name for d in self.daemons()]
        if daemon not in known:
            raise ValidationFailed(
                [{"field": field, "message": f"no worker serves a daemon named {daemon!r}; known: {', '.join(known) or 'none yet'}"}],
                f"unknown daemon {daemon!r}", code="daemon_not_found",
            )

    def place(self, source: str, requested: str | None, *, fresh: bool = False) -> Placement:
        """The daemon a publish of the daemon image ``source`` runs on.

        - ``requested``, when the caller names one (it must be known; it may be down: the job
          then waits for a worker of it);
        - no daemon known yet (a fresh deployment): ``default``, the single daemon's name;
        - one daemon known: that one, as with a single daemon (its worker says whether it holds
          the image);
        - several: the daemons whose image index holds ``source``; after one fresh look when
          none does, 422 ``image_not_found``; 409 ``ambiguous_source`` when the name means
          different images on different daemons; else the holder that is up with the
          shortest queue.

        The first two cases are read from this process' view of the fleet, at most
        VIEW_SECONDS old (no round trip), and the placement carries what it saw: the job is
        stored only if the fleet is still so (JobStore.create), else placed again with
        ``fresh``. A submission then costs one round trip to Redis, not two.
        """
        if requested:
            self.check_known(requested)
            return Placement(requested)
        read_at, workers, records = self._seen
        if fresh or time.monotonic() - read_at > VIEW_SECONDS or len(records) > 1:
            workers, records = self._read()
        names = sorted(records)
        if len(names) <= 1:  # no queue depth or image index needed to choose
            chosen = names[0] if names else DEFAULT_DAEMON
            return Placement(chosen, (self._daemons, len(names), names[0] if names else ""))
        daemons = self.daemons((workers, records))
        holders = self.holders(source, names)
        if not holders:
            self.ask_for_fresh_indexes([d for d in daemons if d.up])
            holders = self.holders(source, names)
        if not holders:
            raise ValidationFailed(
                [{"field": "source", "message": f"no daemon holds {source!r} (looked in {', '.join(names)})"}],
                f"image {source} is in none of the daemons", code="image_not_found",
            )
        if len(set(holders.values())) > 1:
            where = ", ".join(f"{image_id[:19]} on {name}" for name, image_id in sorted(holders.items()))
            error = Conflict(f"{source!r} names different images on different daemons ({where}); say which with `daemon`",
                             code="ambiguous_source")
            error.errors = [{"field": "source", "message": f"ambiguous: {where}"}]
            raise error
        candidates = [d for d in daemons if d.name in holders]
        return Placement(min(candidates, key=lambda d: (not d.up, d.queue_depth, d.name)).name)

    def why_waiting(self, daemon: str) -> str | None:
        """Why a job queued for ``daemon`` is not running, when the reason is that no worker
        of the daemon is alive."""
        read_at, workers, _ = self._seen
        if time.monotonic() - read_at > VIEW_SECONDS:  # a note for the reader: a second-old view will do
            workers = self.workers()
        if any(w.get("daemon") == daemon and w["alive"] for w in workers):
            return None
        return f"daemon {daemon} has no worker"


def matches_reference(image: dict[str, Any], pattern: str) -> bool:
    """Does any name of ``image`` match ``pattern`` (see :func:`names_matching`)?"""
    return bool(names_matching(image.get("tags") or [], pattern) or names_matching(image.get("digests") or [], pattern))


def filter_reference(image: dict[str, Any], pattern: str) -> dict[str, Any] | None:
    """``docker image ls --filter reference=PATTERN`` of one image: the image with only its
    names that match (as Docker answers: a filter never shows an image's other names), or None."""
    tags, digests = names_matching(image.get("tags") or [], pattern), names_matching(image.get("digests") or [], pattern)
    return {**image, "tags": tags, "digests": digests} if tags or digests else None


def names_matching(names: list[str], pattern: str) -> list[str]:
    """The names that ``pattern`` matches, as users write repositories: the whole name
    (``localhost:5000/team/app:1``, ``team/app:1``), its repository without the tag, or its
    repository path without the registry host (``team/*`` matches ``localhost:5000/team/app``).
    ``*`` stays within one path component, as in Docker's filter (Go's path.Match)."""
    glob = _glob(pattern)
    found = []
    for name in names:
        parsed = sources.parse(name)
        if parsed is None:
            continue
        familiar = name.split("@", 1)[0]
        candidates = {familiar, familiar.rsplit(":", 1)[0] if ":" in familiar.rsplit("/", 1)[-1] else familiar,
                      parsed.repository, parsed.path}
        if parsed.tag:
            candidates |= {f"{parsed.repository}:{parsed.tag}", f"{parsed.path}:{parsed.tag}"}
        if any(glob.fullmatch(candidate) for candidate in candidates):
            found.append(name)
    return found


def _glob(pattern: str) -> re.Pattern:
    """Go's path.Match, which Docker's reference filter uses: ``*`` and ``?`` never cross a
    ``/``."""
    return re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern))

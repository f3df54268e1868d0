"""Job endpoints: submit (publish, pull), read, list, cancel, follow. Views validate, record,
enqueue and answer; they never touch Docker or ECR."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from typing import Any, Iterator

import redis
from flask import Blueprint, Response, g, jsonify, request, stream_with_context, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from .auth import current_client, is_admin, require_repositories, require_scope, require_source
from .callbacks import CallbackRefused, check_callback_url
from .build_context import ContextRefused, check_context
from .build_sources import require_build_sources
from .artifacts import Artifacts, Upload, has_upload, store_bytes
from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ServiceUnavailable, UnsupportedMediaType, ValidationFailed
from .http import ctx, json_body, load, load_query, parse_json
from .jobs import new_job
from .routing import queue_for
from .jobstore import TERMINAL_STATES, FleetChanged, QueueFull, epoch, is_job_id
from .schemas import ArchivePublishSchema, BuildSchema, CopySchema, JobListQuery, repository_in
from .uploads import archive_too_large, receive_archive
from .views_audit import accepted_job

log = logging.getLogger(__name__)
jobs = Blueprint("jobs", __name__)

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}", re.ASCII)
# A Redis stream id is `ms-seq`, each an unsigned 64-bit number; 19 digits always fit, and
# every id Redis generates (13-digit milliseconds) has them.
EVENT_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?", re.ASCII)
SSE_KEEPALIVE_MS = 15000
# A resumed follower (Last-Event-ID) gets the events it missed when they are few and small;
# otherwise the latest snapshot alone: every event is the whole record, so the latest says what
# the others did. (408 snapshots of a job with many references made a 5.9 MB replay.) A live
# stream still sends every event as it is written.
REPLAY_MAX_EVENTS = 20
REPLAY_MAX_BYTES = 256 * 1024


def _check_registries(names: list[tuple[str, str]]) -> None:
    registries = ctx()["settings"].registries
    errors = [
        {"field": field, "message": f"no registry named {name!r} is configured (configured: {', '.join(sorted(registries)) or 'none'})"}
        for field, name in names
        if name not in registries
    ]
    if errors:
        raise ValidationFailed(errors, "unknown registry: " + ", ".join(e["field"] for e in errors), code="registry_not_configured")


def _check_ecr_names(names: list[tuple[str, str, str]]) -> None:
    """What each registry adds to the name rules (ECR's stricter grammar; Docker's length limit
    with the registry's host): refuse at the door what the daemon or ECR would later."""
    registries = ctx()["settings"].registries
    errors = []
    for field, registry, repository in names:
        try:
            repository_in(registries[registry], repository)
        except ValidationError as exc:
            errors.append({"field": field, "message": "; ".join(exc.messages)})
    if errors:
        raise ValidationFailed(errors)


def _check_callback(data: dict[str, Any]) -> None:
    if not data.get("callback_url"):
        return
    try:
        check_callback_url(data["callback_url"], ctx()["settings"].webhooks.allowed_hosts)
    except CallbackRefused as exc:
        raise ValidationFailed([{"field": "callback_url", "message": str(exc)}], code="callback_url_forbidden") from None


def _check_places(client, data: dict[str, Any], places: list[tuple[str, str, str]]) -> None:
    """Everything a job must pass before it is stored, for each (field prefix, registry,
    repository) it names: the client's repository patterns, configured registries, ECR's name
    grammar; and its callback URL."""
    require_repositories(client, [(f"{prefix}repository", repository) for prefix, _, repository in places])
    _check_registries([(f"{prefix}registry", registry) for prefix, registry, _ in places])
    _check_ecr_names([(f"{prefix}repository", registry, repository) for prefix, registry, repository in places])
    _check_callback(data)


def _check_targets(client, data: dict[str, Any]) -> None:
    """A publish or a build: every target."""
    _check_places(client, data, [(f"targets.{i}.", t["registry"], t["repository"]) for i, t in enumerate(data["targets"])])


def _accepted(job: dict[str, Any], replayed: bool = False, record: str | None = None) -> Response:
    resp = Response(record, mimetype="application/json") if record is not None else jsonify(job)
    resp.status_code = 202
    # what url_for("jobs.get_job") builds, without its ~25 µs of URL quoting: an id is a UUID
    resp.headers["Location"] = f"{request.script_root}/v1/jobs/{job['id']}"
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _replay(store, bound_id: str, bound_hash: str, request_hash: str) -> Response:
    if bound_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different request; use a new key for a new request",
            code="idempotency_conflict",
        )
    for _ in range(20):  # the first request may still be storing its job
        job = store.get(bound_id)
        if job is not None:
            return _accepted(job, replayed=True)
        time.sleep(0.05)
    raise Conflict("a request with this Idempotency-Key is still being processed; retry", code="idempotency_in_progress")


def _queue_full(settings) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"{settings.limits.max_queued_jobs} jobs are already waiting; try again shortly", code="queue_full", retry_after=30
    )


def _check_queue_depth(store, settings) -> None:
    """Before an upload: refused at once when the queue is full (read at most every 100 ms per
    process). The cap itself is held exactly where the job is stored (JobStore.create)."""
    if store.queue_depth() >= settings.limits.max_queued_jobs:
        raise _queue_full(settings)


def _submit(kind: str, normalized: dict[str, Any], daemon: str | None = None, upload: Upload | None = None,
            fleet: tuple[str, int, str] | None = None) -> Response:
    """Store and queue the job. With an ``upload`` (already in the artifact store, named by the
    job's id to be): the job takes that id and records it; an upload that ends up with no job
    of its own (refused, or a replayed request's) is removed."""
    try:
        response = _store_job(kind, normalized, daemon, upload, fleet)
    except BaseException:
        if upload is not None:
            upload.discard()
        raise
    if upload is not None and response.headers.get("Idempotent-Replayed"):
        upload.discard()
    return response


def _store_job(kind: str, normalized: dict[str, Any], daemon: str | None, upload: Upload | None,
               fleet: tuple[str, int, str] | None = None) -> Response:
    settings, store, queue = ctx()["settings"], ctx()["store"], ctx()["queue"]
    client, key = current_client().name, request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed([{"field": "Idempotency-Key", "message": "1 to 255 visible ASCII characters"}])
    job = new_job(kind, normalized)
    job["client"] = client
    if upload is not None:
        job["id"] = upload.job_id  # the artifact store names an upload by its job's id
        job.update(upload.fields)
    if daemon is not None:
        job["daemon"] = daemon
    if key is not None:
        job["idempotency_key"] = key
        # an uploaded archive is part of the request: the same key with another archive → conflict
        material = [kind, normalized] + ([upload.sha256] if upload is not None and "archive" in upload.fields else [])
        request_hash = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        bound = store.claim_idempotency_key(client, key, job["id"], request_hash, settings.recovery.lock_ttl_seconds)
        if bound is not None:
            return _replay(store, *bound, request_hash)
    try:
        # the key's binding outlives the job's retention; shortened to it when the job ends
        route = queue_for(job)
        create = {"job": job, "message": queue.message(job["id"], route), "queue": route, "fleet": fleet,
                  "idempotency": (request_hash, settings.retention_seconds + 2 * 86400) if key is not None else None,
                  "max_queued": settings.limits.max_queued_jobs}
        # the job and the audit entry of its acceptance: one script, together or not at all
        entry = accepted_job(job)
        record = ctx()["audit"].create_job(store, entry, **create) if entry is not None else store.create(**create)
    except (FleetChanged, QueueFull) as exc:  # nothing was stored: placed again by the caller, or refused
        if key is not None:
            store.release_idempotency_key(client, key)
        if isinstance(exc, QueueFull):
            raise _queue_full(settings) from None
        raise
    except Exception as exc:  # Redis or the broker refused: take everything back, nothing half-done
        log.error("job not accepted: %s", exc.__class__.__name__, extra={"job_id": job["id"]})
        try:
            store.delete(job)
            if key is not None:
                store.release_idempotency_key(client, key)
        except Exception:
            pass
        raise ServiceUnavailable("the job queue is unavailable; nothing was queued, try again", code="queue_unavailable") from None
    if record is None:  # our claim of the key lapsed and another request took it: that one stands
        bound = store.claim_idempotency_key(client, key, job["id"], request_hash, settings.recovery.lock_ttl_seconds)
        return _replay(store, *bound, request_hash) if bound else _store_job(kind, normalized, daemon, upload)
    g.audit_decided = entry is not None  # recorded with the job: not again after the response
    if entry is None:  # else the audit entry's own line says it (logger "audit": job, client, action)
        log.info("job accepted", extra={"job_id": job["id"], "kind": kind, "client": client})
    return _accepted(job, record=record)


@jobs.post("/v1/publish")
def publish():
    client = require_scope("publish")
    if request.mimetype == "multipart/form-data":
        return _publish_archive(client)
    data = load(ctx()["schemas"]["publish"], json_body())
    require_source(client, data["source"])
    _check_targets(client, data)
    # where the source is: the daemon named, or the one that holds it (service/fleet.py)
    fleet = ctx()["fleet"]
    placement = fleet.place(data["source"], data.get("daemon"))
    try:
        return _submit("publish", data, daemon=placement.daemon, fleet=placement.fleet)
    except FleetChanged:  # since this process last looked: look again, and store it as placed now
        placement = fleet.place(data["source"], data.get("daemon"), fresh=True)
        return _submit("publish", data, daemon=placement.daemon)  # read just now: as placement always was


def _publish_archive(client) -> Response:
    """An image archive (``image``) and the JSON request (``request``, without a source), as
    multipart/form-data: streamed to the artifact store, checked on the way (service/uploads.py);
    the job needs no daemon (service/routing.py)."""
    settings = ctx()["settings"]
    limits = settings.limits
    limit = limits.max_archive_bytes + limits.max_body_bytes  # the archive, the JSON, the parts' headers
    if request.content_length is not None and request.content_length > limit:
        raise archive_too_large(limits)  # not a byte read
    _check_queue_depth(ctx()["store"], settings)  # before the upload, not after it
    request.max_content_length = limit
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise BadRequest("a multipart/form-data body needs its boundary", code="invalid_multipart")

    def load_request(raw: bytes) -> dict[str, Any]:
        data = load(ArchivePublishSchema(limits=limits), parse_json(raw, "request"))
        _check_targets(client, data)
        return data

    data, received = receive_archive(request.stream, boundary.encode("latin-1"), limits, _artifacts(), load_request)
    return _submit("publish", data, upload=received.store(_artifacts()))


def _artifacts() -> Artifacts:
    return ctx()["artifacts"]


@jobs.post("/v1/pull")
def pull():
    client = require_scope("pull")
    data = load(ctx()["schemas"]["pull"], json_body())
    _check_places(client, data, [("", data["registry"], data["repository"])])
    if data.get("daemon"):
        ctx()["fleet"].check_known(data["daemon"])
    return _submit("pull", data)


@jobs.post("/v1/copy")
def copy():
    """Registry to registry, no daemon: ``pull`` on the source's repository and ``publish`` on
    every target's."""
    client = require_scope("pull")
    require_scope("publish")
    data = load(CopySchema(limits=ctx()["settings"].limits), json_body())
    source = data["source"]
    places = [("source.", source["registry"], source["repository"])]
    places += [(f"targets.{i}.", t["registry"], t["repository"]) for i, t in enumerate(data["targets"])]
    _check_places(client, data, places)
    return _submit("copy", data)


def _context_too_large(limits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the build context is larger than limits.max_context_bytes ({limits.max_context_bytes / 2**20:.0f} MiB, "
        f"{limits.max_context_bytes} bytes): leave files out with .dockerignore, or ask the operator to raise the limit",
        code="context_too_large",
    )


@jobs.post("/v1/build")
def build():
    """A build context (tar or tar.gz) and a JSON request, as multipart/form-data."""
    client = require_scope("build")
    settings = ctx()["settings"]
    # This endpoint alone takes large bodies: the context is checked, not the JSON limit.
    request.max_content_length = settings.limits.max_context_bytes + settings.limits.max_body_bytes
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with a `request` (JSON) and a `context` (tar or tar.gz) part")
    try:
        form_request, context = request.form.get("request"), request.files.get("context")
    except (PayloadTooLarge, RequestEntityTooLarge):  # the body outgrew the context's limit (and the request's)
        raise _context_too_large(settings.limits) from None
    if context is None and "context" in request.form:  # a part sent without a filename
        context = io.BytesIO(request.form["context"].encode("utf-8", "surrogateescape"))
    missing = [name for name, part in (("request", form_request), ("context", context)) if part is None]
    if missing:
        raise ValidationFailed([{"field": name, "message": "missing part"} for name in missing])
    data = load(BuildSchema(limits=settings.limits), parse_json(form_request, "request"))
    _check_targets(client, data)
    archive = context.read()
    if len(archive) > settings.limits.max_context_bytes:
        raise _context_too_large(settings.limits)
    try:
        check_context(archive, data["dockerfile"], settings.limits)
    except ContextRefused as exc:
        raise ValidationFailed([{"field": "context", "message": str(exc)}], code="invalid_context") from None
    require_build_sources(client, archive, data, settings.limits)  # the images its Dockerfile reads
    # the request names its context by digest: the same key with other sources → conflict
    data = {**data, "context_sha256": hashlib.sha256(archive).hexdigest(), "context_bytes": len(archive)}
    return _submit("build", data, upload=store_bytes(_artifacts(), archive))


def may_see(client, job: dict[str, Any]) -> bool:
    """A job is its owner's, and every admin's."""
    return job.get("client") == client.name or is_admin(client)


def note_waiting(job: dict[str, Any], fleet) -> dict[str, Any]:
    """A queued job for a daemon no worker serves says so (``waiting_for``)."""
    if job["state"] == "queued" and job.get("daemon"):
        reason = fleet.why_waiting(job["daemon"])
        if reason:
            job["waiting_for"] = reason
    return job


def _job_or_404(job_id: str) -> dict[str, Any]:
    """The job, if it exists and the caller may see it: its owner, or an admin. Anyone else's
    job is indistinguishable from one that does not exist."""
    job = ctx()["store"].get(job_id) if is_job_id(job_id) else None
    if job is None or not may_see(current_client(), job):
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job


def visible_job(job_id: str) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` (and the console) shows it to the caller. The same
    answer, for a caller and a job it may see, comes from service/job_reads.py below Flask."""
    return note_waiting(_job_or_404(job_id), ctx()["fleet"])


@jobs.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(visible_job(job_id))


def job_page(query: dict[str, Any], owner: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the jobs the caller may see (``GET /v1/jobs``, the console's list), filtered by
    ``query`` (JobListQuery); an admin may narrow it to one ``owner``'s jobs."""
    if "cursor" in query and not is_job_id(query["cursor"]):
        raise ValidationFailed([{"field": "cursor", "message": "not a cursor from a previous page"}])
    client = current_client()
    return ctx()["store"].list(
        client=owner if is_admin(client) else client.name,
        state=query.get("state"), kind=query.get("kind"), limit=query["limit"], cursor=query.get("cursor")
    )


@jobs.get("/v1/jobs")
def list_jobs():
    query = load_query(JobListQuery())
    page, next_cursor = job_page(query)
    resp = jsonify({"jobs": page, "next_cursor": next_cursor})
    if next_cursor:
        args = {k: v for k, v in query.items() if k != "cursor"}
        resp.headers["Link"] = f'<{url_for("jobs.list_jobs", cursor=next_cursor, **args)}>; rel="next"'
    return resp


@jobs.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    _job_or_404(job_id)
    outcome, job = ctx()["store"].cancel(job_id)
    if outcome == "missing":
        raise NotFound(f"no job {job_id}", code="job_not_found")
    if outcome == "finished":
        raise Conflict(f"job {job_id} already ended {job['state']}", code="job_finished")
    log.info("job cancel %s", outcome, extra={"job_id": job_id})
    if outcome == "cancelled":
        if has_upload(job):
            _artifacts().delete(job_id)
        return jsonify(job)  # its webhook, if any, is owed already: the store did it with the cancel
    resp = jsonify(job)  # running: its worker stops it and records "cancelled"
    resp.status_code = 202
    return resp


def _end_id(job: dict[str, Any]) -> str:
    """An event id for a job's record replayed without its history (expired an hour after the
    job ended): a stream id (``ms-seq``) at the job's end, so a follower that resumes with it
    gets the same final state again, and the id has the form every other event id has."""
    finished = epoch(job.get("finished_at"))
    return f"{int(finished * 1000)}-0" if finished is not None else "0-0"


def _sse(event_id: str, event: str, data: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


def _missed(store, job_id: str, after: str) -> list[tuple[str, str, str]]:
    """The events after ``after``, for a resumed follower: all of them when they are at most
    REPLAY_MAX_EVENTS and REPLAY_MAX_BYTES, else the latest alone, as a ``state`` event (the
    follower missed state changes, perhaps). Reads no more than one event past the bound."""
    missed = store.events(job_id, after, count=REPLAY_MAX_EVENTS + 1)
    if len(missed) <= REPLAY_MAX_EVENTS and sum(len(data) for _, _, data in missed) <= REPLAY_MAX_BYTES:
        return missed
    latest = store.latest_event(job_id)
    return [(latest[0], "state", latest[2])] if latest else []


@jobs.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    """Server-Sent Events: the job's snapshots as they are written, closing after the end."""
    job = _job_or_404(job_id)
    store = ctx()["store"]
    last = request.headers.get("Last-Event-ID")
    if last is not None and not EVENT_ID.fullmatch(last):
        raise ValidationFailed([{"field": "Last-Event-ID", "message": "not an event id from this stream"}])

    # A job that has ended replays its end at once; only a live stream holds a thread for long.
    slots = None if job["state"] in TERMINAL_STATES else ctx()["event_streams"]
    if slots is not None and not slots.acquire(blocking=False):
        raise ServiceUnavailable(
            "this API process is serving as many live event streams as it may; "
            f"poll GET /v1/jobs/{job_id} meanwhile, or try again shortly", code="too_many_streams", retry_after=5
        )

    def stream() -> Iterator[str]:
        try:
            yield from follow()
        except redis.exceptions.RedisError as exc:
            # The headers are gone already: end the stream cleanly and let the client reconnect
            # with Last-Event-ID (the `retry:` hint) instead of breaking the chunked encoding.
            log.warning("job events stream ended early: %s", exc, extra={"job_id": job_id})

    def follow() -> Iterator[str]:
        after = last
        if after is None:
            # A new follower starts from the latest snapshot, not from the whole history.
            latest = store.latest_event(job_id)
            if latest is None:  # no history (expired an hour after the job ended)
                yield _sse(_end_id(job), "state", json.dumps(job))
                return
            after, kind, data = latest
            yield _sse(after, kind, data)
            if json.loads(data)["state"] in TERMINAL_STATES:
                return
        else:
            for event_id, kind, data in _missed(store, job_id, after):  # a bounded catch-up
                after = event_id
                yield _sse(event_id, kind, data)
                if json.loads(data)["state"] in TERMINAL_STATES:
                    return
        yield "retry: 2000\n\n"
        # the events that follow come from the process' reader (service/followers.py), which
        # reads every followed job's stream at once
        sub = None if job["state"] in TERMINAL_STATES else ctx()["followers"].subscribe(job_id, after)
        try:
            while True:
                events = sub.wait(SSE_KEEPALIVE_MS / 1000) if sub is not None else store.events(job_id, after)
                for event_id, kind, data in events:
                    after = event_id
                    yield _sse(event_id, kind, data)
                    if json.loads(data)["state"] in TERMINAL_STATES:
                        return
                if events:
                    continue
                current = store.get(job_id)
                if current is None:
                    return
                if current["state"] in TERMINAL_STATES:
                    if sub is not None:
                        ctx()["followers"].unsubscribe(sub)
                        sub = None  # one more look of its own: its final event may have landed meanwhile
                        continue
                    # Nothing after `after` although the job has ended (a Last-Event-ID past its
                    # end, or a history already expired): replay the final state rather than wait.
                    latest = store.latest_event(job_id)
                    yield _sse(latest[0] if latest else _end_id(current), "state", json.dumps(current))
                    return
                yield ": keep-alive\n\n"
        finally:
            if sub is not None:
                ctx()["followers"].unsubscribe(sub)

    try:
        resp = Response(stream_with_context(stream()), mimetype="text/event-stream")
    except BaseException:
        if slots is not None:
            slots.release()
        raise
    if slots is not None:
        resp.call_on_close(slots.release)  # when the server is done with the response, however it ended
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp

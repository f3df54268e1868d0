"""HTTP endpoints. Views validate, record, enqueue and answer; they never touch Docker or ECR."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import BadRequest as WerkzeugBadRequest

from . import control, schemas
from .errors import BadRequest, NotFound, ServiceUnavailable, UnsupportedMediaType, ValidationFailed
from .jobs import new_job
from .jobstore import is_job_id
from .schemas import JobListQuery, PublishSchema, PullSchema, field_errors

log = logging.getLogger(__name__)
api = Blueprint("api", __name__)

WORKER_HEARTBEAT_MAX_AGE = 30.0


def _ctx() -> dict[str, Any]:
    return current_app.extensions["imagepub"]


def _json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the request body as application/json")
    try:
        return request.get_json()
    except WerkzeugBadRequest:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None


def _load(schema: Schema, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None


def _check_registries(names: list[tuple[str, str]]) -> None:
    registries = _ctx()["settings"].registries
    errors = [
        {"field": field, "message": f"no registry named {name!r} is configured"}
        for field, name in names
        if name not in registries
    ]
    if errors:
        raise ValidationFailed(errors, "unknown registry: " + ", ".join(e["field"] for e in errors), code="registry_not_configured")


def _submit(kind: str, normalized: dict[str, Any]) -> Response:
    ctx = _ctx()
    job = new_job(kind, normalized)
    store, queue = ctx["store"], ctx["queue"]
    store.create(job)
    try:
        queue.enqueue(job["id"])
    except Exception as exc:  # broker down: take the record back so nothing is half-done
        log.error("enqueue failed for job %s: %s", job["id"], exc.__class__.__name__)
        store.delete(job)
        raise ServiceUnavailable("the job queue is unavailable; nothing was queued, try again", code="queue_unavailable") from None
    log.info("job accepted", extra={"job_id": job["id"], "kind": kind})
    resp = jsonify(job)
    resp.status_code = 202
    resp.headers["Location"] = url_for("api.get_job", job_id=job["id"])
    return resp


@api.post("/v1/publish")
def publish():
    data = _load(PublishSchema(limits=_ctx()["settings"].limits), _json_body())
    _check_registries([(f"targets.{i}.registry", t["registry"]) for i, t in enumerate(data["targets"])])
    return _submit("publish", data)


@api.post("/v1/pull")
def pull():
    data = _load(PullSchema(), _json_body())
    _check_registries([("registry", data["registry"])])
    return _submit("pull", data)


@api.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    job = _ctx()["store"].get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return jsonify(job)


@api.get("/v1/jobs")
def list_jobs():
    try:
        query = JobListQuery().load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None
    if "cursor" in query and not is_job_id(query["cursor"]):
        raise ValidationFailed([{"field": "cursor", "message": "not a cursor from a previous page"}])
    jobs, next_cursor = _ctx()["store"].list(
        state=query.get("state"), kind=query.get("kind"), limit=query["limit"], cursor=query.get("cursor")
    )
    resp = jsonify({"jobs": jobs, "next_cursor": next_cursor})
    if next_cursor:
        args = {k: v for k, v in query.items() if k != "cursor"}
        resp.headers["Link"] = f'<{url_for("api.list_jobs", cursor=next_cursor, **args)}>; rel="next"'
    return resp


@api.get("/v1/registries")
def list_registries():
    registries = _ctx()["settings"].registries.values()
    return jsonify({"registries": [r.public() for r in registries]})


@api.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    store = _ctx()["store"]
    checks: dict[str, dict[str, Any]] = {}
    try:
        store.ping()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "detail": f"Redis does not answer ({exc.__class__.__name__})"}
    if checks["redis"]["ok"]:
        workers = store.live_workers(WORKER_HEARTBEAT_MAX_AGE)
        checks["workers"] = {"ok": bool(workers), "live": len(workers)}
        if not workers:
            checks["workers"]["detail"] = f"no worker heartbeat in the last {WORKER_HEARTBEAT_MAX_AGE:.0f} s"
    else:
        checks["workers"] = {"ok": False, "detail": "unknown while Redis is unavailable"}
    ready = all(c["ok"] for c in checks.values())
    resp = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    resp.status_code = 200 if ready else 503
    return resp


@api.get("/openapi.yaml")
def openapi_spec():
    return Response(_ctx()["spec"], mimetype="application/yaml")


# --- registries' repositories and images (answered by a worker over the control queue) ------


def _registry(name: str):
    registry = _ctx()["settings"].registries.get(name)
    if registry is None:
        raise NotFound(f"no registry named {name!r} is configured", code="registry_not_configured")
    return registry


def _repository_name(value: str) -> str:
    try:
        schemas._repository(value)
    except ValidationError as exc:
        raise ValidationFailed([{"field": "repository", "message": "; ".join(exc.messages)}]) from None
    return value


def _page() -> dict[str, Any]:
    try:
        return schemas.PageQuery().load(request.args.to_dict())
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None


@api.post("/v1/registries/<registry>/repositories")
def create_repository(registry: str):
    _registry(registry)
    data = _load(schemas.CreateRepositorySchema(), _json_body())
    repo = _ctx()["control"].call(control.CREATE_REPOSITORY, registry, data)
    resp = jsonify(repo)
    resp.status_code = 201
    resp.headers["Location"] = url_for("api.describe_repository", registry=registry, repository=repo["name"])
    return resp


@api.get("/v1/registries/<registry>/repositories")
def list_repositories(registry: str):
    _registry(registry)
    page = _page()
    return jsonify(_ctx()["control"].call(control.LIST_REPOSITORIES, registry, page["limit"], page.get("cursor")))


@api.get("/v1/registries/<registry>/repositories/<path:repository>/images")
def list_images(registry: str, repository: str):
    _registry(registry)
    page = _page()
    name = _repository_name(repository)
    return jsonify(_ctx()["control"].call(control.LIST_IMAGES, registry, name, page["limit"], page.get("cursor")))


@api.get("/v1/registries/<registry>/repositories/<path:repository>")
def describe_repository(registry: str, repository: str):
    _registry(registry)
    return jsonify(_ctx()["control"].call(control.DESCRIBE_REPOSITORY, registry, _repository_name(repository)))

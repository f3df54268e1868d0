"""The Flask application: ``create_app()`` wires settings, the job store and the queue."""

from __future__ import annotations

import functools
import logging
import threading

from typing import Any

import orjson
import redis
import yaml
from importlib import resources

from flask import Flask, Response, g, json, request
from flask.json.provider import DefaultJSONProvider
from flask_limiter import Limiter
from werkzeug.exceptions import HTTPException

from . import artifacts
from . import config as config_module
from .config import Settings
from .errors import UNEXPECTED, ImagepubError, problem_document
from .fleet import Fleet
from .followers import Followers
from .jobcache import JobCache
from .job_reads import JobReads
from .jobstore import REDIS_OPTIONS, JobStore
from .auth import ANONYMOUS, Authenticator, authenticate_request
from .control import RegistryControl
from .http import BoundedRequest
from .queue import JobQueue
from .schemas import PublishSchema, PullSchema, repository_room

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, **extra) -> Response:
    body = problem_document(status, code, title, detail)
    body.update(extra)
    body.setdefault("instance", request.path)
    g.problem_code = code  # for the audit trail's record of a refused submission (views_audit.py)
    return Response(json.dumps(body), status=status, mimetype=PROBLEM)


def _render_imagepub_error(exc: ImagepubError) -> Response:
    extra = {}
    if getattr(exc, "errors", None):
        extra["errors"] = exc.errors
    resp = problem(exc.status, exc.code, exc.title, exc.message, **extra)
    resp.headers.update(getattr(exc, "headers", {}))
    return resp


def _render_http_error(exc: HTTPException) -> Response:
    codes = {
        404: "not_found",
        405: "method_not_allowed",
        408: "request_timeout",
        413: "payload_too_large",
        429: "too_many_requests",
        415: "unsupported_media_type",
        400: "bad_request",
    }
    code = codes.get(exc.code or 500, "http_error")
    resp = problem(exc.code or 500, code, exc.name, exc.description or exc.name)
    if exc.code == 405 and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


def _render_redis_down(exc: Exception) -> Response:
    log.error("Redis unavailable on %s %s: %s", request.method, request.path, exc.__class__.__name__)
    resp = problem(503, "store_unavailable", "Service unavailable", "the job store does not answer; try again shortly")
    resp.headers["Retry-After"] = "5"
    return resp


def _render_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return problem(500, "internal_error", "Internal error", UNEXPECTED)


def deployment_spec(settings: Settings) -> dict:
    """openapi.yaml as this deployment serves it: registry names are the configured ones, so
    a client (or a fuzzer) reading the contract knows exactly which registries exist, and the
    limits are this deployment's: its counts, and each registry's room for a repository name
    (Docker's 255 characters count the registry's host)."""
    spec = yaml.safe_load(resources.files("service").joinpath("openapi.yaml").read_text())
    # what a client may check before it sends a large body (the CLI does, for build contexts)
    spec["info"]["x-imagepub-limits"] = {
        "max_body_bytes": settings.limits.max_body_bytes, "max_context_bytes": settings.limits.max_context_bytes,
        "max_archive_bytes": settings.limits.max_archive_bytes,
    }
    if not settings.registries:
        return spec
    schemas = spec["components"]["schemas"]
    schemas["PublishRequest"]["properties"]["targets"]["maxItems"] = settings.limits.max_targets
    schemas["BuildRequest"]["properties"]["targets"]["maxItems"] = settings.limits.max_targets
    schemas["ArchivePublishRequest"]["properties"]["targets"]["maxItems"] = settings.limits.max_targets
    schemas["CopyRequest"]["properties"]["targets"]["maxItems"] = settings.limits.max_targets
    schemas["TargetRequest"]["properties"]["tags"]["maxItems"] = settings.limits.max_tags_per_target
    schemas["RegistryName"]["enum"] = sorted(settings.registries)
    rules = []
    ecr = sorted(name for name, registry in settings.registries.items() if registry.type == "ecr")
    if ecr:
        schemas["EcrRegistryName"]["enum"] = ecr
        # a repository in an ECR registry follows ECR's stricter grammar
        rules.append({
            "if": {"properties": {"registry": {"enum": ecr}}, "required": ["registry"]},
            "then": {"properties": {"repository": {"$ref": "#/components/schemas/EcrRepositoryName"}}},
        })
    for name, registry in sorted(settings.registries.items()):
        rules.append({
            "if": {"properties": {"registry": {"const": name}}, "required": ["registry"]},
            "then": {"properties": {"repository": repository_room(registry)}},
        })
    for schema in ("TargetRequest", "PullRequest", "CopySourceRequest"):
        schemas[schema].setdefault("allOf", []).extend(rules)
    _drop_foreign_examples(spec, set(settings.registries))
    return spec


def _drop_foreign_examples(spec: dict, registries: set[str]) -> None:
    """Request examples that name registries this deployment does not have would be invalid
    against its own contract (a client, or a fuzzer, would take them for valid requests)."""
    def names(value):
        if isinstance(value, dict):
            yield from ([value["registry"]] if isinstance(value.get("registry"), str) else [])
            for item in value.values():
                yield from names(item)
        elif isinstance(value, list):
            for item in value:
                yield from names(item)

    for path in spec.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            for media in ((operation.get("requestBody") or {}).get("content") or {}).values():
                if "example" in media and not set(names(media["example"])) <= registries:
                    del media["example"]


def served_spec(spec: dict, daemons: list[str]) -> bytes:
    """The deployment's contract with the daemons its workers serve now as the enum of daemon
    names (a name no worker serves is refused with 422 ``daemon_not_found``)."""
    if daemons:
        spec = {**spec, "components": {**spec["components"], "schemas": {
            **spec["components"]["schemas"], "DaemonName": {**spec["components"]["schemas"]["DaemonName"], "enum": daemons}}}}
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode()


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON responses written by orjson (bytes straight into the response, several
    times faster than the standard library for a job record), keys in the order given. Types
    orjson does not write itself (dates among them: OPT_PASSTHROUGH_DATETIME) go to Flask's
    own default, so every answer reads as it did."""

    sort_keys = False
    _OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=self.default, option=self._OPTIONS & ~orjson.OPT_APPEND_NEWLINE).decode()

    def body(self, obj: Any) -> bytes:
        """The bytes of a JSON response (``jsonify``'s, and service/job_reads.py's)."""
        return orjson.dumps(obj, default=self.default, option=self._OPTIONS)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        return self._app.response_class(self.body(self._prepare_response_obj(args, kwargs)), mimetype=self.mimetype)


def create_app(settings: Settings | None = None, *, store: JobStore | None = None, queue: JobQueue | None = None) -> Flask:
    settings = settings or config_module.load()
    queue = queue or JobQueue.from_config(settings)
    app = Flask(__name__)
    app.request_class = BoundedRequest  # bodies refused past the limit however framed (chunked too)
    app.config["MAX_CONTENT_LENGTH"] = settings.limits.max_body_bytes
    app.json = OrjsonProvider(app)
    store = store or JobStore.from_config(settings)
    store.cache = JobCache(store.redis, store.job_prefix)
    control = RegistryControl(queue.celery)
    app.extensions["imagepub"] = {
        "settings": settings,
        "store": store,
        "fleet": Fleet(store.redis, store.prefix),
        "queue": queue,
        "control": control,
        "artifacts": artifacts.for_api(settings, control),  # uploads wait there for their job
        # the contract as served: rendered again only when the fleet's daemons change
        "spec": functools.lru_cache(maxsize=8)(lambda daemons, spec=deployment_spec(settings): served_spec(spec, list(daemons))),
        # marshmallow schemas are reusable and thread-safe for load(): build them once
        "schemas": {"publish": PublishSchema(limits=settings.limits), "pull": PullSchema()},
        "followers": Followers(store),
        "event_streams": threading.BoundedSemaphore(settings.limits.event_streams_per_process),
    }
    app.register_error_handler(ImagepubError, _render_imagepub_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(redis.exceptions.ConnectionError, _render_redis_down)
    app.register_error_handler(redis.exceptions.TimeoutError, _render_redis_down)
    app.register_error_handler(Exception, _render_unexpected)

    from . import request_ids, views_audit
    from .views import jobs
    from .views_audit import audit
    from .views_ops import ops
    from .views_registries import registries

    request_ids.install(app)  # before authentication: a refused request has an id too
    views_audit.install(app)

    # Authentication first (an app-wide hook, so it runs before the rate limiter's), then rate
    # limits per client, stored in Redis so they hold across gunicorn workers and replicas;
    # with no limit configured anywhere, no limiter runs at all.
    authenticator = Authenticator(settings)

    @app.before_request
    def _authenticate():
        if request.blueprint == "console":
            authenticate_console_session()  # its session cookie; each page says whether it needs one
        elif request.blueprint != "ops":
            authenticate_request(authenticator)

    # The web console (/ui): HTML pages outside the JSON contract, signed into with a token.
    from .console import authenticate as authenticate_console_session, console
    app.extensions["imagepub"]["authenticator"] = authenticator  # its sign-in exchanges a token with it
    app.register_blueprint(console)

    default_rate = settings.limits.default_rate_limit
    if default_rate or any(client.rate_limit for client in settings.clients):
        limiter = Limiter(
            key_func=lambda: getattr(g, "client", ANONYMOUS).name,
            app=app,
            storage_uri=settings.redis_url,
            storage_options=REDIS_OPTIONS,
            strategy="moving-window",
            headers_enabled=True,
            swallow_errors=True,  # Redis trouble must not turn every request into a 500
            key_prefix="imagepub-rate",
        )
        for blueprint in (jobs, registries, audit):
            limiter.limit(
                lambda: getattr(g, "client", ANONYMOUS).rate_limit or default_rate or "",
                exempt_when=lambda: not (getattr(g, "client", ANONYMOUS).rate_limit or default_rate),
            )(blueprint)
        app.extensions["imagepub"]["limiter"] = limiter
    for blueprint in (jobs, registries, audit, ops):
        app.register_blueprint(blueprint)
    app.wsgi_app = JobReads(app)  # the polled read, below Flask when it is the ordinary case
    return app

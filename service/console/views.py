"""The console's pages. Each reads through the same functions as the JSON API (service/views.py,
service/views_registries.py), as the signed-in client, so a page shows exactly what that
client's token shows through the API: another client's job is "not found" here too.

Reads per page: the jobs list is one page of the listing index and one MGET of its records
(like ``GET /v1/jobs``), plus one read of the fleet's workers when a queued job waits for a
daemon; a job is one GET (its live progress is the API's event stream); the fleet page a
constant handful of commands plus one queue length per daemon; the registries' pages one
worker call each."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Response, g, jsonify, redirect, render_template, request, url_for
from marshmallow import ValidationError, fields, validate

from .. import views as job_views
from .. import views_registries as registry_views
from ..access import client_named, is_admin
from ..app import problem
from ..errors import ImagepubError, NotFound, Unauthorized, ValidationFailed
from ..http import ctx, load_query
from ..jobstore import TERMINAL_STATES
from ..schemas import JobListQuery, PageQuery, field_errors
from ..views_audit import decision
from . import numbers, present, security
from .sessions import Session, Sessions

log = logging.getLogger(__name__)
console = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

PAGE_SIZE = 25
# A list filtered by registry or repository (no index for those) reads at most this many jobs
# per page, each once; a page that found fewer matches says how far it looked and goes on.
FILTER_SCAN = 500
SIGN_IN_SECONDS = 600
PUBLIC_ENDPOINTS = {"console.sign_in", "console.sign_in_form", "console.static"}
DATA_ENDPOINTS = {"console.job_rows", "console.job_state", "console.job_events"}


class JobsQuery(JobListQuery):
    """``GET /v1/jobs``'s query, and what the console filters by besides."""

    limit = fields.Integer(load_default=PAGE_SIZE, validate=validate.Range(min=1, max=100))
    client = fields.String(validate=validate.Length(min=1, max=63))
    registry = fields.String(validate=validate.Length(min=1, max=63))
    repository = fields.String(validate=validate.Length(min=1, max=255))


# --- who is signed in ------------------------------------------------------------------------


def _sessions() -> Sessions:
    services = ctx()
    if "console_sessions" not in services:
        store = services["store"]
        services["console_sessions"] = Sessions(store.redis, store.prefix, services["settings"].console)
    return services["console_sessions"]


def _secure() -> bool:
    return security.browser_used_tls(request, ctx()["settings"].console.trusted_proxies)


def authenticate() -> None:
    """The app's authentication hook for console requests: the client of the session cookie,
    if it names a live session whose token still belongs to that client."""
    cookie = request.cookies.get(security.cookie_name(security.SESSION_COOKIE, _secure()))
    session = _sessions().get(cookie)
    if session is None:
        return
    client = client_named(ctx()["settings"], session.client)
    if client is None or not hmac.compare_digest(client.token_sha256, session.token_sha256):
        _sessions().delete(session.id)  # its token was revoked or rotated: the session ends with it
        return
    g.client, g.console_session = client, session


def _signed_in() -> Session | None:
    return g.get("console_session")


@console.before_request
def _require_session():
    if request.endpoint in PUBLIC_ENDPOINTS or _signed_in() is not None:
        return None
    if not _wants_html() or request.method != "GET":
        raise Unauthorized("sign in to the console first")
    if request.method == "GET" and request.headers.get("Sec-Fetch-Site") == "cross-site":
        # A SameSite=Strict cookie stays home when a link from another site is followed: look
        # again from this page, which sends it, before asking to sign in.
        return render_template("bounce.html", target=request.full_path if request.query_string else request.path)
    return redirect(url_for("console.sign_in_form", next=request.full_path if request.query_string else request.path), 303)


@console.after_request
def _headers(response: Response) -> Response:
    return security.add_headers(response)


@console.context_processor
def _page_context() -> dict[str, Any]:
    session = _signed_in()
    return {"client": g.get("client") if session else None, "csrf_token": session.csrf if session else None,
            "is_admin": bool(session) and is_admin(g.client)}


def _wants_html() -> bool:
    """Pages answer in HTML, errors included; the endpoints their scripts read, as the API does."""
    return request.endpoint not in DATA_ENDPOINTS


@console.errorhandler(ImagepubError)
def _error_page(exc: ImagepubError):
    """Console pages answer errors as pages (the same status and code); their data endpoints as
    the API does, problem+json."""
    g.problem_code = exc.code  # for the audit trail's record of a refused cancel
    if not _wants_html():
        resp = problem(exc.status, exc.code, exc.title, exc.message, **({"errors": exc.errors} if getattr(exc, "errors", None) else {}))
        resp.headers.update(getattr(exc, "headers", {}))
        return resp
    page = render_template("error.html", error=exc), exc.status
    return page


# --- signing in and out ----------------------------------------------------------------------


def _next_page(value: str | None) -> str:
    """Where to go after signing in: a console path only, never another site."""
    if not value:
        return url_for("console.jobs")
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui/") or "\\" in value or value.startswith("//"):
        return url_for("console.jobs")
    return value


@console.get("/", strict_slashes=False)  # /ui and /ui/ alike, without a redirect to authenticate first
def index():
    return redirect(url_for("console.jobs"), 303)


@console.get("/sign-in")
def sign_in_form():
    if _signed_in() is not None:
        return redirect(_next_page(request.args.get("next")), 303)
    return _sign_in_page(request.args.get("next"))


def _sign_in_page(next_page: str | None, error: str | None = None, status: int = 200) -> Response:
    nonce = secrets.token_urlsafe(32)
    anonymous = ctx()["authenticator"].anonymous
    resp = Response(render_template("sign_in.html", nonce=nonce, next_page=_next_page(next_page), error=error,
                                    anonymous=anonymous), status=status, mimetype="text/html")
    security.set_cookie(resp, security.SIGN_IN_COOKIE, nonce, secure=_secure(), max_age=SIGN_IN_SECONDS)
    return resp


@console.post("/sign-in")
def sign_in():
    security.check_origin(request)
    security.check_token(request.form.get("csrf_token"),
                         request.cookies.get(security.cookie_name(security.SIGN_IN_COOKIE, _secure())))
    token = request.form.get("token", "").strip()
    try:
        client = ctx()["authenticator"].authenticate(f"Bearer {token}")
    except Unauthorized:
        return _sign_in_page(request.form.get("next"), error="That API token is not valid.", status=401)
    session = _sessions().create(client)
    resp = redirect(_next_page(request.form.get("next")), 303)
    security.set_cookie(resp, security.SESSION_COOKIE, session.id, secure=_secure(), max_age=None)
    security.clear_cookie(resp, security.SIGN_IN_COOKIE, secure=_secure())
    return resp


@console.post("/sign-out")
def sign_out():
    _check_form()
    _sessions().delete(_signed_in().id)
    resp = redirect(url_for("console.sign_in_form"), 303)
    security.clear_cookie(resp, security.SESSION_COOKIE, secure=_secure())
    return resp


def _check_form() -> None:
    security.check_origin(request)
    security.check_token(request.form.get("csrf_token"), _signed_in().csrf)


# --- jobs ----------------------------------------------------------------------------------


def _jobs_query() -> dict[str, Any]:
    # the filter form sends every field, the empty ones as "any"
    try:
        query = JobsQuery().load({k: v for k, v in request.args.items() if v != ""})
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc.messages)) from None
    if not is_admin(g.client):
        query.pop("client", None)  # a client's list is its own jobs, as through the API
    return query


def _job_rows(query: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, int | None]:
    """The page's jobs (newest first), the next page's cursor, and, when filtered by registry
    or repository, how many jobs were read to find them."""
    listing = {k: query[k] for k in ("state", "kind", "cursor") if k in query}
    owner = query.get("client")
    if not (query.get("registry") or query.get("repository")):
        jobs, cursor = job_views.job_page({**listing, "limit": query["limit"]}, owner)
        return jobs, cursor, None
    found: list[dict[str, Any]] = []
    scanned, cursor = 0, query.get("cursor")
    while len(found) < query["limit"] and scanned < FILTER_SCAN:
        batch, more = job_views.job_page({**listing, "cursor": cursor, "limit": min(100, FILTER_SCAN - scanned)} if cursor
                                         else {**listing, "limit": min(100, FILTER_SCAN - scanned)}, owner)
        for job in batch:
            scanned, cursor = scanned + 1, job["id"]
            if present.matches(job, query.get("registry"), query.get("repository")):
                found.append(job)
                if len(found) == query["limit"]:
                    break
        else:
            if more is None:
                return found, None, scanned
    return found, cursor, scanned


def _waiting(jobs: list[dict[str, Any]]) -> None:
    """``waiting_for`` of queued jobs whose daemon has no worker: one read of the fleet's
    workers for the whole page, not one per job."""
    daemons = {job["daemon"] for job in jobs if job["state"] == "queued" and job.get("daemon")}
    if not daemons:
        return
    alive = {w.get("daemon") for w in ctx()["fleet"].workers() if w["alive"]}
    for job in jobs:
        if job["state"] == "queued" and job.get("daemon") and job["daemon"] not in alive:
            job["waiting_for"] = f"daemon {job['daemon']} has no worker"


@console.get("/jobs")
def jobs():
    query = _jobs_query()
    found, cursor, scanned = _job_rows(query)
    _waiting(found)
    filters = {k: v for k, v in query.items() if k not in ("cursor", "limit") and v}
    return render_template(
        "jobs.html", rows=[present.row(job) | {"waiting_for": job.get("waiting_for")} for job in found],
        filters=filters, scanned=scanned, next_url=url_for("console.jobs", cursor=cursor, **filters) if cursor else None,
        rows_url=url_for("console.job_rows", **{k: v for k, v in request.args.items() if v != ""}), first_page="cursor" not in query,
        kinds=JobListQuery().fields["kind"].validate.choices, states=JobListQuery().fields["state"].validate.choices,
        registries=sorted(ctx()["settings"].registries),
        clients=sorted(c.name for c in ctx()["settings"].clients) if is_admin(g.client) else [],
    )


@console.get("/jobs/rows")
def job_rows():
    """The list's rows as JSON, for its live updates (the same query, the same reads)."""
    query = _jobs_query()
    found, cursor, _ = _job_rows(query)
    _waiting(found)
    return jsonify({"rows": [present.row(job) | {"waiting_for": job.get("waiting_for"),
                                                  "url": url_for("console.job", job_id=job["id"])} for job in found],
                    "next_cursor": cursor})


@console.get("/jobs/<job_id>")
def job(job_id: str):
    found = job_views.visible_job(job_id)
    cancel_requested = found["state"] == "running" and ctx()["store"].cancel_requested(job_id)
    return render_template(
        "job.html", job=found, row=present.row(found), timeline=present.timeline(found),
        advice=present.advice((found.get("error") or {}).get("code")), fraction=present.layer_fraction,
        request_json=json.dumps(found.get("request"), indent=2, sort_keys=True),
        cancellable=found["state"] not in TERMINAL_STATES and not cancel_requested, cancel_requested=cancel_requested,
        live=found["state"] not in TERMINAL_STATES,
    )


@console.get("/jobs/<job_id>/state")
def job_state(job_id: str):
    """The job as ``GET /v1/jobs/{id}`` answers it: the page's fallback when it cannot follow
    the event stream (every stream slot of this API process taken)."""
    return jsonify(job_views.visible_job(job_id))


@console.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    """The job's live events: ``GET /v1/jobs/{id}/events`` itself, authenticated by the session."""
    return job_views.job_events(job_id)


@console.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):
    _check_form()
    g.cancel_answer = job_views.cancel_job(job_id)  # the API's cancel: ownership, outcome, errors (409 job_finished)
    return redirect(url_for("console.job", job_id=job_id), 303)


@console.after_request
def _audit_cancel(response: Response) -> Response:
    """A cancel through the console is a decision on a submission like one through the API: the
    audit trail records it the same way (service/views_audit.py), with the API's own answer."""
    if request.endpoint == "console.cancel":
        try:
            ctx()["audit"].record(decision("cancel", g.get("cancel_answer") or response))
        except Exception:  # the answer stands whatever happens here, as for the API's own hook
            log.exception("audit entry not recorded for a console cancel")
    return response


# --- the fleet and the registries ----------------------------------------------------------


@console.get("/fleet")
def fleet():
    daemons = registry_views.visible_daemons()
    store = ctx()["store"]
    own = None if is_admin(g.client) else g.client.name
    workers = ctx()["fleet"].workers() if is_admin(g.client) else []
    return render_template(
        "fleet.html", daemons=daemons, last_hour=numbers.last_hour(store, own), totals=numbers.registry_numbers(store),
        queued=store.queue_depth(), daemonless=[w for w in workers if not w.get("daemon")], own_jobs=own is not None,
    )


@console.get("/registries")
def registries():
    return render_template("registries.html", registries=registry_views.configured_registries())


@console.get("/registries/<registry>")
def registry(registry: str):
    configured = next((r for r in registry_views.configured_registries() if r["name"] == registry), None)
    if configured is None:
        raise NotFound(f"no registry named {registry!r} is configured", code="registry_not_configured")
    page = load_query(_PageQuery())
    answer = registry_views.repositories_page(registry, page["limit"], page.get("cursor")) if configured["type"] == "ecr" else None
    return render_template("registry.html", registry=configured, answer=answer, page_args=_next(answer, "repositories"))


@console.get("/registries/<registry>/repositories/<path:repository>")
def repository(registry: str, repository: str):
    page = load_query(_PageQuery())
    settings = registry_views.repository(registry, repository)
    images = registry_views.repository_images(registry, repository, page["limit"], page.get("cursor"))
    return render_template("repository.html", registry=registry, repository=settings, images=images,
                           page_args=_next(images, "images"))


def _next(answer: dict[str, Any] | None, key: str) -> str | None:
    if not answer or not answer.get("next_cursor"):
        return None
    return "?" + urlencode({"cursor": answer["next_cursor"]})


class _PageQuery(PageQuery):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=100))

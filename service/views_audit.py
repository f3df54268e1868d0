"""The audit trail over HTTP: ``GET /v1/audit``, and the hook that records every decision on a
submission (service/audit.py keeps them).

Decisions are recorded in one place, after the answer is made, whatever made it: the view, the
authentication or the rate limiter before it, or an error handler (which leaves the problem's
code on ``g``: service/app.py). A refused request's entry has its status and code, never what
it sent: that was not validated and could hold anything, a secret pasted by mistake included.
An accepted one names what the API validated and stored: the job's source, targets and places.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request, url_for
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from . import audit as trail
from .auth import require_scope
from .errors import ImagepubError
from .http import ctx, load_query, parse_json
from .jobstore import is_job_id
from .schemas import DIGEST_RE, CopySchema

log = logging.getLogger(__name__)
audit = Blueprint("audit", __name__)

# The submissions whose decisions are recorded: endpoint → action.
SUBMISSIONS = {
    "jobs.publish": "publish", "jobs.pull": "pull", "jobs.build": "build", "jobs.copy": "copy",
    "jobs.cancel_job": "cancel", "registries.create_repository": "create_repository",
}


# RFC 3339's date-time (what the contract's `format: date-time` means), any offset, any
# precision: fromisoformat and marshmallow each refuse some of it (lowercase t and z, nanoseconds).
RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
                     r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))", re.ASCII)


class Rfc3339(fields.Field):
    def _deserialize(self, value, attr, data, **kwargs) -> datetime:
        match = RFC3339.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise ValidationError("an RFC 3339 date-time, e.g. 2025-01-31T12:00:00Z")
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        micro = int((match.group(7) or "0")[:6].ljust(6, "0"))
        offset = timedelta(0) if match.group(8) else (1 if match.group(9) == "+" else -1) * timedelta(
            hours=int(match.group(10)), minutes=int(match.group(11)))
        try:  # a leap second is the second before it; year 0 is the first year Python knows
            moment = datetime(max(year, 1), month, day, hour, minute, min(second, 59), micro, tzinfo=timezone(offset))
        except ValueError as exc:
            raise ValidationError(f"not a date-time: {exc}") from None
        return moment


def _cursor(value: str) -> None:
    if not trail.is_stream_id(value):
        raise ValidationError("not a cursor from a previous page")


def _job_id(value: str) -> None:
    if not is_job_id(value):
        raise ValidationError("not a job id")


class AuditQuery(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(validate=_cursor)
    client = fields.String(validate=validate.Length(min=1, max=63))
    registry = fields.String(validate=validate.Length(min=1, max=63))
    repository = fields.String(validate=[validate.Length(min=1, max=255),
                                          validate.Regexp(r"[a-z0-9._/*?\[\]-]+\Z", error="a repository name or glob pattern")])
    digest = fields.String(validate=validate.Regexp(DIGEST_RE, error="sha256: and 64 lowercase hex digits"))
    action = fields.String(validate=validate.OneOf(trail.ACTIONS))
    outcome = fields.String(validate=validate.OneOf(trail.OUTCOMES))
    job = fields.String(validate=_job_id)
    since = Rfc3339()
    until = Rfc3339()


@audit.get("/v1/audit")
def list_audit():
    """Newest first; the scope ``audit`` (or ``admin``) reads the whole trail."""
    require_scope("audit")
    query = load_query(AuditQuery())
    limit, cursor = query.pop("limit"), query.pop("cursor", None)
    entries, next_cursor = ctx()["audit"].page(trail.Query(**query), limit, cursor)
    resp = jsonify({"entries": entries, "next_cursor": next_cursor})
    if next_cursor:
        args = {k: v for k, v in request.args.items() if k != "cursor"}
        resp.headers["Link"] = f'<{url_for("audit.list_audit", cursor=next_cursor, **args)}>; rel="next"'
    return resp


# --- recording decisions ------------------------------------------------------------------------


def _places(action: str, body: Any) -> dict[str, Any]:
    """What an accepted submission's answer (the job, or the created repository) says it is
    about: the API validated all of it before storing it."""
    if not isinstance(body, dict):
        return {}
    if action == "create_repository":
        return {"registry": request.view_args.get("registry"), "repository": body.get("name")}
    places: dict[str, Any] = {"job_id": body.get("id")}
    asked = body.get("request") or {}
    if action == "publish":  # an image in a daemon, or an uploaded archive (by its sha256)
        archive = body.get("archive") or {}
        places["source"] = asked.get("source") or (f"{archive.get('format')} sha256:{archive['sha256']}" if archive.get("sha256") else None)
    if action == "pull":
        places.update(registry=asked.get("registry"), repository=asked.get("repository"), tag=asked.get("tag"),
                      digest=asked.get("digest"))
    if action == "copy":
        source = asked.get("source") or {}
        places.update(registry=source.get("registry"), repository=source.get("repository"), tag=source.get("tag"),
                      digest=source.get("digest"))
    if asked.get("targets"):
        places["targets"] = [{"registry": t["registry"], "repository": t["repository"], "tags": t["tags"]} for t in asked["targets"]]
    return places


def _refused_about(action: str, response: Response) -> dict[str, Any]:
    """The little a refused request is recorded with beyond its code: what its path names,
    once it proved well-formed (a job id; a configured registry); and for a client refused a
    repository or a source (a 403 naming fields: the view had read and validated the body by
    then), the places the body names (names of the reference grammar; configured registries)."""
    args, registries = request.view_args or {}, ctx()["settings"].registries
    if action == "cancel" and is_job_id(args.get("job_id", "")):
        return {"job_id": args["job_id"]}
    if action == "create_repository" and args.get("registry") in registries:
        return {"registry": args["registry"]}
    named_fields = response.status_code == 403 and (response.get_json(silent=True) or {}).get("errors")
    if not named_fields or action not in _SCHEMAS or not request.is_json:
        return {}
    try:
        asked = _SCHEMAS[action](ctx()).load(parse_json(request.get_data(), "body"))  # read already: cached
    except (ImagepubError, ValidationError, TypeError):
        return {}
    places = _places(action, {"request": asked})
    places.pop("job_id", None)
    if places.get("registry") not in registries:
        places.pop("registry", None)
    for target in places.get("targets") or []:
        target["registry"] = target["registry"] if target["registry"] in registries else None
    return places


# How a refused body is read again to see whether it names anything worth recording.
_SCHEMAS = {
    "publish": lambda services: services["schemas"]["publish"],
    "pull": lambda services: services["schemas"]["pull"],
    "copy": lambda services: CopySchema(limits=services["settings"].limits),
}


def _entry(action: str, status: int) -> dict[str, Any]:
    client = g.get("client")
    return {"action": action, "client": client.name if client else None, "request_id": g.get("request_id"), "status": status}


def accepted_job(job: dict[str, Any]) -> dict[str, Any] | None:
    """The entry that records this request's submission accepted as ``job`` (what its 202
    answers), written with the job itself (AuditLog.create_job); None when this endpoint's
    decisions are not recorded. Once it is written, the view sets ``g.audit_decided`` and the
    request's own decision is not recorded again."""
    action = SUBMISSIONS.get(request.endpoint or "")
    if action is None:
        return None
    return {**_entry(action, 202), "outcome": "accepted", **_places(action, job)}


def decision(action: str, response: Response) -> dict[str, Any]:
    entry = _entry(action, response.status_code)
    if response.status_code < 400:
        entry["outcome"] = "accepted"
        entry.update(_places(action, response.get_json(silent=True)))
        return entry
    entry.update(outcome="refused", code=g.get("problem_code") or "http_error")
    if response.status_code == 401:  # no client to name: say why, never what was presented
        entry["reason"] = "token_invalid" if request.headers.get("Authorization") else "token_missing"
    entry.update(_refused_about(action, response))
    return entry


def install(app: Flask) -> None:
    """The endpoint, the store beside the job store, and the recording hook."""
    settings, store = app.extensions["imagepub"]["settings"], app.extensions["imagepub"]["store"]
    app.extensions["imagepub"]["audit"] = trail.for_store(store, settings)

    @app.after_request
    def _record_decision(response: Response) -> Response:
        action = SUBMISSIONS.get(request.endpoint or "")
        if action is None or request.method != "POST" or (g.get("audit_decided") and response.status_code == 202):
            return response
        try:
            ctx()["audit"].record(decision(action, response))
        except Exception:  # the answer stands whatever happens here; record() logs Redis trouble itself
            log.exception("audit entry not recorded for %s", request.endpoint)
        return response

"""What a job is: the record a caller reads, made from a validated request.

The record is the one shape both sides share. The API creates it (``queued``); the worker moves
it through ``running`` (and ``retrying``) to exactly one terminal state and fills in per-target
results.
"""

from __future__ import annotations

from typing import Any

from .jobstore import new_job_id, utcnow


def new_job(kind: str, request: dict[str, Any]) -> dict[str, Any]:
    now = utcnow()
    job: dict[str, Any] = {
        "id": new_job_id(),
        "kind": kind,
        "state": "queued",
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "attempts": 0,
        "next_attempt_at": None,
        "request": request,
        "error": None,
        "last_error": None,
    }
    if kind in ("publish", "build", "copy"):
        job["targets"] = [
            {
                "registry": t["registry"],
                "repository": t["repository"],
                "tags": t["tags"],
                "state": "pending",
                "references": [],
                "digest": None,
                "size": None,
                "layers": [],
                "repository_created": False,
            }
            for t in request["targets"]
        ]
    else:
        job["result"] = None
    if kind == "build":
        job["build"] = {"image_id": None, "log": [], "log_truncated": False}
    if kind == "copy":
        # what the source resolved to (its digest, the platforms copied), once the worker knows
        job["source"] = None
        for target in job["targets"]:
            target.update(manifests=[], signatures=[])
    return job

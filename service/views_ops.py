"""Operations endpoints: liveness, readiness, metrics, the spec (no token needed)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from prometheus_client import CONTENT_TYPE_LATEST

from .http import ctx
from .jobstore import WORKER_HEARTBEAT_MAX_AGE
from .metrics import render

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@ops.get("/readyz")
def readyz():
    store = ctx()["store"]
    checks: dict[str, dict[str, Any]] = {}
    try:
        store.ping()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "detail": f"Redis does not answer ({exc.__class__.__name__})"}
    if checks["redis"]["ok"]:
        workers = store.live_workers()
        checks["workers"] = {"ok": bool(workers), "live": len(workers)}
        if not workers:
            checks["workers"]["detail"] = f"no worker heartbeat in the last {WORKER_HEARTBEAT_MAX_AGE:.0f} s"
        # each daemon: informational (a daemon without a worker holds up its own jobs only)
        daemons = ctx()["fleet"].daemons()
        checks["daemons"] = {"ok": True, "up": sorted(d.name for d in daemons if d.up),
                             "down": sorted(d.name for d in daemons if not d.up)}
    else:
        checks["workers"] = {"ok": False, "detail": "unknown while Redis is unavailable"}
    ready = all(c["ok"] for c in checks.values())
    resp = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    resp.status_code = 200 if ready else 503
    return resp


@ops.get("/metrics")
def metrics():
    return Response(render(ctx()["store"]), mimetype=CONTENT_TYPE_LATEST)


@ops.get("/openapi.yaml")
def openapi_spec():
    daemons = tuple(sorted(d.name for d in ctx()["fleet"].daemons()))
    return Response(ctx()["spec"](daemons), mimetype="application/yaml")

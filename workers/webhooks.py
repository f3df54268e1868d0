"""Webhooks: when a job ends, POST it to the job's ``callback_url``.

The body is the job record as ``GET /v1/jobs/{id}`` returns it, signed with HMAC-SHA256 of the
exact body bytes (``X-Imagepub-Signature: sha256=<hex>``) with the secret named by
``webhooks.secret_env``. Redirects are never followed; the URL is checked again for internal
addresses just before each delivery. Failures worth retrying (connection errors, timeouts, 408,
429, 5xx) are retried with exponential backoff and jitter up to ``webhooks.max_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from typing import Any

import requests

from service.callbacks import CallbackRefused, check_callback_url

from .deps import Deps
from .jobs import backoff

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(job_id: str, deps: Deps, attempt: int) -> float | None:
    """Deliver once. Returns the delay before the next attempt, or None when done (delivered,
    refused for good, or out of attempts)."""
    job: dict[str, Any] | None = deps.store.get(job_id)
    if job is None or not job["request"].get("callback_url"):
        return None
    url = job["request"]["callback_url"]
    context = {"job_id": job_id, "attempt": attempt}
    try:
        check_callback_url(url, deps.settings.webhooks.allowed_hosts, must_resolve=True)
    except CallbackRefused as exc:
        log.warning("webhook refused: %s", exc, extra=context)
        return None
    body = json.dumps(job, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "imagepub-webhook/1",
        "X-Imagepub-Event": f"job.{job['state']}",
        "X-Imagepub-Delivery": str(uuid.uuid4()),
    }
    secret = deps.settings.webhook_secret()
    if secret:
        headers["X-Imagepub-Signature"] = sign(secret, body)
    try:
        resp = requests.post(url, data=body, headers=headers, timeout=deps.settings.webhooks.timeout_seconds, allow_redirects=False)
        status = resp.status_code
        resp.close()
    except requests.RequestException as exc:
        status, reason = None, exc.__class__.__name__
    else:
        reason = f"HTTP {status}"
    if status is not None and 200 <= status < 300:
        log.info("webhook delivered", extra={**context, "status": status})
        deps.store.metrics.incr("imagepub_webhook_deliveries", outcome="delivered")
        return None
    if (status is None or status in RETRYABLE_STATUS) and attempt < deps.settings.webhooks.max_attempts:
        delay = max(1.0, backoff(attempt, 2.0, 300.0))
        log.warning("webhook failed (%s); retrying", reason, extra={**context, "delay": round(delay, 1)})
        deps.store.metrics.incr("imagepub_webhook_deliveries", outcome="retried")
        return delay
    log.warning("webhook failed (%s); giving up", reason, extra=context)
    deps.store.metrics.incr("imagepub_webhook_deliveries", outcome="failed")
    return None

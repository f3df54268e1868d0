"""Webhooks: when a job ends, POST it to the job's ``callback_url``.

The body is the job record as ``GET /v1/jobs/{id}`` returns it, signed with HMAC-SHA256 of the
exact body bytes (``X-Imagepub-Signature: sha256=<hex>``) with the secret named by
``webhooks.secret_env``. ``X-Imagepub-Delivery`` is the same for every attempt at one job's end
(a UUIDv5 of the job id and its terminal state): delivery is at least once, and a receiver
de-duplicates by it. Redirects are never followed; the URL is checked again for internal
addresses just before each delivery, and the delivery connects to the addresses that passed.
One delivery ends within ``webhooks.timeout_seconds`` whatever the peer does (see
``webhook_http``). Failures worth retrying (no answer in time, connection errors, a name that
does not resolve, 408, 425, 429, 5xx) are retried with exponential backoff and jitter up to
``webhooks.max_attempts``; the outbox (``outbox.py``) keeps the count and the schedule.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

from service.callbacks import CallbackRefused, CallbackUnresolvable, check_callback_url
from service.config import Settings
from service.jobstore import JobStore

from . import webhook_http
from .jobs import backoff

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Never change it: receivers de-duplicate by the delivery ids derived from it.
DELIVERY_NAMESPACE = uuid.UUID("5b0f7d3e-2c1a-4e59-9a6b-7f3c1d2e8a40")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(job_id: str, state: str) -> str:
    """The ``X-Imagepub-Delivery`` of a job's end: the same on every attempt and redelivery."""
    return str(uuid.uuid5(DELIVERY_NAMESPACE, f"{job_id}:{state}"))


def _request(job: dict[str, Any], settings: Settings) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(job, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "imagepub-webhook/1",
        "X-Imagepub-Event": f"job.{job['state']}",
        "X-Imagepub-Delivery": delivery_id(job["id"], job["state"]),
    }
    secret = settings.webhook_secret()
    if secret:
        headers["X-Imagepub-Signature"] = sign(secret, body)
    return body, headers


def _exchange(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> tuple[int | None, str]:
    """(the receiver's status or None, why) of one attempt, within the delivery's deadline.
    Raises :class:`CallbackRefused` when the URL may not be called."""
    timeout = settings.webhooks.timeout_seconds
    deadline = webhook_http.Deadline(timeout)
    try:
        addresses = check_callback_url(url, settings.webhooks.allowed_hosts, must_resolve=True,
                                       resolve=webhook_http.resolver(deadline))
        status = webhook_http.post(url, addresses, body, headers, deadline)
    except CallbackUnresolvable as exc:
        return None, str(exc)
    except webhook_http.DeliveryTimeout:
        return None, f"no answer within webhooks.timeout_seconds ({timeout:g} s)"
    except OSError as exc:  # refused, reset, TLS failures, a reply that is not HTTP
        return None, exc.__class__.__name__
    except CallbackRefused:
        raise
    except ValueError as exc:  # a URL no connection can be made to (a port out of range, a bad name)
        raise CallbackRefused(str(exc)) from None
    return status, f"HTTP {status}"


def deliver(job_id: str, store: JobStore, settings: Settings, attempt: int) -> float | None:
    """Attempt ``attempt`` at ``job_id``'s webhook. Returns the delay before the next attempt,
    or None when done (delivered, refused for good, or out of attempts)."""
    job = store.get(job_id)
    if job is None or not job["request"].get("callback_url"):
        log.info("webhook dropped: the job expired or has no callback", extra={"job_id": job_id})
        return None
    context = {"job_id": job_id, "attempt": attempt}
    max_attempts = settings.webhooks.max_attempts
    if attempt > max_attempts:  # the last attempts' workers died while delivering
        log.warning("webhook given up: out of attempts", extra=context)
        store.metrics.incr("imagepub_webhook_deliveries", outcome="failed")
        return None
    body, headers = _request(job, settings)
    started = time.monotonic()
    try:
        status, reason = _exchange(job["request"]["callback_url"], body, headers, settings)
    except CallbackRefused as exc:
        log.warning("webhook refused: %s", exc, extra=context)
        store.metrics.incr("imagepub_webhook_deliveries", outcome="refused")
        return None
    context["seconds"] = round(time.monotonic() - started, 3)
    if status is not None and 200 <= status < 300:
        log.info("webhook delivered", extra={**context, "status": status})
        store.metrics.incr("imagepub_webhook_deliveries", outcome="delivered")
        return None
    if (status is None or status in RETRYABLE_STATUS) and attempt < max_attempts:
        delay = max(1.0, backoff(attempt, 2.0, 300.0))
        log.warning("webhook failed (%s); retrying", reason, extra={**context, "delay": round(delay, 1)})
        store.metrics.incr("imagepub_webhook_deliveries", outcome="retried")
        return delay
    log.warning("webhook failed (%s); giving up", reason, extra=context)
    store.metrics.incr("imagepub_webhook_deliveries", outcome="failed")
    return None

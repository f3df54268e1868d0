"""The floor of a submission in this design: a bare WSGI app, under the API's gunicorn worker,
that per request does only the storage a submission does — the service's own script, one round
trip that stores the job, its indexes and event stream, its Celery message and the audit entry
chained to the one before — and answers 202. No parsing, authentication, validation, logging or
JSON: what is left is gunicorn, the Redis client and Redis.

At start it makes one real submission through the service (``create_app()`` with the bench
service's configuration: ``IMAGEPUB_CONFIG``, ``IMAGEPUB_REDIS_URL``, and ``BENCH_TOKEN``), keeps
the script call it made, and replays that call per request with a new job id (the entry's own
SHA-256 computed again), so that every request stores a new job exactly as the service does.
"""

from __future__ import annotations

import hashlib
import os
import uuid

from service.app import create_app
from service.audit import AuditLog

_call: dict = {}


def _capture(self, store, entry, **create):
    keys, args, _ = store.create_call(**create)
    _, audit_args = self._arguments((entry,))
    _call.update(script=self._create_and_append, job_id=create["job"]["id"].encode(),
                 keys=[*keys, self.key, self.head_key, self.anchor_key], args=[len(keys), len(args), *args, *audit_args])
    return _original(self, store, entry, **create)


_original, AuditLog.create_job = AuditLog.create_job, _capture
try:
    _answer = create_app().test_client().post(
        "/v1/publish", data=os.environ["BENCH_BODY"],
        headers={"Authorization": f"Bearer {os.environ['BENCH_TOKEN']}", "Content-Type": "application/json"})
finally:
    AuditLog.create_job = _original
if _answer.status_code != 202 or not _call:
    raise RuntimeError(f"the floor's one real submission was answered {_answer.status_code}: {_answer.get_data(as_text=True)[:300]}")


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


SCRIPT, OLD_ID = _call["script"], _call["job_id"]
KEYS, ARGS = [_bytes(k) for k in _call["keys"]], [_bytes(a) for a in _call["args"]]
ENTRY = len(ARGS) - 2  # the audit entry's body, then its SHA-256 (AuditLog._arguments)


def app(environ, start_response):
    environ["wsgi.input"].read()
    job_id = str(uuid.uuid4()).encode()
    args = [a.replace(OLD_ID, job_id) for a in ARGS]
    args[ENTRY + 1] = hashlib.sha256(args[ENTRY]).digest()
    SCRIPT(keys=[k.replace(OLD_ID, job_id) for k in KEYS], args=args)
    body = b'{"id":"' + job_id + b'"}'
    start_response("202 Accepted", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

"""``GET /v1/jobs/{id}`` answered below Flask, when it is the ordinary case.

It is the request pipelines make most (every poll of every job), and Flask's request machinery
(a request context, URL routing, the hooks, a response object) cost more than the read itself
once the record comes from the process' cache (service/jobcache.py): measured with wrk on 2
cores, the same answer served this way took about a quarter less CPU (docs/benchmarks.md).

The ordinary case is a caller whose token is valid asking for a job it may see, with no rate
limit configured. Then the answer is Flask's, byte for byte: the same authentication
(service/auth.py), visibility and waiting note (service/views.py), request id
(service/request_ids.py) and JSON writer; tests/service/test_job_reads.py compares the two.
Anything else, a missing or bad token, a job that is not there or not the caller's, Redis
trouble, goes to Flask untouched, which answers it with its errors and records.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable

import redis
from flask import Flask

from . import request_ids
from .errors import ImagepubError
from .jobstore import is_job_id
from .views import may_see, note_waiting

log = logging.getLogger(__name__)

PATH = re.compile(r"/v1/jobs/([0-9a-f-]{36})")


class JobReads:
    """WSGI middleware in front of the Flask app (``app.wsgi_app``)."""

    def __init__(self, app: Flask):
        self.flask = app.wsgi_app
        ext = app.extensions["imagepub"]
        self.store, self.fleet, self.authenticator = ext["store"], ext["fleet"], ext["authenticator"]
        self.body = app.json.body
        # a rate limit is counted by flask-limiter, in Flask: every request goes there then
        self.enabled = "limiter" not in ext

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if self.enabled and environ.get("REQUEST_METHOD") == "GET":
            match = PATH.fullmatch(environ.get("PATH_INFO", ""))
            try:
                body = self._answer(environ, match[1]) if match else None
            except Exception as exc:  # anything unforeseen: Flask meets it again, answers it and logs it
                log.warning("job read left to Flask: %s", exc.__class__.__name__, extra={"path": environ.get("PATH_INFO")})
                body = None
            if body is not None:
                start_response("200 OK", [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    (request_ids.HEADER, request_ids.chosen(environ.get("HTTP_X_REQUEST_ID"))),
                ])
                return [body]
        return self.flask(environ, start_response)

    def _answer(self, environ: dict[str, Any], job_id: str) -> bytes | None:
        if not is_job_id(job_id):
            return None
        try:
            client = self.authenticator.authenticate(environ.get("HTTP_AUTHORIZATION"))
            job = self.store.get(job_id)
        except (ImagepubError, redis.RedisError):  # Flask answers it again: its 401, its 503 with Retry-After
            return None
        if job is None or not may_see(client, job):
            return None
        return self.body(note_waiting(job, self.fleet))

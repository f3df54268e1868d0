"""The API's gunicorn worker: gevent's, with a deadline on reading every request.

Why gevent (README, Design): a connection costs a greenlet, not a thread, so neither a crowd
of slow clients nor a thousand live event streams can take every worker's capacity, and the
head of each request is read under gevent's own timeout (``keepalive`` seconds, idle time
included: see ``AsyncWorker.handle``). What gevent's worker leaves unbounded is the body, which
the application reads when it likes; this module bounds it:

* a body must keep arriving: ``BODY_GRACE_SECONDS``, plus one second for every
  ``BODY_MIN_RATE`` bytes received (Apache's ``mod_reqtimeout`` rule), so a large upload on a
  slow link gets its time, and a body trickled a byte a second is dropped after the grace;
  past the deadline the application sees a 408;
* a response that starts before its request's body was read to the end closes the connection.
  gunicorn would otherwise read the rest to find the next request, and a fast sender never
  makes a gevent socket wait, so no timeout could stop that read.

And what gunicorn answers itself (a request line or headers past its limits, a request it cannot
parse, an exception that escaped the application) is problem+json with a stable code, as every
other answer of the API, instead of gunicorn's HTML page.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import gevent
from gunicorn import glogging, util
from gunicorn.http.body import LengthReader
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from .errors import UNEXPECTED, problem_document

BODY_GRACE_SECONDS = 10.0
BODY_MIN_RATE = 64 * 1024  # bytes per second, on average, once the grace is spent


class RequestBody:
    """``wsgi.input``: gunicorn's body of one request, read against a deadline, and knowing
    whether it has been read to its end."""

    def __init__(self, req: Any, started: float):
        self.req = req
        self._body = req.body
        self._started = started
        self._received = 0
        reader = req.body.reader
        # Content-Length says where the body ends; a chunked body ends with its last chunk.
        self._left = reader.length if isinstance(reader, LengthReader) else None
        self.finished = self._left == 0

    def _read(self, method: Callable[..., Any], *args: Any) -> Any:
        deadline = self._started + BODY_GRACE_SECONDS + self._received / BODY_MIN_RATE
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        with gevent.Timeout(remaining, self._timed_out()):
            data = method(*args)
        self._account(data)
        return data

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"the request body did not arrive in time (at least {BODY_MIN_RATE} bytes a second after {BODY_GRACE_SECONDS:.0f} s)")

    def _account(self, data: bytes | list[bytes]) -> None:
        size = len(data) if isinstance(data, bytes) else sum(map(len, data))
        self._received += size
        if self._left is not None:
            self._left -= size
        if not data or self._left == 0:
            self.finished = True

    def read(self, size: int | None = None) -> bytes:
        if size == 0:
            return b""
        return self._read(self._body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        if size == 0:
            return b""
        return self._read(self._body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        lines = self._read(self._body.readlines, size)
        self.finished = True  # gunicorn's readlines() reads to the end
        return lines

    def __iter__(self) -> "RequestBody":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def close_unless_body_read(app: Callable) -> Callable:
    """The WSGI app, answering with ``Connection: close`` when it answers before reading its
    request's body to the end (a refusal such as 413, or an endpoint that takes no body)."""

    def wsgi(environ: dict[str, Any], start_response: Callable) -> Any:
        body = environ["wsgi.input"]

        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            if isinstance(body, RequestBody) and not body.finished:
                body.req.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wsgi


# What gunicorn answers itself, before a request reaches the application (gunicorn.workers.base
# Worker.handle_error): a request line or headers past its limits, a request it cannot parse, an
# exception that escaped the application. The codes these answers carry.
GUNICORN_PROBLEMS = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """``gunicorn.util.write_error``, answering as the API does everywhere else: RFC 9457
    problem details with a stable ``code`` (gunicorn's own writes an HTML page). Its caller has
    logged the refusal, or the exception with its traceback."""
    code = GUNICORN_PROBLEMS.get(status_int, "bad_request")
    detail = mesg or (UNEXPECTED if status_int >= 500 else reason)
    body = json.dumps(problem_document(status_int, code, reason, detail)).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class ApiWorker(GeventWorker):
    """``worker_class`` of ``imagepub serve`` (service/gunicorn_conf.py)."""

    def init_process(self) -> None:
        # gunicorn's refusals (Worker.handle_error) are written by util.write_error: in this
        # worker process, ours. Set here, after the fork, so the arbiter is left as it is.
        util.write_error = write_problem
        super().init_process()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.keepalive <= 0:
            # AsyncWorker reads a request's head under timeout_ctx() only when keep-alive is on.
            raise RuntimeError("imagepub's API worker needs keepalive > 0: it bounds the time to read a request's head")

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = close_unless_body_read(self.wsgi)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        req.body = RequestBody(req, time.monotonic())
        super().handle_request(listener_name, req, sock, addr)


class AccessLogger(glogging.Logger):
    """gunicorn's logger, with an access line built from what it says (service/logs.py
    JsonLines: remote, method, path, status, bytes, duration, request id) instead of gunicorn's
    every atom: each request and response header, and the whole WSGI environ, for every request.
    Measured with wrk on 2 cores: GET /v1/jobs/{id} served 1.25-1.4× as many requests a second
    with this logger as with gunicorn's, the lines alike."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict[str, Any]:
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        atoms = {
            "h": environ.get("REMOTE_ADDR", "-"), "m": environ.get("REQUEST_METHOD"), "U": environ.get("PATH_INFO"),
            "s": status, "B": getattr(resp, "sent", None),
            "D": request_time.seconds * 1_000_000 + request_time.microseconds,
        }
        for name, value in resp.headers:
            if name.lower() == "x-request-id":
                atoms["{x-request-id}o"] = value
        return atoms

"""Hostile clients against the real ``imagepub serve`` (gunicorn and its worker class, as
deployed), over raw sockets where a well-behaved client library would not misbehave enough:
issue 18, items 1 (slow clients), 6 (deeply nested JSON) and 7 (bodies over the limit)."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from helpers import assert_conforms
from service.gunicorn_conf import keepalive as HEAD_SECONDS
from service.gunicorn_worker import BODY_GRACE_SECONDS

BODY_LIMIT = 64 * 1024  # limits.max_body_bytes: the session service runs with the default
BUILD_LIMIT = 50 * 1024 * 1024 + BODY_LIMIT  # max_context_bytes + max_body_bytes
SLACK = 4.0  # a shared 2-core machine: how late a deadline may act

PUBLISH = {"source": "app:1", "targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]}
PULL = {"registry": "local", "repository": "team/app", "tag": "1"}
REPOSITORY = {"name": "team/app"}
BUILD = {"targets": [{"registry": "local", "repository": "team/app", "tags": ["1"]}]}
JSON_ENDPOINTS = [("/v1/publish", PUBLISH), ("/v1/pull", PULL), ("/v1/registries/ecr/repositories", REPOSITORY)]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self, method: str, path: str, status: int, code: str) -> dict:
        """Assert this is the problem+json ``code`` with ``status`` the contract allows."""
        assert self.status == status, (self.status, self.body[:300])
        mimetype = self.headers["content-type"].split(";")[0]
        assert mimetype == "application/problem+json"
        assert_conforms(method, path, self.status, self.headers, self.body, mimetype)
        problem = json.loads(self.body)
        assert problem["code"] == code, problem
        return problem


def parse_response(data: bytes) -> Response | None:
    """The first HTTP response in ``data`` (Content-Length framed), or None if incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    if len(rest) < length:
        return None
    return Response(int(lines[0].split()[1]), headers, rest[:length])


def read_response(sock: socket.socket, timeout: float) -> tuple[Response | None, bool]:
    """(the response, whether the server then closed the connection), within ``timeout``."""
    sock.settimeout(timeout)
    data, closed = b"", False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        if parse_response(data) is not None and "close" not in data.partition(b"\r\n\r\n")[0].lower().decode("latin-1"):
            break  # a kept-alive connection: nothing more to wait for
    return parse_response(data), closed


def connect(service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10)


def head(method: str, path: str, **headers: str | int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: imagepub"] + [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def padded(document: dict, size: int) -> bytes:
    """``document`` as JSON of exactly ``size`` bytes."""
    text = json.dumps(document)
    return (text[:-1] + " " * (size - len(text)) + "}").encode()


def multipart_head(boundary: str, request: bytes) -> bytes:
    """A build's `request` part, and the start of its `context` part."""
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\nContent-Type: application/json\r\n\r\n".encode()
            + request + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"context\"; filename=\"c.tar\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode())


# --- item 1: slow clients -----------------------------------------------------------------------

# What each kind sends at once, then again every second (None: nothing more, ever).
SLOW_KINDS = {
    "head never finished": (b"GET /healthz HTTP/1.1\r\n", None, HEAD_SECONDS),
    "head trickled": (b"GET /healthz HTTP/1.1\r\nHost: imagepub\r\nX-Slow: ", b"a", HEAD_SECONDS),
    "body trickled, Content-Length": (
        head("POST", "/v1/publish", Content_Type="application/json", Content_Length=1000) + b"{", b" ", BODY_GRACE_SECONDS),
    "body trickled, chunked": (
        head("POST", "/v1/publish", Content_Type="application/json", Transfer_Encoding="chunked") + chunk(b"{"), chunk(b" "), BODY_GRACE_SECONDS),
}
SLOW_PER_KIND = 80


@dataclass
class SlowClient:
    kind: str
    sock: socket.socket
    opened: float
    received: bytes = b""
    closed: float | None = None


@dataclass
class SlowCrowd:
    """Slow clients of every kind, trickled by one thread, which also notes when and how the
    server answered and dropped each."""

    clients: list[SlowClient] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def open(self, service) -> None:
        for kind, (first, _, _) in SLOW_KINDS.items():
            for _ in range(SLOW_PER_KIND):
                sock = connect(service)
                sock.sendall(first)
                sock.setblocking(False)
                self.clients.append(SlowClient(kind, sock, time.monotonic()))

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        next_trickle = time.monotonic() + 1
        while not self.stop.is_set() and selector.get_map():
            for key, _ in selector.select(timeout=0.1):
                self._read(selector, key.data)
            if time.monotonic() >= next_trickle:
                next_trickle += 1
                for key in list(selector.get_map().values()):
                    self._trickle(selector, key.data)

    def _read(self, selector, client: SlowClient) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.received += data
        if not data:
            client.closed = time.monotonic()
            selector.unregister(client.sock)

    def _trickle(self, selector, client: SlowClient) -> None:
        more = SLOW_KINDS[client.kind][1]
        if more is None or client.received:
            return
        try:
            client.sock.send(more)
        except OSError:
            pass  # dropped: the selector sees the end

    def close(self) -> None:
        self.stop.set()
        for client in self.clients:
            client.sock.close()


def probe(api, path: str) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        status = requests.get(api.base_url + path, timeout=3).status_code
    except requests.RequestException:
        status = None
    return status, time.monotonic() - started


def test_slow_clients_are_dropped_and_probes_keep_answering(service, api):
    """320 connections that send their request a byte a second, or never finish it (head or
    body, Content-Length or chunked): /healthz and /readyz answer throughout, each slow head is
    dropped within ``keepalive`` seconds, each slow body within its grace with a 408."""
    crowd = SlowCrowd()
    crowd.open(service)
    trickler = threading.Thread(target=crowd.run, daemon=True)
    trickler.start()
    probes = []
    try:
        until = time.monotonic() + BODY_GRACE_SECONDS + SLACK
        while time.monotonic() < until:
            for path in ("/healthz", "/readyz"):
                probes.append((path, *probe(api, path)))
            time.sleep(0.2)
        trickler.join(timeout=5)
    finally:
        crowd.close()

    assert len(crowd.clients) >= 300
    unanswered = [(path, status, round(took, 2)) for path, status, took in probes if status != 200 or took > 2]
    assert unanswered == [], f"{len(unanswered)} of {len(probes)} probes failed or were slow: {unanswered[:10]}"
    for kind, (_, _, deadline) in SLOW_KINDS.items():
        clients = [c for c in crowd.clients if c.kind == kind]
        kept = [c for c in clients if c.closed is None]
        assert kept == [], f"{kind}: {len(kept)} of {len(clients)} connections still open"
        late = [round(c.closed - c.opened, 1) for c in clients if c.closed - c.opened > deadline + SLACK]
        assert late == [], f"{kind}: dropped after {late} s, past {deadline} s"
    for client in crowd.clients:
        if client.kind.startswith("body"):
            response = parse_response(client.received)
            assert response is not None, (client.kind, client.received[:200])
            response.problem("POST", "/v1/publish", 408, "request_timeout")
            assert response.headers["connection"] == "close"
        else:
            assert client.received == b""  # a head that never ended gets no answer


def test_a_steady_upload_slower_than_the_grace_is_read(service):
    """The deadline grows with what arrives (BODY_MIN_RATE a second): a 1 MiB build upload sent
    over 14 s, longer than the grace but at a rate a slow link keeps, is read to its end and
    answered (here 422: its registry is unknown), not dropped."""
    boundary = "imagepubboundary"
    request = {"targets": [{"registry": "nowhere", "repository": "team/app", "tags": ["1"]}]}
    body = multipart_head(boundary, json.dumps(request).encode()) + b"\0" * (1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + 16 * 1024] for i in range(0, len(body), 16 * 1024)]
    seconds = BODY_GRACE_SECONDS + 4
    sock = connect(service)
    try:
        sock.sendall(head("POST", "/v1/build", Content_Type=f"multipart/form-data; boundary={boundary}", Content_Length=len(body)))
        started = time.monotonic()
        for n, piece in enumerate(pieces):
            time.sleep(max(0.0, started + n * seconds / len(pieces) - time.monotonic()))
            sock.sendall(piece)
        response, _ = read_response(sock, timeout=10)
    finally:
        sock.close()
    assert time.monotonic() - started > BODY_GRACE_SECONDS
    assert response is not None
    response.problem("POST", "/v1/build", 422, "registry_not_configured")


# --- item 7: bodies over the limit, either framing ----------------------------------------------


def send_in_background(sock: socket.socket, pieces) -> threading.Thread:
    """Send ``pieces`` until they end or the server stops reading; the caller reads the answer."""

    def run():
        try:
            for piece in pieces:
                sock.sendall(piece)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
@pytest.mark.parametrize("path, document", JSON_ENDPOINTS)
def test_json_body_over_the_limit_is_413_before_the_rest_arrives(service, path, document, framing):
    """The finding: 64 KiB of valid JSON, then 70 KB of garbage. The body never ends (no last
    chunk, or fewer bytes than announced): the 413 comes anyway, so the server did not wait
    for, or read, the rest; the connection closes."""
    valid, garbage = padded(document, BODY_LIMIT), b"garbage" * 10_000
    sock = connect(service)
    try:
        if framing == "chunked":
            sock.sendall(head("POST", path, Content_Type="application/json", Transfer_Encoding="chunked"))
            pieces = [chunk(valid[i:i + 8192]) for i in range(0, len(valid), 8192)] + [chunk(garbage)]
        else:
            sock.sendall(head("POST", path, Content_Type="application/json", Content_Length=len(valid) + 10 * len(garbage)))
            pieces = [valid, garbage]
        sender = send_in_background(sock, pieces)
        response, closed = read_response(sock, timeout=10)
        sender.join(timeout=10)
    finally:
        sock.close()
    assert response is not None
    problem = response.problem("POST", path, 413, "payload_too_large")
    assert str(BODY_LIMIT) in problem["detail"] or framing == "content-length"
    assert response.headers["connection"] == "close" and closed


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_build_body_over_its_own_limit_is_413(service, framing):
    """The build endpoint takes a context up to its own, larger limit; past it, the same 413."""
    boundary = "imagepubboundary"
    start = multipart_head(boundary, json.dumps(BUILD).encode())
    filler = b"\0" * (1024 * 1024)
    count = BUILD_LIMIT // len(filler) + 2
    sock = connect(service)
    try:
        if framing == "chunked":
            sock.sendall(head("POST", "/v1/build", Content_Type=f"multipart/form-data; boundary={boundary}", Transfer_Encoding="chunked"))
            pieces = [chunk(start)] + [chunk(filler)] * count  # a context that never ends
        else:
            sock.sendall(head("POST", "/v1/build", Content_Type=f"multipart/form-data; boundary={boundary}",
                              Content_Length=len(start) + len(filler) * count))
            pieces = [start] + [filler] * count
        sender = send_in_background(sock, pieces)
        response, closed = read_response(sock, timeout=30)
        sender.join(timeout=30)
    finally:
        sock.close()
    assert response is not None
    problem = response.problem("POST", "/v1/build", 413, "context_too_large")
    assert "limits.max_context_bytes" in problem["detail"]  # naming its limit and setting
    assert response.headers["connection"] == "close" and closed


def test_connections_stay_alive_after_bodies_read_to_their_end(service):
    """Closing is for bodies left unread: a request whose body was read, either framing,
    leaves its connection open for the next request."""
    sock = connect(service)
    try:
        for framing in ("content-length", "chunked"):
            if framing == "chunked":
                sock.sendall(head("POST", "/v1/publish", Content_Type="application/json", Transfer_Encoding="chunked")
                             + chunk(b"{not json") + b"0\r\n\r\n")
            else:
                sock.sendall(head("POST", "/v1/publish", Content_Type="application/json", Content_Length=9) + b"{not json")
            response, closed = read_response(sock, timeout=10)
            assert response is not None and not closed
            response.problem("POST", "/v1/publish", 400, "invalid_json")
            assert response.headers.get("connection") != "close"
        sock.sendall(head("GET", "/healthz"))
        response, _ = read_response(sock, timeout=10)
        assert response is not None and response.status == 200
    finally:
        sock.close()


# --- item 6: deeply nested JSON -------------------------------------------------------------------

NESTED = ["[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, '[{"a":' * 2500 + "1" + "}]" * 2500]


@pytest.mark.parametrize("path", [path for path, _ in JSON_ENDPOINTS] + ["/v1/build"])
def test_deeply_nested_json_is_400_invalid_json(api, path):
    for text in NESTED:
        if path == "/v1/build":
            resp = api.http.post(api.base_url + path, timeout=30, files={
                "request": (None, text, "application/json"), "context": ("c.tar", b"", "application/x-tar")})
            field_ = "request"
        else:
            resp = api.http.post(api.base_url + path, data=text, headers={"Content-Type": "application/json"}, timeout=30)
            field_ = "body"
        assert resp.status_code == 400, resp.text[:300]
        assert_conforms("POST", path, resp.status_code, dict(resp.headers), resp.content, "application/problem+json")
        problem = resp.json()
        assert problem["code"] == "invalid_json" and [e["field"] for e in problem["errors"]] == [field_]


# --- what gunicorn answers itself ------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes, status, code", [
    # a query past the request line's 8190 bytes (the fuzzer's find: gunicorn's HTML 414)
    (head("GET", "/v1/jobs?kind=pull" + "&limit=1" * 1100), 414, "uri_too_long"),
    # more header fields than gunicorn reads, and one field past its size
    (head("GET", "/v1/jobs", **{f"X_Pad_{i}": "a" for i in range(101)}), 431, "headers_too_large"),
    (head("GET", "/v1/jobs", X_Pad="a" * 9000), 431, "headers_too_large"),
    # not HTTP
    (b"HELLO THERE FRIEND\r\n\r\n", 400, "bad_request"),
    (b"GET /v1/jobs HTTP/1.1\r\nHost imagepub\r\n\r\n", 400, "bad_request"),
    # a body in a transfer coding the server does not speak (RFC 9112: 501)
    (head("GET", "/v1/jobs", Transfer_Encoding="br, chunked"), 501, "not_implemented"),
], ids=["request-line", "header-count", "header-size", "request-line-garbage", "header-garbage", "transfer-coding"])
def test_what_gunicorn_refuses_is_problem_json_too(service, request_bytes, status, code):
    """Refusals made before a request reaches the application are problem+json with a stable
    code and a status the contract documents for every operation; the connection closes."""
    sock = connect(service)
    try:
        sock.sendall(request_bytes)
        response, closed = read_response(sock, timeout=10)
    finally:
        sock.close()
    assert response is not None and closed
    if request_bytes.startswith(b"GET /v1/jobs"):
        response.problem("GET", "/v1/jobs", status, code)
    else:  # no operation to hold it to: the problem document itself
        assert response.status == status and response.headers["content-type"] == "application/problem+json"
        problem = json.loads(response.body)
        assert problem["code"] == code and problem["status"] == status and problem["title"], problem
    assert b"<html" not in response.body.lower()


def test_an_exception_that_escapes_the_application_is_a_logged_problem_500():
    """gunicorn answers 500 itself when the WSGI application raises (it logs the traceback
    first): that answer too is problem+json, and says nothing of the exception."""
    from service.gunicorn_worker import write_problem

    ours, theirs = socket.socketpair()
    try:
        write_problem(ours, 500, "Internal Server Error", "")
        ours.close()
        response, _ = read_response(theirs, timeout=5)
    finally:
        theirs.close()
    assert response is not None and response.status == 500
    assert response.headers["content-type"] == "application/problem+json" and response.headers["connection"] == "close"
    assert json.loads(response.body) == {
        "type": "/problems/internal_error", "title": "Internal Server Error", "status": 500,
        "detail": "an unexpected error occurred; it has been logged", "code": "internal_error",
    }

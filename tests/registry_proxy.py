"""A TLS-terminating reverse proxy in front of a distribution registry: the seam for ECR's own errors.

A distribution registry never answers like Amazon ECR does when a tag is immutable or a token
has expired. The stack therefore runs its emulated ECR registry on plain HTTP on 127.0.0.1 and
puts this proxy on ``<ecr ip>:443`` (TLS, certificate for the ECR host name). It forwards every
request unchanged (any method, all headers including Authorization, streaming bodies: sized,
``Transfer-Encoding: chunked`` and bodiless HEAD), keeps client and upstream connections alive
(HTTP/1.1), logs ``(method, path, status)`` per request, and on demand answers matching
requests with an error of the test's choosing instead of forwarding them::

    stack.ecr_registry.immutable_tag("team/app", "1.0.0")   # next manifest PUT -> 400 TAG_INVALID
    stack.ecr_registry.expired_token()                      # next request -> 403 DENIED
    stack.ecr_registry.fail("PATCH", r"/blobs/uploads/", 500, {"errors": [...]}, times=3)
    stack.ecr_registry.requests()                           # [(method, path, status), ...]
    stack.ecr_registry.reset()

The helpers' bodies are the ones ECR sends, byte for byte; the daemon turns them into
``tag invalid: The image tag '1.0.0' already exists in the 'team/app' repository and cannot be
overwritten because the repository is immutable.`` and ``denied: Your authorization token has
expired. Reauthenticate and try again.``
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping, NamedTuple

__all__ = ["RegistryProxy", "ProxiedRequest", "Fault", "ecr_error", "JSON_CONTENT_TYPE",
           "IMMUTABLE_TAG_MESSAGE", "EXPIRED_TOKEN_MESSAGE"]

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
IMMUTABLE_TAG_MESSAGE = ("The image tag '{tag}' already exists in the '{repository}' repository "
                         "and cannot be overwritten because the repository is immutable.")
EXPIRED_TOKEN_MESSAGE = "Your authorization token has expired. Reauthenticate and try again."

CHUNK = 256 * 1024


def _read_exactly(rfile, size: int, what: str):
    """``size`` bytes of ``rfile``, in pieces of at most CHUNK."""
    while size:
        data = rfile.read(min(size, CHUNK))
        if not data:
            raise ConnectionError(f"client closed during {what}")
        size -= len(data)
        yield data

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy re-frames itself.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect"}


def ecr_error(code: str, message: str) -> dict:
    """The body of a registry error as ECR sends it: ``{"errors":[{"code":..,"message":..}]}``."""
    return {"errors": [{"code": code, "message": message}]}


class ProxiedRequest(NamedTuple):
    """One request the proxy answered: method, path (without the query string), status."""
    method: str
    path: str
    status: int


@dataclass
class Fault:
    method: str | None          # None: any method
    path: re.Pattern
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    remaining: int

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.path.search(path))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, handler, ssl_context: ssl.SSLContext, proxy: "RegistryProxy"):
        self.ssl_context = ssl_context
        self.proxy = proxy
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        # TLS handshake here, in the connection's own thread (not in the accept loop).
        conn = None
        try:
            request.settimeout(30)
            conn = self.ssl_context.wrap_socket(request, server_side=True)
            conn.settimeout(None)
        except (OSError, ssl.SSLError):
            with contextlib.suppress(OSError):
                request.close()
            return
        self.proxy._track(conn, True)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            self.proxy._track(conn, False)
            with contextlib.suppress(OSError, ValueError):
                conn.close()

    def shutdown_request(self, request):
        # The socket was detached into the SSL socket (closed in finish_request) or closed.
        with contextlib.suppress(OSError):
            request.close()

    def handle_error(self, request, client_address):  # a client went away: not our concern
        pass


class _UpstreamError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format, *args):  # noqa: A002 - quiet; the proxy keeps its own log
        pass

    def setup(self):
        super().setup()
        self.upstream = None

    def finish(self):
        with contextlib.suppress(Exception):
            super().finish()
        self._drop_upstream()

    # Every method goes through one path.
    def do_any(self):
        self.server.proxy._handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_any

    def _drop_upstream(self):
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.close()
            self.upstream = None


class RegistryProxy:
    """TLS reverse proxy to a plain-HTTP registry, with a request log and programmable faults.

    ``listen`` is bound in the constructor (an OSError there means the address is taken);
    ``start()`` begins serving in a daemon thread, ``close()`` stops it and drops every
    open connection.
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], certfile: str | Path,
                 keyfile: str | Path, *, registry_host: str = "", log_path: str | Path | None = None):
        self.upstream = upstream
        self.registry_host = registry_host
        self._lock = threading.Lock()
        self._log: list[ProxiedRequest] = []
        self._faults: list[Fault] = []
        self._conns: set = set()
        self._log_file = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self._server = _Server(listen, _Handler, ctx, self)
        self.address = self._server.server_address[:2]
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "RegistryProxy":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.2},
                                            name=f"registry-proxy-{self.address[0]}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handler threads blocked on idle keep-alive connections
            with contextlib.suppress(OSError, ValueError):
                c.shutdown(socket.SHUT_RDWR)
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()

    def _track(self, conn, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # --------------------------------------------------------------- test API

    def fail(self, method: str | None, path_regex: str, status: int, json_body: Any,
             times: int = 1, headers: Mapping[str, str] | None = None) -> Fault:
        """Answer the next *times* requests matching *method* (``None`` or ``"*"``: any) and
        *path_regex* (``re.search`` on the path without query string) with *status* and
        *json_body* (a dict/list is serialised compactly as ECR does; str/bytes sent as is),
        ``Content-Type: application/json; charset=utf-8``, instead of forwarding them.
        A 401 also carries ``WWW-Authenticate: Basic realm=...`` (as ECR sends it) unless
        *headers* gives one. Faults are tried in the order they were armed."""
        if isinstance(json_body, bytes):
            body = json_body
        elif isinstance(json_body, str):
            body = json_body.encode()
        else:
            body = json.dumps(json_body, separators=(",", ":")).encode()
        hdrs = dict(headers or {})
        if status == 401 and not any(k.lower() == "www-authenticate" for k in hdrs):
            realm = f"https://{self.registry_host}/" if self.registry_host else "registry"
            hdrs["WWW-Authenticate"] = f'Basic realm="{realm}",service="ecr.amazonaws.com"'
        fault = Fault(None if method in (None, "*") else method.upper(), re.compile(path_regex),
                      int(status), body, tuple(hdrs.items()), int(times))
        with self._lock:
            self._faults.append(fault)
        return fault

    def immutable_tag(self, repository: str, tag: str, times: int = 1) -> Fault:
        """ECR's answer to a manifest PUT on an existing tag of an IMMUTABLE repository."""
        message = IMMUTABLE_TAG_MESSAGE.format(tag=tag, repository=repository)
        return self.fail("PUT", rf"^/v2/{re.escape(repository)}/manifests/{re.escape(tag)}$",
                         400, ecr_error("TAG_INVALID", message), times)

    def expired_token(self, times: int = 1, path_regex: str = r"^/v2/.+",
                      method: str | None = None) -> Fault:
        """ECR's answer to a request made with an expired authorization token. By default
        the next request to anything but the ``/v2/`` ping (which the daemon makes without
        credentials), whatever its method."""
        return self.fail(method, path_regex, 403, ecr_error("DENIED", EXPIRED_TOKEN_MESSAGE), times)

    def requests(self) -> list[ProxiedRequest]:
        """Every request answered so far (since the last reset), in order of completion."""
        with self._lock:
            return list(self._log)

    def armed(self) -> list[Fault]:
        """Faults not used up yet."""
        with self._lock:
            return [f for f in self._faults if f.remaining > 0]

    def reset(self) -> None:
        """Forget the log and disarm every fault."""
        with self._lock:
            self._log.clear()
            self._faults.clear()

    # ----------------------------------------------------------------- serving

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.remaining > 0 and f.matches(method, path):
                    f.remaining -= 1
                    return f
        return None

    def _record(self, method: str, path: str, status: int, note: str = "") -> None:
        with self._lock:
            self._log.append(ProxiedRequest(method, path, status))
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.write(f"{time.strftime('%H:%M:%S')} {method} {path} {status}"
                                     f"{' ' + note if note else ''}\n")

    def _handle(self, h: _Handler) -> None:
        method = h.command.upper()
        path = h.path.split("?", 1)[0]
        fault = self._take_fault(method, path)
        if fault is not None:
            self._drain_body(h)
            self._send_simple(h, fault.status, fault.body, fault.headers)
            self._record(method, path, fault.status, "(injected)")
            return
        chunked, length = self._request_framing(h)
        framing = "chunked" if chunked else (f"len={length}" if length else "")
        try:
            status = self._forward(h, method)
        except _UpstreamError as exc:
            h._drop_upstream()
            body = json.dumps(ecr_error("UNAVAILABLE", f"registry proxy: {exc}"),
                              separators=(",", ":")).encode()
            h.close_connection = True
            with contextlib.suppress(OSError):
                self._send_simple(h, 502, body, (("Connection", "close"),))
            self._record(method, path, 502, f"(upstream error: {exc})")
            return
        except Exception:
            # The client went away, or a stream broke half-way: nothing can be answered.
            h._drop_upstream()
            h.close_connection = True
            self._record(method, path, 0, "(connection broken)")
            raise
        self._record(method, path, status, framing)

    # Request bodies ------------------------------------------------------------

    @staticmethod
    def _request_framing(h: _Handler) -> tuple[bool, int]:
        """(chunked, content_length) of the client's request body."""
        te = ",".join(h.headers.get_all("Transfer-Encoding") or []).lower()
        if "chunked" in te:
            return True, 0
        cl = h.headers.get("Content-Length")
        return False, int(cl) if cl and cl.strip().isdigit() else 0

    @classmethod
    def _iter_body(cls, h: _Handler):
        chunked, length = cls._request_framing(h)
        rfile = h.rfile
        if chunked:
            while True:
                line = rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed during chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        t = rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    return
                yield from _read_exactly(rfile, size, "chunked body")
                rfile.readline(3)  # CRLF after the chunk data
        else:
            yield from _read_exactly(rfile, length, "body")

    @classmethod
    def _drain_body(cls, h: _Handler) -> None:
        for _ in cls._iter_body(h):
            pass

    # Responses -------------------------------------------------------------------

    @staticmethod
    def _send_simple(h: _Handler, status: int, body: bytes, headers) -> None:
        h.send_response_only(status)
        h.send_header("Content-Type", JSON_CONTENT_TYPE)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        h.send_header("Date", h.date_time_string())
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
        h.wfile.flush()

    def _connect(self, h: _Handler) -> http.client.HTTPConnection:
        conn = h.upstream
        if conn is not None and conn.sock is not None:
            # A reused connection the registry has closed (or written to) is stale.
            try:
                readable, _, _ = select.select([conn.sock], [], [], 0)
            except (OSError, ValueError):
                readable = [True]
            if readable:
                h._drop_upstream()
                conn = None
        if conn is None or conn.sock is None:
            h._drop_upstream()
            conn = http.client.HTTPConnection(*self.upstream, timeout=300)
            try:
                conn.connect()
            except OSError as exc:
                raise _UpstreamError(f"cannot connect to {self.upstream[0]}:{self.upstream[1]}: "
                                     f"{exc}") from exc
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            h.upstream = conn
        return conn

    def _forward(self, h: _Handler, method: str) -> int:
        chunked, length = self._request_framing(h)
        has_body = chunked or length > 0
        connection_tokens = {t.strip().lower() for v in (h.headers.get_all("Connection") or [])
                             for t in v.split(",")}
        drop = _HOP_BY_HOP | connection_tokens

        for attempt in (1, 2):
            conn = self._connect(h)
            try:
                conn.putrequest(method, h.path, skip_host=True, skip_accept_encoding=True)
                for k, v in h.headers.items():
                    if k.lower() not in drop:
                        conn.putheader(k, v)
                conn.putheader("X-Forwarded-Proto", "https")
                conn.putheader("X-Forwarded-For", h.client_address[0])
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                elif has_body:
                    conn.putheader("Content-Length", str(length))
                conn.endheaders()
                break
            except OSError as exc:
                h._drop_upstream()
                if attempt == 2:
                    raise _UpstreamError(f"sending request: {exc}") from exc

        # Body: read from the client, stream upstream. A client error propagates as is.
        upstream_broken: Exception | None = None
        for data in self._iter_body(h) if has_body else ():
            if upstream_broken is not None:
                continue  # keep reading so the client connection stays in sync
            try:
                conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            except OSError as exc:
                upstream_broken = exc
        if chunked and upstream_broken is None:
            try:
                conn.send(b"0\r\n\r\n")
            except OSError as exc:
                upstream_broken = exc

        try:
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _UpstreamError(f"reading response: {upstream_broken or exc}") from exc

        # Status line and end-to-end headers, unchanged.
        h.send_response_only(resp.status, resp.reason)
        resp_drop = _HOP_BY_HOP | {t.strip().lower() for v in (resp.headers.get_all("Connection") or [])
                                   for t in v.split(",")}
        for k, v in resp.getheaders():
            if k.lower() not in resp_drop:
                h.send_header(k, v)
        bodiless = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        rechunk = not bodiless and resp.getheader("Content-Length") is None
        if rechunk:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if not bodiless:
            while True:
                data = resp.read1(CHUNK)
                if not data:
                    break
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if rechunk else data)
            if rechunk:
                h.wfile.write(b"0\r\n\r\n")
        # Mark the response complete (read1 never does for an empty body), so that the
        # upstream connection can carry the next request.
        resp.read()
        h.wfile.flush()
        if resp.will_close or upstream_broken is not None:
            h._drop_upstream()
        return resp.status

"""One webhook POST with a deadline for the whole exchange, whatever the peer does.

A socket timeout bounds one operation, not a delivery: a peer that accepts and then sends one
byte every few seconds keeps every single ``recv`` short and a ``requests`` call alive for
minutes. So this module does the small HTTP/1.1 exchange a webhook needs itself, and sets the
socket's timeout to what is left of one :class:`Deadline` before *every* operation — name
resolution, connect, TLS handshake (CPython bounds a handshake as a whole by the timeout), each
``send`` and each ``recv`` — so the whole delivery ends by the deadline, trickled bytes included.

It connects to the addresses that passed the internal-address check (never resolving the name
again, which a rebinding DNS server could answer differently), sends the right ``Host`` and, for
https, the name for SNI and certificate verification. It reads the response's status line and
headers, never a body, and never follows a redirect: it only reports the status.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Callable
from urllib.parse import quote, urlsplit

MAX_HEAD_BYTES = 16 * 1024  # a response head longer than this is not a webhook receiver's answer
_VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))  # kept as they are in the request line


class DeliveryTimeout(TimeoutError):
    """The deadline passed before the peer answered."""


class BadResponse(OSError):
    """The peer answered something that is not an HTTP/1.x response head."""


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises :class:`DeliveryTimeout` once there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeliveryTimeout("no answer within the delivery's deadline")
        return left


def resolver(deadline: Deadline) -> Callable[..., list]:
    """``getaddrinfo`` bounded by ``deadline``: the system resolver has no timeout of its own
    that we control, so it runs on a thread of its own that we stop waiting for (the thread
    ends when the resolver's own timeouts end it)."""

    def resolve(*args, **kwargs):
        answer: dict = {}

        def run():
            try:
                answer["infos"] = socket.getaddrinfo(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                answer["error"] = exc

        thread = threading.Thread(target=run, name="imagepub-webhook-resolve", daemon=True)
        thread.start()
        thread.join(deadline.remaining())
        if thread.is_alive():
            raise DeliveryTimeout("the callback host did not resolve within the delivery's deadline")
        if "error" in answer:
            raise answer["error"]
        return answer["infos"]

    return resolve


def _host_header(url: str) -> tuple[str, str]:
    """(the name for SNI and certificate checks, the ``Host`` header) of ``url``."""
    parts = urlsplit(url)
    name = parts.hostname.encode("idna").decode("ascii")
    default = 443 if parts.scheme == "https" else 80
    shown = f"[{name}]" if ":" in name else name
    return name, shown if parts.port in (None, default) else f"{shown}:{parts.port}"


def _connect(addresses: list[tuple[int, tuple]], deadline: Deadline) -> socket.socket:
    last: OSError = OSError("the callback host has no address")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            return sock
        except OSError as exc:  # DeliveryTimeout included: the next remaining() raises it again
            sock.close()
            last = exc
    raise last


def _send(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    view = memoryview(data)
    while view:
        sock.settimeout(deadline.remaining())
        view = view[sock.send(view):]


def _read_status(sock: socket.socket, deadline: Deadline) -> int:
    """The status of the final response (interim 1xx heads are skipped)."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head, buffer = buffer[:end], buffer[end + 4:]
            words = head.split(b"\r\n", 1)[0].split(None, 2)
            if len(words) < 2 or not words[0].startswith(b"HTTP/1.") or not (words[1].isdigit() and len(words[1]) == 3):
                raise BadResponse("not an HTTP/1.x response")
            status = int(words[1])
            if status >= 200 or status < 100:
                return status
            continue
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadResponse("response head too long")
        sock.settimeout(deadline.remaining())
        chunk = sock.recv(4096)
        if not chunk:
            raise BadResponse("connection closed before a response")
        buffer += chunk


def post(url: str, addresses: list[tuple[int, tuple]], body: bytes, headers: dict[str, str], deadline: Deadline,
         tls: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``url`` at one of ``addresses``; the response's status. Raises
    :class:`DeliveryTimeout` at the deadline and ``OSError`` (``ssl.SSLError`` included) when the
    exchange fails."""
    parts = urlsplit(url)
    name, host = _host_header(url)
    # spaces, controls and non-ASCII escaped: nothing in the URL can split the request line
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_VISIBLE_ASCII)
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
    sock = None
    try:
        sock = _connect(addresses, deadline)
        if parts.scheme == "https":
            sock.settimeout(deadline.remaining())
            sock = (tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=name)
        _send(sock, request, deadline)
        return _read_status(sock, deadline)
    except socket.timeout as exc:  # a single operation outlived what was left of the deadline
        raise DeliveryTimeout("no answer within the delivery's deadline") from exc
    finally:
        if sock is not None:
            sock.close()

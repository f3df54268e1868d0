"""Webhook endpoints on loopback for tests.

- :class:`Receiver` answers with the statuses it is given and records calls (optionally holding
  each answer until released);
- :class:`HostileReceiver` never answers properly — it trickles a response head a byte at a time,
  stays silent, or reads the request slowly — and records, in a shared :class:`Connections`,
  when each connection opened and when the caller hung up.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A webhook endpoint on loopback: answers with the statuses it is given, records calls.
    With ``hold`` (an Event), each answer waits until it is set."""

    def __init__(self, statuses, hold: threading.Event | None = None):
        self.statuses, self.calls, self.hold = list(statuses), [], hold
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()})
                if receiver.hold is not None:
                    receiver.hold.wait(120)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a caller that hung up on a held answer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.calls


_TCP_ESTABLISHED = 1


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (Linux ``tcp_info.tcpi_state``): it leaves
    ESTABLISHED as soon as the peer closes, even with unread data in the buffer."""
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


class Connections:
    """Connections to hostile receivers: when each opened and closed, how many are open."""

    def __init__(self):
        self._lock = threading.Lock()
        self.log: list[dict] = []
        self.open = 0

    def opened(self, mode: str) -> dict:
        entry = {"mode": mode, "opened": time.monotonic(), "closed": None}
        with self._lock:
            self.log.append(entry)
            self.open += 1
        return entry

    def closed(self, entry: dict) -> None:
        with self._lock:
            entry["closed"] = time.monotonic()
            self.open -= 1

    def most_at_once(self, slack: float = 0.25) -> int:
        """The most connections open at one time. A close is noticed by polling, so a little
        after it happened: a connection counts as open until ``slack`` before its close was
        seen (a caller that opens its next connection right after closing one is not counted
        twice; one that keeps more open at once overlaps by far more than that)."""
        with self._lock:
            spans = [(e["opened"], (e["closed"] or float("inf")) - slack) for e in self.log]
        return max((sum(1 for start, end in spans if start <= at < end) for at, _ in spans), default=0)

    def wait(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


class HostileReceiver:
    """A callback endpoint that never answers properly. ``mode``:

    - ``trickle``: reads the request, then sends one byte of a response head every ``interval``
      seconds, never finishing it;
    - ``silent``: accepts and never sends (nor reads) a byte;
    - ``slow-reader``: reads the request a few bytes at a time and never answers.
    """

    def __init__(self, mode: str, connections: Connections, interval: float = 2.0):
        assert mode in {"trickle", "silent", "slow-reader"}
        self.mode, self.connections, self.interval = mode, connections, interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        entry = self.connections.opened(self.mode)
        head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
        sent, next_action = 0, time.monotonic()
        conn.setblocking(False)
        try:
            while not self._closing.is_set() and _tcp_state(conn) == _TCP_ESTABLISHED:
                if time.monotonic() >= next_action:
                    if self.mode == "trickle":
                        self._drain(conn, 65536)
                        conn.send(head[sent:sent + 1])
                        sent, next_action = sent + 1, time.monotonic() + self.interval
                    elif self.mode == "slow-reader":
                        self._drain(conn, 16)
                        next_action = time.monotonic() + 0.25
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            self.connections.closed(entry)
            conn.close()

    @staticmethod
    def _drain(conn: socket.socket, size: int) -> None:
        try:
            conn.recv(size)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Stop accepting (later attempts are refused at once) and drop open connections."""
        self._closing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()

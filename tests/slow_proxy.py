"""A slow network in front of a registry: a TCP forwarder with a bandwidth cap, for fault tests.

The fault-injection tests kill workers at random points *inside* a push or a pull. On loopback a
small image moves in milliseconds, so there would be no "inside" to aim at; this forwarder
stretches the transfer to a known length (``rate`` bytes per second per direction, shared by all
connections; ``latency`` seconds more for every read from the client, so that many small
requests take long too) without changing a byte of it. It can also go away and come back (``stop()`` /
``start()``: the port refuses connections meanwhile and open connections are reset), which is
what a registry outage looks like from the daemon.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 16 * 1024


class _Bucket:
    """A token bucket shared by every connection in one direction."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.stamp = rate, 0.0, time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate / 4, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class SlowProxy:
    def __init__(self, upstream: str, rate: float, latency: float = 0.0):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self.latency = latency  # added to every read from a client: roughly, to every request
        self.up, self.down = _Bucket(rate), _Bucket(rate)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.address = f"127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones, as a registry that went down."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()

    close = stop

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, self.up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, bucket: _Bucket, upstream: bool) -> None:
        try:
            while data := src.recv(CHUNK):
                if upstream and self.latency:
                    time.sleep(self.latency)
                bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._conns -= {src, dst}

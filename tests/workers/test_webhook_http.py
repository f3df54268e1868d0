"""workers/webhook_http.py against real sockets on loopback: one delivery ends by its deadline
whatever the peer does, connects to the vetted address only, and speaks TLS with the URL's name."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.callbacks import CallbackUnresolvable, check_callback_url
from workers import webhook_http
from workers.webhook_http import Deadline, DeliveryTimeout, post

from webhook_receiver import Connections, HostileReceiver, Receiver

BODY = b'{"id":"x","state":"succeeded"}' * 50


def loopback(url: str) -> list[tuple[int, tuple]]:
    return [(socket.AF_INET, ("127.0.0.1", int(url.rsplit(":", 1)[1].split("/", 1)[0])))]


@pytest.mark.parametrize("mode", ["trickle", "silent", "slow-reader"])
def test_a_peer_that_never_answers_is_abandoned_at_the_deadline(mode):
    connections = Connections()
    receiver = HostileReceiver(mode, connections, interval=0.2)  # a byte every 0.2 s: no recv ever times out
    started = time.monotonic()
    with pytest.raises(DeliveryTimeout):
        post(receiver.url, loopback(receiver.url), BODY, {}, Deadline(1.5))
    assert 1.4 < time.monotonic() - started < 1.8
    assert connections.wait(lambda c: c.log and c.log[0]["closed"], timeout=2)
    entry = connections.log[0]
    assert entry["closed"] - entry["opened"] < 1.8
    receiver.close()


def test_a_deadline_covers_name_resolution(monkeypatch):
    monkeypatch.setattr(webhook_http.socket, "getaddrinfo", lambda *a, **k: time.sleep(5))
    started = time.monotonic()
    with pytest.raises(CallbackUnresolvable):
        check_callback_url("https://slow-dns.example/x", (), must_resolve=True, resolve=webhook_http.resolver(Deadline(0.5)))
    assert time.monotonic() - started < 1


def test_connects_to_the_vetted_address_with_the_urls_host_never_resolving_again():
    receiver = Receiver([204])
    port = receiver.server.server_address[1]
    # the name does not resolve at all: only the address given can have been used
    url = f"http://hooks.rebind.invalid:{port}/hook x?a=1"
    assert post(url, loopback(receiver.url), BODY, {"X-Test": "1"}, Deadline(5)) == 204
    call = receiver.calls[0]
    assert call["headers"]["Host"] == f"hooks.rebind.invalid:{port}"
    assert call["path"] == "/hook%20x?a=1" and call["body"] == BODY and call["headers"]["X-Test"] == "1"
    receiver.server.shutdown()


def test_interim_answers_are_skipped():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    assert post(url, loopback(url), BODY, {}, Deadline(5)) == 201
    listener.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    for name in ("localhost", "other.test"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1",
                        "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.crt", "-subj", f"/CN={name}",
                        "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
    return folder


def tls_receiver(certificates, name):
    """An https endpoint on 127.0.0.1 serving ``name``'s certificate; records the SNI it gets."""
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["host"] = self.headers["Host"]
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / f"{name}.crt", certificates / f"{name}.key")
    context.sni_callback = lambda sock, server_name, ctx: seen.update(sni=server_name)  # None: go on
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_https_sends_the_name_for_sni_and_verifies_the_certificate_for_it(certificates):
    trust = ssl.create_default_context(cafile=str(certificates / "localhost.crt"))
    server, seen = tls_receiver(certificates, "localhost")
    url = f"https://localhost:{server.server_address[1]}/hook"
    assert post(url, loopback(url), BODY, {}, Deadline(5), tls=trust) == 200
    assert seen == {"sni": "localhost", "host": f"localhost:{server.server_address[1]}"}
    server.shutdown()

    # a certificate for another name is refused, even one the caller's trust store holds
    impostor, _ = tls_receiver(certificates, "other.test")
    trust.load_verify_locations(cafile=str(certificates / "other.test.crt"))
    url = f"https://localhost:{impostor.server_address[1]}/hook"
    with pytest.raises(ssl.SSLCertVerificationError):
        post(url, loopback(url), BODY, {}, Deadline(5), tls=trust)
    impostor.shutdown()

"""The worker's own look at what a registry serves (workers/registry_http.py), against the stack's
real registries: the plain one (anonymous) and the password-protected one (Basic)."""

from __future__ import annotations

import uuid

import pytest

from service import errors
from stack import free_port
from workers.registry_http import ManifestHead, Unreachable


def _pushed(stack, host: str, auth: dict | None = None) -> tuple[str, str]:
    """A fresh image pushed by the daemon to ``host``: its repository path and the digest the
    registry itself reports (HEAD by the stack's own client)."""
    name = f"head/{uuid.uuid4().hex[:10]}"
    stack.build_image(f"{host}/{name}:v1", layers=2)
    client = stack.docker()
    try:
        for line in client.api.push(f"{host}/{name}", tag="v1", stream=True, decode=True, auth_config=auth):
            assert "errorDetail" not in line, line
    finally:
        client.close()
    digest = stack.registry_digest(host, name, "v1")
    assert digest and digest.startswith("sha256:")
    return name, digest


def test_the_digest_of_an_anonymous_registry_is_the_one_it_serves(stack):
    name, digest = _pushed(stack, stack.registry)
    head = ManifestHead(stack.registry, verify=False, plain_http_allowed=True)
    assert head.digest(name, "v1", {}) == digest
    assert head.schemes == ["http"]  # HTTPS failed once; plain HTTP from then on, as Docker does
    assert head.digest(name, "v1", {}) == digest
    with pytest.raises(errors.ManifestNotFound):
        head.digest(name, "no-such-tag", {})


def test_a_password_protected_registry_gets_its_credentials(stack):
    auth = {"username": stack.auth_user, "password": stack.auth_password}
    name, digest = _pushed(stack, stack.auth_registry, auth)
    head = ManifestHead(stack.auth_registry, verify=False, plain_http_allowed=True)
    assert head.digest(name, "v1", auth) == digest
    with pytest.raises(errors.TokenRejected):  # the caller may fetch fresh credentials and ask again
        ManifestHead(stack.auth_registry, verify=False, plain_http_allowed=True).digest(name, "v1", {**auth, "password": "wrong"})
    with pytest.raises(errors.TokenRejected):
        ManifestHead(stack.auth_registry, verify=False, plain_http_allowed=True).digest(name, "v1", {})


def test_a_registry_the_worker_cannot_reach_says_so():
    """The caller then verifies through the daemon (workers/publish.py served_digest)."""
    with pytest.raises(Unreachable):
        ManifestHead(f"127.0.0.1:{free_port()}", verify=False, plain_http_allowed=True).digest("team/app", "v1", {})
    with pytest.raises(Unreachable):
        ManifestHead("registry.invalid", verify=True).digest("team/app", "v1", {})


class _BearerFront:
    """The token flow of Docker Hub and most hosted registries, which the stack's registries do
    not speak: a registry front that asks for a Bearer token (RFC 6750 challenge with realm,
    service and scope), a token service that gives one for good Basic credentials, and the HEAD
    forwarded to the stack's real registry once the token is presented."""

    def __init__(self, upstream: str):
        import http.server
        import threading
        import urllib.request

        self.token_requests: list[str] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, headers: dict, body: bytes = b"") -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/token"):
                    front.token_requests.append(self.path)
                    good = "Basic " + __import__("base64").b64encode(b"robot:secret").decode()
                    if self.headers.get("Authorization") != good:
                        return self._reply(401, {"Content-Type": "application/json"}, b'{"details":"incorrect username or password"}')
                    return self._reply(200, {"Content-Type": "application/json"}, b'{"token":"t0k3n-for-test","expires_in":300}')
                return self.do_HEAD()

            def do_HEAD(self):
                if self.headers.get("Authorization") != "Bearer t0k3n-for-test":
                    name = self.path.split("/manifests/")[0].removeprefix("/v2/")
                    challenge = (f'Bearer realm="http://127.0.0.1:{front.port}/token",service="registry.test",'
                                 f'scope="repository:{name}:pull"')
                    return self._reply(401, {"WWW-Authenticate": challenge})
                request = urllib.request.Request(f"http://{upstream}{self.path}", method="HEAD",
                                                 headers={"Accept": self.headers.get("Accept", "")})
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        return self._reply(answer.status, {"Docker-Content-Digest": answer.headers["Docker-Content-Digest"]})
                except urllib.error.HTTPError as exc:
                    return self._reply(exc.code, {})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_registry_that_wants_a_bearer_token_gets_one_and_it_is_reused(stack):
    name, digest = _pushed(stack, stack.registry)
    front = _BearerFront(stack.registry)
    try:
        host = f"127.0.0.1:{front.port}"
        head = ManifestHead(host, verify=False, plain_http_allowed=True)
        auth = {"username": "robot", "password": "secret"}
        assert head.digest(name, "v1", auth) == digest
        assert head.digest(name, "v1", auth) == digest
        assert len(front.token_requests) == 1  # cached for its lifetime
        assert f"scope=repository%3A{name.replace('/', '%2F')}%3Apull" in front.token_requests[0]
        with pytest.raises(errors.TokenRejected):
            ManifestHead(host, verify=False, plain_http_allowed=True).digest(name, "v1", {**auth, "password": "wrong"})
    finally:
        front.server.shutdown()

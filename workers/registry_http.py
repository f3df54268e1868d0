"""What a registry serves for a tag, asked by the worker itself: ``HEAD /v2/<name>/manifests/<tag>``.

A push is verified by the digest the registry answers for the tag. The daemon can ask for us
(``GET /distribution/<ref>/json``), but that costs a daemon round trip and a fresh registry
handshake every time (about 10 ms of a 30 ms tag push). The worker holds the credentials and
asks with one HEAD on a kept-alive connection, with the registry's bearer token cached for as
long as the registry says it lasts.

The worker may not reach a registry the daemon reaches: the daemon can trust a CA of its own
(``certs.d``), resolve names the worker does not, or sit on another network (``hostSocket``
mode). When the worker cannot connect or cannot verify the registry's certificate, the caller
verifies through the daemon instead (workers/publish.py); the push is verified either way.

The protocol is the distribution spec's: an anonymous request first; on 401 the challenge says
``Basic`` (send the credentials) or ``Bearer realm=…,service=…,scope=…`` (fetch a token from the
realm with the credentials, then send it), as Docker's own client does.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from typing import Any

import requests

from service import errors
from service.image_archive import INDEX_TYPES, MANIFEST_TYPES
from service.logs import register_secret

# Every manifest form a push can leave behind: the registry answers the digest of the one it holds.
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
TIMEOUT = (5, 15)  # connect, read: a HEAD answers at once or the registry is in trouble
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_DOCKER_HUB = {"docker.io": "registry-1.docker.io"}


class Unreachable(Exception):
    """The worker cannot connect to the registry or verify its certificate."""


class ManifestHead:
    """HEAD of manifests of one registry, on one kept-alive session (thread-safe: one at a time)."""

    def __init__(self, host: str, *, verify: bool | str = True, plain_http_allowed: bool = False):
        self.endpoint = _DOCKER_HUB.get(host, host)
        self.verify = verify
        # Docker's rule for an insecure registry: HTTPS first, plain HTTP when HTTPS fails.
        self.schemes = ["https", "http"] if plain_http_allowed else ["https"]
        self.session = requests.Session()
        self.session.trust_env = False  # the registry is reached as the daemon reaches it, not through a proxy variable
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expires at, monotonic)
        self._basic = False  # the registry asked for Basic credentials once: send them up front
        self._lock = threading.Lock()

    def digest(self, repository: str, reference: str, auth: dict[str, str]) -> str:
        """The digest the registry serves for ``repository:reference``. Raises ManifestNotFound,
        TokenRejected (credentials refused: the caller may fetch fresh ones and ask again),
        RegistryUnavailable, or Unreachable (ask through the daemon)."""
        with self._lock:
            return self._digest(repository, reference, auth)

    def _digest(self, repository: str, reference: str, auth: dict[str, str]) -> str:
        scope = f"repository:{repository}:pull"
        path = f"/v2/{repository}/manifests/{reference}"
        resp = self._request("HEAD", path, self._authorization(scope, auth))
        if resp.status_code == 401:
            resp = self._request("HEAD", path, self._answer(resp.headers.get("WWW-Authenticate", ""), scope, auth))
        if resp.status_code == 200 and not resp.headers.get("Docker-Content-Digest"):
            # a registry may leave the header out of HEAD: the digest is the manifest's own hash
            resp = self._request("GET", path, self._authorization(scope, auth))
            if resp.status_code == 200:
                return "sha256:" + hashlib.sha256(resp.content).hexdigest()
        if resp.status_code == 200:
            return resp.headers["Docker-Content-Digest"]
        if resp.status_code == 404:
            raise errors.ManifestNotFound(f"{self.endpoint}/{repository}:{reference}: the registry serves no manifest for it")
        if resp.status_code in (401, 403):
            self._tokens.pop(scope, None)
            raise errors.TokenRejected(f"{self.endpoint} refused the credentials for {repository} (HTTP {resp.status_code})")
        raise errors.RegistryUnavailable(f"{self.endpoint} answered HTTP {resp.status_code} for the manifest of {repository}:{reference}")

    def _request(self, method: str, path: str, authorization: str | None) -> requests.Response:
        headers = {"Accept": ACCEPT}
        if authorization:
            headers["Authorization"] = authorization
        last: Exception | None = None
        for scheme in list(self.schemes):
            try:
                resp = self.session.request(method, f"{scheme}://{self.endpoint}{path}", headers=headers, timeout=TIMEOUT,
                                            verify=self.verify, allow_redirects=False)
            except (requests.exceptions.SSLError, requests.exceptions.ConnectionError) as exc:
                last = exc
                continue
            except requests.RequestException as exc:  # a timeout: the registry is there but slow
                raise errors.RegistryUnavailable(f"{self.endpoint} did not answer: {exc.__class__.__name__}") from None
            self.schemes = [scheme]  # the scheme that answered, from now on
            return resp
        raise Unreachable(f"{self.endpoint}: {last.__class__.__name__}")

    def _authorization(self, scope: str, auth: dict[str, str]) -> str | None:
        token = self._tokens.get(scope)
        if token and token[1] > time.monotonic():
            return f"Bearer {token[0]}"
        if self._basic and auth.get("username"):
            return _basic(auth)
        return None

    def _answer(self, challenge: str, scope: str, auth: dict[str, str]) -> str | None:
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            self._basic = True
            return _basic(auth) if auth.get("username") else None
        if kind.lower() != "bearer":
            return None
        fields = dict(_CHALLENGE.findall(params))
        realm = fields.get("realm")
        if not realm:
            return None
        query = {"service": fields.get("service", ""), "scope": scope}
        try:
            resp = self.session.get(realm, params=query, timeout=TIMEOUT, verify=self.verify,
                                    auth=(auth["username"], auth["password"]) if auth.get("username") else None)
        except (requests.exceptions.SSLError, requests.exceptions.ConnectionError) as exc:
            raise Unreachable(f"{realm}: {exc.__class__.__name__}") from None
        except requests.RequestException as exc:
            raise errors.RegistryUnavailable(f"the token service {realm} did not answer: {exc.__class__.__name__}") from None
        if resp.status_code in (401, 403):
            raise errors.TokenRejected(f"the token service of {self.endpoint} refused the credentials (HTTP {resp.status_code})")
        if resp.status_code != 200:
            raise errors.RegistryUnavailable(f"the token service of {self.endpoint} answered HTTP {resp.status_code}")
        body: dict[str, Any] = resp.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise errors.RegistryUnavailable(f"the token service of {self.endpoint} answered no token")
        register_secret(token)
        lifetime = max(int(body.get("expires_in") or 60) - 10, 0)  # a little early: the clocks differ
        self._tokens[scope] = (token, time.monotonic() + lifetime)
        return f"Bearer {token}"


def _basic(auth: dict[str, str]) -> str:
    pair = f"{auth['username']}:{auth.get('password') or ''}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")

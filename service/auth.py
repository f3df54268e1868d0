"""Who is calling, and what they may do.

Clients present ``Authorization: Bearer <token>``; the configuration holds only the SHA-256 of
each token. The presented token's hash is compared with every client's in constant time, so
neither timing nor an early exit tells a caller how close a guess came. Scopes say what a
client may do (publish, pull, build, read, admin); glob patterns say on which repositories
(``team-a/*``), for targets and sources alike (the rules themselves: ``service/access.py``).
Admin may do everything and sees every job; others see only their own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from flask import g, request

from . import sources
from .access import ANONYMOUS, is_admin, may_use_image_name, may_use_repository  # noqa: F401 - the API's names for them
from .config import Client, ConfigError, Settings
from .errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

TOKEN_PREFIX = "imp_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, settings: Settings):
        if not settings.clients and not settings.anonymous:
            raise ConfigError(
                "no API clients are configured: add `clients` (see `imagepub token new`), "
                "or set `auth: {anonymous: true}` for local development only"
            )
        self.clients = settings.clients
        self.anonymous = settings.anonymous and not settings.clients
        if self.anonymous:
            log.warning("AUTHENTICATION IS OFF: auth.anonymous is set and no clients are configured; "
                        "anyone who reaches this API may publish and pull. Never run it like this in production.")

    def authenticate(self, header: str | None) -> Client:
        if self.anonymous:
            return ANONYMOUS
        if not header:
            raise Unauthorized("send an API token: Authorization: Bearer <token>")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send an API token: Authorization: Bearer <token>", invalid=True)
        presented = hash_token(token.strip())
        found = None
        for client in self.clients:  # every hash compared: no early exit
            if hmac.compare_digest(presented, client.token_sha256):
                found = client
        if found is None:
            raise Unauthorized("the API token is not valid", invalid=True)
        return found


def current_client() -> Client:
    return g.client


def require_scope(scope: str) -> Client:
    client = current_client()
    if scope not in client.scopes and "admin" not in client.scopes:
        raise Forbidden(f"client {client.name!r} lacks the {scope!r} scope")
    return client


def require_repositories(client: Client, repositories: list[tuple[str, str]]) -> None:
    """Every (field, repository) must match one of the client's patterns; else 403 naming them."""
    refused = [
        {"field": field, "message": f"client {client.name!r} may not use repository {repo!r}"}
        for field, repo in repositories
        if not may_use_repository(client, repo)
    ]
    if refused:
        raise Forbidden(
            "not allowed on repositories: " + ", ".join(e["field"] for e in refused), errors=refused
        )


def require_source(client: Client, source: str) -> None:
    """A publish's source is authorised like a target, by the repository it names (403 naming
    ``source``), so that no client publishes another's image. An image id names none: the
    worker checks the image it resolves to (workers/publish.py)."""
    if sources.is_image_id(source) or may_use_image_name(client, source):
        return
    name = sources.parse(source)
    raise Forbidden(
        "not allowed on repositories: source",
        errors=[{"field": "source", "message": f"client {client.name!r} may not publish from repository {name.repository!r}"}],
    )


def authenticate_request(authenticator: Authenticator) -> None:
    g.client = authenticator.authenticate(request.headers.get("Authorization"))

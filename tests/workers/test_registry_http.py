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

"""The API in-process (Flask test client) against the stack's real Redis, on a Redis database
of its own. Every response a test reads is checked against openapi.yaml."""

from __future__ import annotations

import pytest
import redis

from service import config
from service.app import create_app
from service.auth import hash_token

from clients import CLIENTS, TOKENS, bearer
from helpers import CheckedClient


@pytest.fixture(scope="session")
def redis_url(stack) -> str:
    return stack.redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(redis_url, monkeypatch):
    monkeypatch.setenv("LOCAL_PASSWORD", "s3cret-local-password")
    return config.parse(
        {
            "registries": {
                "local": {"type": "registry", "host": "localhost:5000"},
                "hub": {"type": "registry", "host": "docker.io", "username": "acme", "password_env": "LOCAL_PASSWORD"},
                "prod-ecr": {"type": "ecr", "region": "eu-west-1", "account_id": "123456789012", "create_repositories": True},
            },
            "limits": {"max_targets": 3, "max_tags_per_target": 4, "max_body_bytes": 4096},
            "clients": [
                {"name": name, "token_sha256": hash_token(TOKENS[name]), **rules} for name, rules in CLIENTS.items()
            ],
        },
        {"IMAGEPUB_REDIS_URL": redis_url},
    )


@pytest.fixture
def app(settings, redis_client):
    return create_app(settings)


@pytest.fixture
def client(app) -> CheckedClient:
    """An admin client: may do everything (the security tests use the others)."""
    return CheckedClient(app.test_client(), headers=bearer("admin"))


@pytest.fixture
def as_client(app):
    """``as_client("ci")``: a checked test client authenticated as that configured client."""
    return lambda name: CheckedClient(app.test_client(), headers=bearer(name) if name else {})

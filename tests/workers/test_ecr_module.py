"""workers/ecr.py against real Redis and moto server: error translation, the shared token
cache, and assume-role."""

from __future__ import annotations

import threading
import time

import boto3
import botocore.exceptions
import pytest
import redis

from service import errors
from service.config import Registry
from workers.ecr import Ecr, TokenCache, translate


def client_error(code: str, status: int = 400, message: str = "m") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize("code, status, expected, transient", [
    ("ThrottlingException", 400, errors.Throttled, True),
    ("ServiceUnavailableException", 503, errors.RegistryUnavailable, True),
    ("SomethingNew", 500, errors.RegistryUnavailable, True),
    ("AccessDeniedException", 400, errors.AccessDenied, False),
    ("RepositoryNotFoundException", 400, errors.RepositoryNotFound, False),
    ("RepositoryAlreadyExistsException", 400, errors.RepositoryExists, False),
    ("ExpiredTokenException", 400, errors.AuthFailed, False),
])
def test_one_place_sorts_ecr_errors(code, status, expected, transient):
    exc = translate(client_error(code, status), "op")
    assert type(exc) is expected and exc.transient is transient


def test_unknown_client_errors_are_permanent_and_named():
    exc = translate(client_error("LimitExceededException", 400, "too many repositories"), "create")
    assert exc.code == "ecr_error" and not exc.transient and "too many repositories" in exc.message
    assert isinstance(translate(botocore.exceptions.EndpointConnectionError(endpoint_url="x"), "op"), errors.RegistryUnavailable)
    assert isinstance(translate(botocore.exceptions.NoCredentialsError(), "op"), errors.AuthFailed)


@pytest.fixture
def cache(stack):
    client = redis.Redis.from_url(stack.redis_url.rsplit("/", 1)[0] + "/6", decode_responses=True)
    client.flushdb()
    yield TokenCache(client)
    client.flushdb()


def test_single_flight_one_fetch_for_many_callers(cache):
    calls = []

    def fetch():
        calls.append(1)
        time.sleep(0.3)  # a slow GetAuthorizationToken: everyone else waits for it
        return {"username": "AWS", "password": "p", "endpoint": "e", "expires_at": time.time() + 12 * 3600}

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", fetch, "r"))) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 30
    assert 0 < cache.redis.ttl("k") <= 12 * 3600 - 1800 + 1  # refreshed half an hour before expiry


def test_expiry_in_the_past_is_not_trusted_but_cached(cache):
    calls = []

    def fetch():
        calls.append(1)
        return {"username": "AWS", "password": "p", "endpoint": "e", "expires_at": 1_420_070_400.0}  # 2015, as moto says

    for _ in range(3):
        cache.get("k", fetch)
    assert len(calls) == 1 and 0 < cache.redis.ttl("k") <= cache.fallback_ttl + 1
    cache.drop("k")
    cache.get("k", fetch)
    assert len(calls) == 2


def test_assume_role_for_cross_account_pushes(stack, monkeypatch):
    # moto server answers STS too; the role's credentials sign the ECR calls
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    iam = boto3.client("iam", endpoint_url=stack.moto_url, region_name=stack.ecr_region)
    role = iam.create_role(RoleName=f"publisher-{time.time_ns()}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    ecr = Ecr.from_config(Registry(name="x", type="ecr", region=stack.ecr_region, role_arn=role))
    credentials = ecr.client._request_signer._credentials.get_frozen_credentials()
    assert credentials.access_key != "testing" and credentials.token  # temporary, from AssumeRole
    assert ecr.authorization()["endpoint"].endswith(".amazonaws.com")


def test_a_dead_fetchers_lock_holds_nobody_up_past_its_ttl(stack):
    """A worker that died while fetching leaves its single-flight lock behind (here: one taken
    with an hour's TTL, as the old code took them): the next caller waits at most the cache's
    lock TTL, then fetches itself instead of failing its job."""
    client = redis.Redis.from_url(stack.redis_url.rsplit("/", 1)[0] + "/6", decode_responses=True)
    client.flushdb()
    cache = TokenCache(client, lock_timeout=1)
    client.set("k:lock", "dead-worker-token", px=3_600_000)
    calls = []

    def fetch():
        calls.append(1)
        return {"username": "AWS", "password": "p", "endpoint": "e", "expires_at": time.time() + 12 * 3600}

    started = time.monotonic()
    assert cache.get("k", fetch)["password"] == "p"
    assert len(calls) == 1 and time.monotonic() - started < 5
    assert client.get("k:lock") == "dead-worker-token"  # not ours to release
    assert cache.get("k", fetch) and len(calls) == 1  # and the token is shared from now on
    client.flushdb()

"""The whole service on the real stack: ``imagepub serve`` (gunicorn) and ``imagepub worker``
(Celery) as separate processes, against the stack's Redis, Docker daemon, registries and moto."""

from __future__ import annotations

import uuid

import pytest
import redis

from ecr_api_proxy import EcrApiProxy
from service_process import Api, Service, base_config


@pytest.fixture(scope="session")
def ecr_api_proxy(stack):
    proxy = EcrApiProxy(stack.moto_url)
    yield proxy
    proxy.close()


@pytest.fixture
def ecr_api(ecr_api_proxy, stack):
    """The proxy in front of moto, with no faults and zeroed counters, and no cached ECR token."""
    ecr_api_proxy.reset()
    client = redis.Redis.from_url(stack.redis_url)
    for key in client.scan_iter("imagepub:ecr-token:*"):
        client.delete(key)
    yield ecr_api_proxy
    ecr_api_proxy.reset()


@pytest.fixture(scope="session")
def service(stack, ecr_api_proxy) -> Service:
    svc = Service(stack, base_config(stack), "imagepub", env={"AWS_ENDPOINT_URL_ECR": ecr_api_proxy.url})
    svc.start_api()
    svc.start_worker()
    return svc


@pytest.fixture(scope="session")
def api(service) -> Api:
    return service.api


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis_client_db0(stack):
    """The session service's Redis database."""
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)

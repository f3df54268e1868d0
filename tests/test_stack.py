"""Smoke tests for the test stack itself (tests/stack.py)."""

from __future__ import annotations

import base64
import signal
import sys
import uuid

import boto3
import redis

from stack import StackError


def _push(client, repository: str, tag: str, auth_config=None) -> list[dict]:
    return list(client.api.push(repository, tag=tag, auth_config=auth_config,
                                stream=True, decode=True))


def _aux_digest(events: list[dict]) -> str:
    errors = [e for e in events if "errorDetail" in e or "error" in e]
    assert not errors, errors
    digests = [e["aux"]["Digest"] for e in events if isinstance(e.get("aux"), dict)
               and "Digest" in e["aux"]]
    assert len(digests) == 1, events
    return digests[0]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_build_image_is_fresh_each_time(stack):
    client = stack.docker()
    a = stack.build_image("smoke/a:1", layers=3)
    b = stack.build_image("smoke/b:1", layers=3)
    assert a != b
    layers_a = client.images.get(a).attrs["RootFS"]["Layers"]
    layers_b = client.images.get(b).attrs["RootFS"]["Layers"]
    assert len(layers_a) == 3 and not set(layers_a) & set(layers_b)
    client.close()


def test_push_plain_registry_digests_agree(stack):
    client = stack.docker()
    repo = f"{stack.registry}/{_name('plain')}"
    image_id = stack.build_image(f"{repo}:v1", layers=3)
    assert client.images.get(f"{repo}:v1").id == image_id
    pushed = _aux_digest(_push(client, repo, "v1"))
    name = repo.split("/", 1)[1]
    assert stack.registry_digest(stack.registry, name, "v1") == pushed
    assert stack.skopeo_digest(f"{repo}:v1") == pushed
    assert stack.registry_tags(stack.registry, name) == ["v1"]
    assert stack.registry_digest(stack.registry, name, "missing") is None
    client.close()


def test_push_auth_registry(stack):
    client = stack.docker()
    repo = f"{stack.auth_registry}/{_name('auth')}"
    stack.build_image(f"{repo}:v1", layers=2)

    bad = _push(client, repo, "v1",
                {"username": stack.auth_user, "password": stack.auth_password + "x"})
    assert any("errorDetail" in e for e in bad), bad

    good = _push(client, repo, "v1",
                 {"username": stack.auth_user, "password": stack.auth_password})
    pushed = _aux_digest(good)
    name = repo.split("/", 1)[1]
    assert stack.registry_digest(stack.auth_registry, name, "v1") == pushed
    assert stack.skopeo_digest(f"{repo}:v1") == pushed
    # Without credentials the registry refuses.
    r = stack.registry_request("GET", stack.auth_registry, "/v2/", auth=("nobody", "nope"))
    assert r.status == 401
    client.close()


def test_push_emulated_ecr(stack):
    client = stack.docker()
    repo = f"{stack.ecr_host}/{_name('some-repo')}"
    stack.build_image(f"{repo}:v1", layers=3)
    pushed = _aux_digest(_push(client, repo, "v1",
                               {"username": "AWS", "password": "123456789012-auth-token"}))
    name = repo.split("/", 1)[1]
    # HTTPS to ecr_ip:443, SNI + hostname check = ecr_host, verified against ecr_ca.
    assert stack.registry_digest(stack.ecr_host, name, "v1") == pushed
    # skopeo inside the daemon's mount namespace (its /etc/hosts and certs.d).
    assert stack.skopeo_digest(f"{repo}:v1") == pushed

    bad = _push(client, repo, "v1", {"username": "AWS", "password": "expired"})
    assert any("errorDetail" in e for e in bad), bad
    client.close()


def test_moto_ecr_api(stack):
    ecr = boto3.client("ecr", endpoint_url=stack.moto_url, region_name=stack.ecr_region,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    data = ecr.get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    assert (user, password) == (stack.ecr_user, stack.ecr_password)
    assert data["proxyEndpoint"] == f"https://{stack.ecr_host}"


def test_env_points_at_stack(stack):
    env = stack.env()
    assert env["IMAGEPUB_REDIS_URL"] == stack.redis_url
    assert env["DOCKER_HOST"] == stack.docker_host
    assert env["AWS_ENDPOINT_URL_ECR"] == stack.moto_url
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "PATH" in env


def test_restart_redis_keeps_data(stack):
    r = redis.Redis.from_url(stack.redis_url)
    key = _name("smoke")
    r.set(key, "kept")
    stack.restart_redis()
    r2 = redis.Redis.from_url(stack.redis_url)
    assert r2.get(key) == b"kept"
    r.close()
    r2.close()


def test_spawn_log_and_kill(stack):
    code = ("import os, sys, time; print('hello', os.environ['IMAGEPUB_REDIS_URL'], flush=True);"
            "time.sleep(60)")
    proc = stack.spawn("sleeper", [sys.executable, "-c", code])
    stack.wait_for_log("sleeper", "hello redis://")
    assert stack.redis_url in stack.log("sleeper")
    stack.kill("sleeper", signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    # A new process under the same name: only its own output counts.
    stack.spawn("sleeper", [sys.executable, "-c", "print('second', flush=True)"])
    stack.wait_for_log("sleeper", "second")
    assert "hello" in stack.log("sleeper") and "hello" not in stack.log("sleeper", current=True)
    try:
        stack.wait_for_log("sleeper", "hello", timeout=2)
    except StackError:
        pass
    else:
        raise AssertionError("expected StackError")

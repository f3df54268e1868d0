"""Smoke tests for the test stack itself (tests/stack.py)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import signal
import ssl
import sys
import uuid

import boto3
import pytest
import redis

from registry_proxy import JSON_CONTENT_TYPE
from stack import StackError

ECR_AUTH = {"username": "AWS", "password": "123456789012-auth-token"}


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
    stack.ecr_registry.reset()
    pushed = _aux_digest(_push(client, repo, "v1",
                               {"username": "AWS", "password": "123456789012-auth-token"}))
    name = repo.split("/", 1)[1]
    # Through the TLS proxy on ecr_ip:443 (the fault-injection seam), chunked PATCH uploads.
    seen = stack.ecr_registry.requests()
    assert ("PUT", f"/v2/{name}/manifests/v1", 201) in seen
    assert any(r.method == "PATCH" and r.status == 202 for r in seen), seen
    # HTTPS to ecr_ip:443, SNI + hostname check = ecr_host, verified against ecr_ca.
    assert stack.registry_digest(stack.ecr_host, name, "v1") == pushed
    # skopeo inside the daemon's mount namespace (its /etc/hosts and certs.d).
    assert stack.skopeo_digest(f"{repo}:v1") == pushed

    bad = _push(client, repo, "v1", {"username": "AWS", "password": "expired"})
    assert any("errorDetail" in e for e in bad), bad
    client.close()


@pytest.fixture
def ecr_registry(stack):
    """The proxy in front of the ECR registry, with an empty log and no faults armed."""
    stack.ecr_registry.reset()
    yield stack.ecr_registry
    stack.ecr_registry.reset()


def _errors(events: list[dict]) -> list[str]:
    return [e["errorDetail"]["message"] for e in events if "errorDetail" in e]


def _ecr_connection(stack) -> http.client.HTTPSConnection:
    # The certificate also names ecr_ip, so this verifies without our own name resolution.
    ctx = ssl.create_default_context(cafile=str(stack.ecr_ca))
    conn = http.client.HTTPSConnection(stack.ecr_ip, 443, context=ctx, timeout=30)
    conn.connect()
    return conn


def test_ecr_proxy_streams_chunked_uploads_over_one_connection(stack, ecr_registry):
    """Raw registry API through the proxy: Location points back at the ECR host name,
    a chunked PATCH of a multi-MB blob arrives intact, HEAD has no body, keep-alive holds."""
    repo = _name("raw/blob")
    token = base64.b64encode(f"{stack.ecr_user}:{stack.ecr_password}".encode()).decode()
    hdrs = {"Host": stack.ecr_host, "Authorization": f"Basic {token}"}
    blob = os.urandom(5 * 1024 * 1024 + 123)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    conn = _ecr_connection(stack)
    sock = conn.sock
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers=hdrs)
        r = conn.getresponse()
        r.read()
        assert r.status == 202
        location = r.getheader("Location")
        assert location.startswith(f"https://{stack.ecr_host}/v2/{repo}/blobs/uploads/"), location
        upload = location.removeprefix(f"https://{stack.ecr_host}")

        pieces = (blob[i:i + 300_001] for i in range(0, len(blob), 300_001))
        conn.request("PATCH", upload, body=pieces, encode_chunked=True,
                     headers={**hdrs, "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 202, (r.status, body)
        assert r.getheader("Range") == f"0-{len(blob) - 1}"
        upload = r.getheader("Location").removeprefix(f"https://{stack.ecr_host}")

        sep = "&" if "?" in upload else "?"
        conn.request("PUT", f"{upload}{sep}digest={digest}", headers={**hdrs, "Content-Length": "0"})
        r = conn.getresponse()
        r.read()
        assert r.status == 201, r.status

        conn.request("HEAD", f"/v2/{repo}/blobs/{digest}", headers=hdrs)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b""
        assert int(r.getheader("Content-Length")) == len(blob)
        assert r.getheader("Docker-Content-Digest") == digest

        conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers=hdrs)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == blob
        assert conn.sock is sock  # every request above went over the one connection
    finally:
        conn.close()
    # (Filtered by repository: late requests of an earlier test's failed push may still land.)
    seen = [(m, p.split("/blobs/")[1].split("/")[0], st) for m, p, st in ecr_registry.requests()
            if p.startswith(f"/v2/{repo}/")]
    assert seen == [("POST", "uploads", 202), ("PATCH", "uploads", 202), ("PUT", "uploads", 201),
                    ("HEAD", digest, 200), ("GET", digest, 200)]
    assert "PATCH" in stack.log("ecr-proxy") and "chunked" in stack.log("ecr-proxy")


def test_ecr_proxy_fail_answers_instead_of_forwarding(stack, ecr_registry):
    ecr_registry.fail("GET", r"^/v2/_catalog$", 401,
                      {"errors": [{"code": "UNAUTHORIZED", "message": "nope"}]}, times=2)
    for _ in range(2):
        r = stack.registry_request("GET", stack.ecr_host, "/v2/_catalog")
        assert r.status == 401
        assert r.headers["Content-Type"] == JSON_CONTENT_TYPE
        assert r.headers["WWW-Authenticate"].startswith(f'Basic realm="https://{stack.ecr_host}/"')
        assert r.data == b'{"errors":[{"code":"UNAUTHORIZED","message":"nope"}]}'
    assert stack.registry_request("GET", stack.ecr_host, "/v2/_catalog").status == 200  # used up
    ecr_registry.fail(None, r"/tags/list$", 503, {"errors": []}, times=5)
    assert stack.registry_request("HEAD", stack.ecr_host, "/v2/x/tags/list").status == 503
    assert len(ecr_registry.armed()) == 1
    ecr_registry.reset()
    assert ecr_registry.armed() == [] and ecr_registry.requests() == []
    assert stack.registry_request("GET", stack.ecr_host, "/v2/x/tags/list").status == 404


def test_ecr_immutable_tag_as_the_daemon_reports_it(stack, ecr_registry):
    client = stack.docker()
    name = _name("team/immutable")
    repo = f"{stack.ecr_host}/{name}"
    stack.build_image(f"{repo}:1.0.0", layers=2)
    first = _aux_digest(_push(client, repo, "1.0.0", ECR_AUTH))

    ecr_registry.immutable_tag(name, "1.0.0")
    stack.build_image(f"{repo}:1.0.0", layers=2)  # new content, same tag
    events = _push(client, repo, "1.0.0", ECR_AUTH)
    assert _errors(events) == [
        f"tag invalid: The image tag '1.0.0' already exists in the '{name}' repository "
        "and cannot be overwritten because the repository is immutable."
    ], events
    assert ("PUT", f"/v2/{name}/manifests/1.0.0", 400) in ecr_registry.requests()
    assert stack.registry_digest(stack.ecr_host, name, "1.0.0") == first  # nothing overwritten

    # The fault is used up: the same push now goes through.
    assert ecr_registry.armed() == []
    second = _aux_digest(_push(client, repo, "1.0.0", ECR_AUTH))
    assert second != first
    assert stack.registry_digest(stack.ecr_host, name, "1.0.0") == second
    assert [r for r in ecr_registry.requests() if r.method == "PUT" and "/manifests/" in r.path] == [
        ("PUT", f"/v2/{name}/manifests/1.0.0", 201),
        ("PUT", f"/v2/{name}/manifests/1.0.0", 400),
        ("PUT", f"/v2/{name}/manifests/1.0.0", 201),
    ]
    client.close()


def test_ecr_expired_token_as_the_daemon_reports_it(stack, ecr_registry):
    client = stack.docker()
    name = _name("team/expired")
    repo = f"{stack.ecr_host}/{name}"
    stack.build_image(f"{repo}:v1", layers=2)
    ecr_registry.expired_token()
    events = _push(client, repo, "v1", ECR_AUTH)
    assert _errors(events) == [
        "denied: Your authorization token has expired. Reauthenticate and try again."
    ], events
    assert [r for r in ecr_registry.requests() if r.status == 403 and name in r.path] == [
        ("POST", f"/v2/{name}/blobs/uploads/", 403)
    ]
    assert stack.registry_digest(stack.ecr_host, name, "v1") is None
    assert _aux_digest(_push(client, repo, "v1", ECR_AUTH))  # the next push goes through
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

"""Who may do what: tokens, scopes, repository patterns, ownership, rate limits, queue depth.
Each rule is attacked through the HTTP API."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import yaml

from clients import TOKENS, bearer
from helpers import GOOD, SPEC, CheckedClient, problem, queued_job_ids
from service.app import create_app
from service.config import ConfigError, parse

PUBLIC = {"/healthz", "/readyz", "/openapi.yaml", "/metrics"}
JOB = "0190f2a4-0000-7000-8000-000000000000"


def protected_operations():
    spec = yaml.safe_load(SPEC.read_text())
    for path, item in spec["paths"].items():
        for method in ("get", "post"):
            if method in item and path not in PUBLIC:
                concrete = path.replace("{job_id}", JOB).replace("{registry}", "local").replace("{repository}", "team/app")
                yield method, concrete


@pytest.mark.parametrize("method, path", list(protected_operations()))
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic YWRtaW46YWRtaW4=", f"Bearer {TOKENS['admin']}x", "Bearer "])
def test_every_protected_endpoint_needs_a_valid_token(as_client, method, path, authorization):
    client = as_client(None)
    headers = {"Authorization": authorization} if authorization else {}
    resp = client.open(path, method=method.upper(), headers=headers, json={})
    body = problem(resp, 401, "unauthorized")
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="imagepub"')
    assert ('error="invalid_token"' in challenge) == (authorization is not None)
    assert "token" in body["detail"]


def test_public_endpoints_need_no_token(as_client):
    client = as_client(None)
    for path in ("/healthz", "/openapi.yaml", "/metrics"):
        assert client.get(path).status_code == 200
    assert client.get("/readyz").status_code in (200, 503)


def test_scopes(as_client, redis_client):
    problem(as_client("reader").post("/v1/publish", json=GOOD), 403, "forbidden")
    problem(as_client("reader").post("/v1/pull", json={"registry": "local", "repository": "python-lab"}), 403, "forbidden")
    problem(as_client("limited").get("/v1/registries"), 403, "forbidden")
    problem(as_client("ci").post("/v1/registries/prod-ecr/repositories", json={"name": "other/app"}), 403, "forbidden")
    assert as_client("reader").get("/v1/registries").status_code == 200
    assert redis_client.keys("imagepub:job:*") == [] and queued_job_ids(redis_client) == []


def test_repository_patterns_checked_for_every_target_before_anything_is_stored(as_client, redis_client):
    body = {"source": "team/a:b", "targets": [
        {"registry": "local", "repository": "team/app", "tags": ["1"]},
        {"registry": "local", "repository": "other/app", "tags": ["1"]},
        {"registry": "local", "repository": "team", "tags": ["1"]},
    ]}
    resp = problem(as_client("ci").post("/v1/publish", json=body), 403, "forbidden")
    assert [e["field"] for e in resp["errors"]] == ["targets.1.repository", "targets.2.repository"]
    assert redis_client.keys("imagepub:job:*") == [] and queued_job_ids(redis_client) == []
    problem(as_client("team-b").post("/v1/pull", json={"registry": "local", "repository": "team/app"}), 403, "forbidden")
    problem(as_client("ci").get("/v1/registries/prod-ecr/repositories/other/app"), 403, "forbidden")
    assert as_client("ci").post("/v1/publish", json={**body, "targets": body["targets"][:1]}).status_code == 202


def test_clients_see_only_their_own_jobs(as_client):
    ci, team_b, admin = as_client("ci"), as_client("team-b"), as_client("admin")
    mine = ci.post("/v1/publish", json=GOOD).get_json()
    theirs = team_b.post("/v1/pull", json={"registry": "local", "repository": "team-b/x"}).get_json()
    assert mine["client"] == "ci" and theirs["client"] == "team-b"

    for job in (theirs,):
        problem(ci.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
        problem(ci.post(f"/v1/jobs/{job['id']}/cancel"), 404, "job_not_found")
        problem(ci.get(f"/v1/jobs/{job['id']}/events"), 404, "job_not_found")
    assert [j["id"] for j in ci.get("/v1/jobs").get_json()["jobs"]] == [mine["id"]]
    assert [j["id"] for j in ci.get("/v1/jobs?kind=pull").get_json()["jobs"]] == []
    assert [j["id"] for j in team_b.get("/v1/jobs?state=queued").get_json()["jobs"]] == [theirs["id"]]
    assert {j["id"] for j in admin.get("/v1/jobs").get_json()["jobs"]} == {mine["id"], theirs["id"]}
    assert admin.get(f"/v1/jobs/{mine['id']}").status_code == 200
    assert ci.post(f"/v1/jobs/{mine['id']}/cancel").status_code == 200
    # cancelling moved it between ci's own state indexes too
    assert [j["id"] for j in ci.get("/v1/jobs?state=cancelled").get_json()["jobs"]] == [mine["id"]]
    assert ci.get("/v1/jobs?state=queued").get_json()["jobs"] == []


def test_idempotency_keys_are_per_client(as_client):
    a = as_client("ci").post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "same"}).get_json()
    b = as_client("admin").post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "same"}).get_json()
    assert a["id"] != b["id"]


def test_rate_limit_per_client_shared_across_processes(settings, redis_client, as_client):
    # two app instances = two gunicorn workers or two replicas: one count in Redis
    first, second = (CheckedClient(create_app(settings).test_client(), headers=bearer("limited")) for _ in range(2))
    for client in (first, second, first):
        assert client.post("/v1/publish", json=GOOD).status_code == 202
    resp = second.post("/v1/publish", json=GOOD)
    problem(resp, 429, "too_many_requests")
    assert int(resp.headers["Retry-After"]) > 0
    assert as_client("admin").post("/v1/publish", json=GOOD).status_code == 202  # others are not throttled


def test_queue_depth_cap(settings, redis_client):
    capped = replace(settings, limits=replace(settings.limits, max_queued_jobs=2))
    client = CheckedClient(create_app(capped).test_client(), headers=bearer("admin"))
    for _ in range(2):
        assert client.post("/v1/publish", json=GOOD).status_code == 202
    resp = client.post("/v1/publish", json=GOOD)
    problem(resp, 503, "queue_full")
    assert resp.headers["Retry-After"]
    assert len(queued_job_ids(redis_client)) == 2
    # the cap is counted when a job is stored: room made is room at once
    job_id = queued_job_ids(redis_client)[0]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert client.post("/v1/publish", json=GOOD).status_code == 202


def test_the_queue_cap_holds_when_many_submit_at_once(settings, redis_client):
    """Twelve submissions at the same moment against room for three: three jobs are stored
    and queued, nine are refused with nothing stored (each request's idempotency key free
    again), whichever processes and threads they arrive on."""
    capped = replace(settings, limits=replace(settings.limits, max_queued_jobs=3))
    apps = [create_app(capped) for _ in range(2)]  # two API processes' worth of state
    start = threading.Barrier(12)

    def submit(i: int):
        client = CheckedClient(apps[i % 2].test_client(), headers={**bearer("admin"), "Idempotency-Key": f"burst-{i}"})
        start.wait()
        return client.post("/v1/publish", json=GOOD)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(submit, range(12)))
    assert sorted(resp.status_code for resp in answers) == [202] * 3 + [503] * 9
    for resp in answers:
        if resp.status_code == 503:
            problem(resp, 503, "queue_full")
    assert len(queued_job_ids(redis_client)) == 3
    assert len(redis_client.keys("imagepub:idem:*")) == 3


def test_no_clients_and_no_anonymous_refuses_to_start(redis_url):
    with pytest.raises(ConfigError, match="no API clients are configured"):
        create_app(parse({}, {"IMAGEPUB_REDIS_URL": redis_url}))
    with pytest.raises(ConfigError, match="tokens never go in the file"):
        parse({"clients": [{"name": "x", "token": "plain", "scopes": ["read"]}]}, {})


def test_anonymous_mode_is_loud(redis_url, caplog):
    app = create_app(parse({"auth": {"anonymous": True}}, {"IMAGEPUB_REDIS_URL": redis_url}))
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)
    assert app.test_client().get("/v1/jobs").status_code == 200


def test_tokens_never_echoed(as_client):
    resp = as_client("ci").post("/v1/publish", json=GOOD)
    assert TOKENS["ci"] not in resp.get_data(as_text=True)
    assert not re.search(r"imp_test-\w+-token", as_client("admin").get("/v1/jobs").get_data(as_text=True))


def test_token_new_prints_a_token_and_an_entry_that_accepts_it(redis_url):
    out = subprocess.run([sys.executable, "-m", "service.cli", "token", "new", "ci-team-a", "--scopes", "publish,read",
                          "--repositories", "team-a/*"], capture_output=True, text=True, check=True).stdout
    token = re.search(r"^  (imp_\S+)$", out, re.M).group(1)
    entry = yaml.safe_load(out.split("configuration:\n", 1)[1])
    assert token not in yaml.safe_dump(entry)
    settings = parse({"clients": entry}, {"IMAGEPUB_REDIS_URL": redis_url})
    client = CheckedClient(create_app(settings).test_client(), headers={"Authorization": f"Bearer {token}"})
    assert client.post("/v1/publish", json={"source": "team-a/app:1", "targets": [{"registry": "x", "repository": "team-a/app", "tags": ["1"]}]}).status_code == 422  # authenticated; x is unknown
    problem(client.post("/v1/pull", json={"registry": "x", "repository": "team-a/app"}), 403, "forbidden")

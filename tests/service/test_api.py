"""The HTTP API: what it accepts, what it refuses and how, what it stores and enqueues."""

from __future__ import annotations

import json

import pytest

from helpers import GOOD, problem, queued_job_ids

def test_publish_is_stored_then_enqueued(client, redis_client):
    resp = client.post("/v1/publish", json=GOOD)
    assert resp.status_code == 202
    job = resp.get_json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["kind"] == "publish" and job["attempts"] == 0
    assert job["request"] == {**GOOD, "create_repository": False, "callback_url": None}
    assert job["targets"][0]["tags"] == ["latest", "1.4.2"] and job["targets"][0]["digest"] is None
    assert queued_job_ids(redis_client) == [job["id"]]
    assert job["daemon"] == "default"  # no worker has registered a daemon yet: the single daemon's name
    read = client.get(resp.headers["Location"]).get_json()
    assert read.pop("waiting_for") == "daemon default has no worker"  # none is running in these tests
    assert read == job


def test_the_location_of_a_job_names_the_api_where_it_is_mounted(client, app):
    """Behind a proxy that mounts the API under a path (SCRIPT_NAME), the 202's Location is the
    URL Flask itself builds for the job there."""
    resp = client.post("/v1/publish", json=GOOD, base_url="http://localhost/imagepub")
    assert resp.status_code == 202
    job_id = resp.get_json()["id"]
    with app.test_request_context("/v1/publish", base_url="http://localhost/imagepub"):
        from flask import url_for

        assert resp.headers["Location"] == url_for("jobs.get_job", job_id=job_id) == f"/imagepub/v1/jobs/{job_id}"


def test_pull_defaults_to_latest(client, redis_client):
    resp = client.post("/v1/pull", json={"registry": "local", "repository": "team/app"})
    assert resp.status_code == 202
    assert resp.get_json()["request"] == {"registry": "local", "repository": "team/app", "tag": "latest"}
    assert queued_job_ids(redis_client) == [resp.get_json()["id"]]


def test_targets_for_one_repository_are_merged(client):
    body = {"source": "a:b", "targets": [
        {"registry": "local", "repository": "x", "tags": ["1", "2"]},
        {"registry": "local", "repository": "x", "tags": ["2", "3"]},
    ]}
    job = client.post("/v1/publish", json=body).get_json()
    assert [t["tags"] for t in job["targets"]] == [["1", "2", "3"]]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"source": ""}, "source"),
        ({"source": "UPPER/case:tag"}, "source"),
        ({"source": "ok:tag --rm"}, "source"),
        ({"targets": []}, "targets"),
        ({"targets": [{"registry": "local", "repository": "Team/App", "tags": ["x"]}]}, "targets.0.repository"),
        ({"targets": [{"registry": "local", "repository": "team//app", "tags": ["x"]}]}, "targets.0.repository"),
        ({"targets": [{"registry": "local", "repository": "team/app-", "tags": ["x"]}]}, "targets.0.repository"),
        ({"targets": [{"registry": "local", "repository": "a" * 256, "tags": ["x"]}]}, "targets.0.repository"),
        ({"targets": [{"registry": "local", "repository": "tëam", "tags": ["x"]}]}, "targets.0.repository"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": [".hidden"]}]}, "targets.0.tags.0"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": ["t" * 129]}]}, "targets.0.tags.0"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": ["ok\n"]}]}, "targets.0.tags.0"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": []}]}, "targets.0.tags"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": ["1", "2", "3", "4", "5"]}]}, "targets.0.tags"),
        ({"targets": [{"registry": "local", "repository": f"r{i}", "tags": ["x"]} for i in range(4)]}, "targets"),
        ({"targets": [{"registry": "local", "repository": "app", "tags": ["x"], "host": "evil.example"}]}, "targets.0.host"),
        ({"unexpected": True}, "unexpected"),
        ({"create_repository": "yes please"}, "create_repository"),
        ({"callback_url": "ftp://x"}, "callback_url"),
    ],
)
def test_publish_validation(client, redis_client, change, field):
    body = problem(client.post("/v1/publish", json={**GOOD, **change}), 422, "validation_failed")
    assert field in [e["field"] for e in body["errors"]], body
    assert queued_job_ids(redis_client) == [] and redis_client.keys("imagepub:job:*") == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"registry": "local", "repository": "app", "tag": "bad tag"}, "tag"),
        ({"registry": "local", "repository": "app", "digest": "sha256:abc"}, "digest"),
        ({"registry": "local", "repository": "app", "digest": "sha256:" + "A" * 64}, "digest"),
        ({"registry": "local", "repository": "app", "digest": "sha512:" + "a" * 64}, "digest"),
        ({"registry": "local", "repository": "app", "tag": "x", "digest": "sha256:" + "a" * 64}, "digest"),
        ({"registry": "local"}, "repository"),
        ({"repository": "app"}, "registry"),
    ],
)
def test_pull_validation(client, body, field):
    body = problem(client.post("/v1/pull", json=body), 422, "validation_failed")
    assert field in [e["field"] for e in body["errors"]]


def test_unknown_registry(client, redis_client):
    body = problem(client.post("/v1/publish", json={**GOOD, "targets": [
        {"registry": "local", "repository": "a", "tags": ["x"]},
        {"registry": "nowhere", "repository": "a", "tags": ["x"]},
    ]}), 422, "registry_not_configured")
    assert [e["field"] for e in body["errors"]] == ["targets.1.registry"]
    assert body["errors"][0]["message"] == "no registry named 'nowhere' is configured (configured: hub, local, prod-ecr)"
    problem(client.post("/v1/pull", json={"registry": "nowhere", "repository": "a"}), 422, "registry_not_configured")
    assert redis_client.keys("imagepub:job:*") == []


def test_body_limits_and_media_type(client):
    big = {**GOOD, "source": "a:b", "padding": "x" * 5000}
    problem(client.post("/v1/publish", json=big), 413, "payload_too_large")
    problem(client.post("/v1/publish", data="{}", content_type="text/plain"), 415, "unsupported_media_type")
    problem(client.post("/v1/publish", data="{not json", content_type="application/json"), 400, "invalid_json")
    body = problem(client.post("/v1/publish", json=["a", "list"]), 422, "validation_failed")
    assert body["errors"][0]["field"] == "body"


def test_unknown_job_is_404(client):
    problem(client.get("/v1/jobs/0190f2a4-0000-7000-8000-000000000000"), 404, "job_not_found")
    problem(client.get("/v1/jobs/not-a-uuid"), 404, "job_not_found")
    problem(client.client.get("/v1/nothing", headers=client.headers), 404, "not_found")  # not in the spec: unchecked


def test_list_jobs_newest_first_with_filters_and_cursor(client):
    ids = [client.post("/v1/publish", json=GOOD).get_json()["id"] for _ in range(5)]
    pull_id = client.post("/v1/pull", json={"registry": "local", "repository": "a"}).get_json()["id"]
    everything = client.get("/v1/jobs").get_json()
    assert [j["id"] for j in everything["jobs"]] == [pull_id, *reversed(ids)]
    assert everything["next_cursor"] is None

    seen, cursor = [], None
    while True:
        resp = client.get("/v1/jobs", query_string={"kind": "publish", "limit": 2, **({"cursor": cursor} if cursor else {})})
        page = resp.get_json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            assert "Link" not in resp.headers
            break
        assert resp.headers["Link"].endswith('rel="next"') and "kind=publish" in resp.headers["Link"]
    assert seen == list(reversed(ids))

    assert [j["id"] for j in client.get("/v1/jobs?state=queued&kind=pull").get_json()["jobs"]] == [pull_id]
    assert client.get("/v1/jobs?state=succeeded").get_json()["jobs"] == []
    problem(client.get("/v1/jobs?state=bogus"), 422, "validation_failed")
    problem(client.get("/v1/jobs?limit=0"), 422, "validation_failed")
    problem(client.get("/v1/jobs?cursor=zzz"), 422, "validation_failed")
    problem(client.get("/v1/jobs?page=2"), 422, "validation_failed")


def test_state_changes_move_jobs_between_filters(app, client):
    job_id = client.post("/v1/publish", json=GOOD).get_json()["id"]
    store = app.extensions["imagepub"]["store"]
    job = store.get(job_id)
    job["state"] = "running"
    store.save(job)
    assert client.get("/v1/jobs?state=queued").get_json()["jobs"] == []
    assert [j["id"] for j in client.get("/v1/jobs?state=running&kind=publish").get_json()["jobs"]] == [job_id]


def test_registries_never_show_secrets(client):
    body = client.get("/v1/registries").get_json()
    assert {r["name"]: r["type"] for r in body["registries"]} == {"local": "registry", "hub": "registry", "prod-ecr": "ecr"}
    text = json.dumps(body)
    assert "LOCAL_PASSWORD" not in text and "s3cret" not in text and "password" not in text and "username" not in text


def test_redis_down_answers_503_and_keeps_nothing(settings, redis_client):
    from dataclasses import replace

    from stack import free_port

    from clients import bearer
    from helpers import CheckedClient
    from service.app import create_app

    nowhere = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = CheckedClient(create_app(nowhere).test_client(), headers=bearer("admin"))
    job = "/v1/jobs/0190f2a4-0000-7000-8000-000000000000"
    for resp in (client.post("/v1/publish", json=GOOD), client.get("/v1/jobs"), client.get(job),
                 client.post(f"{job}/cancel"), client.get(f"{job}/events")):
        assert resp.status_code == 503 and resp.headers["Retry-After"]
        assert resp.get_json()["code"] in {"queue_unavailable", "store_unavailable"}


def test_health_and_spec(client, app):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    resp = client.get("/openapi.yaml")
    assert resp.status_code == 200 and resp.data.startswith(b"openapi: 3.1.0")


def test_readyz_needs_a_worker_heartbeat(client, app):
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["redis"]["ok"] is True
    assert resp.get_json()["checks"]["workers"]["ok"] is False
    app.extensions["imagepub"]["fleet"].register("worker@test", {"daemon": "default"})  # what a worker's heartbeat writes
    resp = client.get("/readyz")
    assert resp.status_code == 200 and resp.get_json()["checks"]["workers"]["live"] == 1

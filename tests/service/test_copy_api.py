"""POST /v1/copy: what the API accepts, refuses (problem+json, the offending field) and stores."""

from __future__ import annotations

import pytest

from helpers import problem, queued_job_ids

COPY = {
    "source": {"registry": "prod-ecr", "repository": "team/app", "tag": "1.4"},
    "targets": [{"registry": "hub", "repository": "team/app", "tags": ["1.4", "latest"]}],
}


def test_copy_is_stored_then_enqueued_with_its_defaults(client, redis_client):
    resp = client.post("/v1/copy", json=COPY)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["kind"] == "copy" and job["state"] == "queued" and job["source"] is None
    assert job["request"] == {**COPY, "platforms": "all", "signatures": True, "create_repository": False, "callback_url": None}
    assert job["targets"] == [{
        "registry": "hub", "repository": "team/app", "tags": ["1.4", "latest"], "state": "pending", "references": [],
        "digest": None, "size": None, "layers": [], "repository_created": False, "manifests": [], "signatures": [],
    }]
    assert "daemon" not in job  # needs none
    assert queued_job_ids(redis_client) == [job["id"]]
    assert client.get("/v1/jobs?kind=copy").get_json()["jobs"][0]["id"] == job["id"]


def test_copy_source_defaults_to_latest_and_takes_a_digest(client):
    body = {**COPY, "source": {"registry": "local", "repository": "team/app"}}
    assert client.post("/v1/copy", json=body).get_json()["request"]["source"]["tag"] == "latest"
    digest = "sha256:" + "a" * 64
    body = {**COPY, "source": {"registry": "local", "repository": "team/app", "digest": digest}, "platforms": ["linux/arm64"]}
    request = client.post("/v1/copy", json=body).get_json()["request"]
    assert request["source"] == {"registry": "local", "repository": "team/app", "digest": digest}
    assert request["platforms"] == ["linux/arm64"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"source": "prod-ecr/team/app:1.4"}, "source"),
        ({"source": {"registry": "prod-ecr", "repository": "team/app", "tag": "1", "digest": "sha256:" + "a" * 64}}, "source.digest"),
        ({"source": {"registry": "prod-ecr", "repository": "Team/App"}}, "source.repository"),
        ({"source": {"registry": "prod-ecr", "repository": "team/app", "tag": "bad tag"}}, "source.tag"),
        ({"source": {"registry": "prod-ecr", "repository": "team/app", "digest": "sha256:abc"}}, "source.digest"),
        ({"source": {"repository": "team/app"}}, "source.registry"),
        ({"source": {"registry": "prod-ecr", "repository": "team/app", "host": "evil.example"}}, "source.host"),
        ({"platforms": "some"}, "platforms"),
        ({"platforms": []}, "platforms"),
        ({"platforms": ["linux/arm64", "Linux/AMD64"]}, "platforms.1"),
        ({"platforms": ["linux"]}, "platforms.0"),
        ({"platforms": ["linux/arm64 --all"]}, "platforms.0"),
        ({"platforms": [f"linux/arch{i}" for i in range(33)]}, "platforms"),
        ({"signatures": "yes"}, "signatures"),
        ({"create_repository": 1}, "create_repository"),
        ({"daemon": "default"}, "daemon"),
        ({"targets": []}, "targets"),
        ({"targets": [{"registry": "hub", "repository": "team/app", "tags": ["1", "2", "3", "4", "5"]}]}, "targets.0.tags"),
        ({"targets": [{"registry": "hub", "repository": f"team/r{i}", "tags": ["x"]} for i in range(4)]}, "targets"),
        # onto itself: the source's own tag (with a subset, it would cut its index down)
        ({"targets": [{"registry": "local", "repository": "x", "tags": ["1"]},
                      {"registry": "prod-ecr", "repository": "team/app", "tags": ["1.4"]}]}, "targets.1.tags"),
        ({"callback_url": "ftp://x"}, "callback_url"),
    ],
)
def test_copy_validation(client, redis_client, change, field):
    body = problem(client.post("/v1/copy", json={**COPY, **change}), 422, "validation_failed")
    assert field in [e["field"] for e in body["errors"]], body
    assert queued_job_ids(redis_client) == [] and redis_client.keys("imagepub:job:*") == []


def test_copy_registries_must_be_configured_on_either_side(client, redis_client):
    body = problem(client.post("/v1/copy", json={
        "source": {"registry": "nowhere", "repository": "team/app"},
        "targets": [{"registry": "local", "repository": "a", "tags": ["x"]}, {"registry": "elsewhere", "repository": "a", "tags": ["x"]}],
    }), 422, "registry_not_configured")
    assert [e["field"] for e in body["errors"]] == ["source.registry", "targets.1.registry"]
    assert redis_client.keys("imagepub:job:*") == []


def test_copy_applies_ecr_names_to_the_source_too(client):
    body = problem(client.post("/v1/copy", json={**COPY, "source": {"registry": "prod-ecr", "repository": "team/a__b"}}),
                   422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["source.repository"]


@pytest.mark.parametrize(
    "who, body, fields",
    [
        # pull on the source's repository pattern...
        ("ci", {**COPY, "source": {"registry": "prod-ecr", "repository": "team-b/app", "tag": "1"}}, ["source.repository"]),
        # ...and publish on every target's
        ("ci", {**COPY, "targets": [{"registry": "hub", "repository": "team/app", "tags": ["1"]},
                                    {"registry": "hub", "repository": "other/app", "tags": ["1"]}]}, ["targets.1.repository"]),
        ("team-b", COPY, ["source.repository", "targets.0.repository"]),
    ],
)
def test_copy_needs_both_repositories_in_the_clients_patterns(as_client, redis_client, who, body, fields):
    answer = problem(as_client(who).post("/v1/copy", json=body), 403, "forbidden")
    assert [e["field"] for e in answer["errors"]] == fields
    assert redis_client.keys("imagepub:job:*") == []


@pytest.mark.parametrize("who", ["reader", "limited"])  # read only; publish without pull
def test_copy_needs_the_pull_and_publish_scopes(as_client, redis_client, who):
    problem(as_client(who).post("/v1/copy", json=COPY), 403, "forbidden")
    assert redis_client.keys("imagepub:job:*") == []


def test_copy_by_a_client_with_both_scopes(as_client):
    assert as_client("ci").post("/v1/copy", json=COPY).status_code == 202


def test_copy_idempotency_key(client, redis_client):
    first = client.post("/v1/copy", json=COPY, headers={"Idempotency-Key": "promote-1.4"})
    again = client.post("/v1/copy", json=COPY, headers={"Idempotency-Key": "promote-1.4"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    other = {**COPY, "platforms": ["linux/arm64"]}
    problem(client.post("/v1/copy", json=other, headers={"Idempotency-Key": "promote-1.4"}), 409, "idempotency_conflict")
    assert queued_job_ids(redis_client) == [first.get_json()["id"]]

"""Publish and pull end to end: HTTP API → Redis → Celery worker → private dockerd → registry.

Digests are checked against what the registry itself reports (its HTTP API and skopeo), never
against our own code's claims.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest


@pytest.fixture
def image(stack, unique):
    name = f"e2e/src-{unique}:v1"
    image_id = stack.build_image(name, layers=3)
    return name, image_id


def test_publish_two_tags_digest_matches_registry(api, stack, image, unique):
    source, image_id = image
    repository = f"team/app-{unique}"
    job = api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": repository, "tags": ["1.0", "latest"]}]})
    assert job["state"] == "queued"

    done = api.wait(job["id"])
    assert done["state"] == "succeeded", done
    target = done["targets"][0]
    assert target["references"] == [f"{stack.registry}/{repository}:1.0", f"{stack.registry}/{repository}:latest"]
    for tag in ("1.0", "latest"):
        assert stack.registry_digest(stack.registry, repository, tag) == target["digest"]
    assert stack.skopeo_digest(f"{stack.registry}/{repository}:latest") == target["digest"]
    assert done["source_image_id"] == image_id
    assert len(target["layers"]) == 3
    assert {layer["status"] for layer in target["layers"]} == {"pushed"}
    assert all(layer["current"] == layer["total"] and layer["total"] for layer in target["layers"])
    assert done["attempts"] == 1 and done["started_at"] and done["finished_at"]
    # the daemon is left as it was: the source keeps its tag, our target tags are gone
    tags = stack.docker().api.inspect_image(image_id)["RepoTags"]
    assert tags == [source]


def test_second_repository_reuses_layers(api, stack, image, unique):
    source, _ = image
    first = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": f"one-{unique}", "tags": ["a"]}]})["id"])
    assert first["state"] == "succeeded"
    second = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": f"two-{unique}", "tags": ["b"]}]})["id"])
    assert second["state"] == "succeeded", second
    statuses = {layer["status"] for layer in second["targets"][0]["layers"]}
    assert statuses <= {"mounted", "exists"} and statuses, second["targets"][0]["layers"]
    assert stack.registry_digest(stack.registry, f"two-{unique}", "b") == second["targets"][0]["digest"]


def test_publish_to_two_targets_one_job(api, stack, image, unique):
    source, _ = image
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [
        {"registry": "local", "repository": f"multi-{unique}", "tags": ["x"]},
        {"registry": "secure", "repository": f"multi-{unique}", "tags": ["y"]},
    ]})["id"])
    assert job["state"] == "succeeded", job
    local, secure = job["targets"]
    assert stack.registry_digest(stack.registry, f"multi-{unique}", "x") == local["digest"]
    assert stack.skopeo_digest(f"{stack.auth_registry}/multi-{unique}:y") == secure["digest"]


def test_missing_source_fails_image_not_found(api, unique):
    job = api.wait(api.submit("/v1/publish", {"source": f"nothing-here-{unique}:latest", "targets": [{"registry": "local", "repository": "x", "tags": ["t"]}]})["id"])
    assert job["state"] == "failed"
    assert job["error"]["code"] == "image_not_found"
    assert job["error"]["message"] == f"the Docker daemon default has no image nothing-here-{unique}:latest"  # one sentence
    assert job["attempts"] == 1  # permanent: not retried


def test_wrong_credentials_fail_auth_failed(api, stack, image, unique):
    source, _ = image
    repository = f"denied-{unique}"
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "wrong-password", "repository": repository, "tags": ["t"]}]})["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "auth_failed"
    assert job["targets"][0]["digest"] is None
    assert stack.registry_digest(stack.auth_registry, repository, "t") is None
    assert "not-the-password" not in str(job)


def _untagged_image(stack) -> str:
    """An image the daemon knows only by id (``docker import`` without a name)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        payload = os.urandom(4096)
        info = tarfile.TarInfo("payload.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    out = stack.docker().api.import_image_from_data(data.getvalue())
    image_id = json.loads(out.strip().splitlines()[-1])["status"]
    assert stack.docker().api.inspect_image(image_id)["RepoTags"] == []
    return image_id


def test_publish_by_image_id_keeps_image(api, stack, unique):
    image_id = _untagged_image(stack)
    job = api.wait(api.submit("/v1/publish", {"source": image_id, "targets": [{"registry": "local", "repository": f"byid-{unique}", "tags": ["1"]}]})["id"])
    assert job["state"] == "succeeded", job
    assert stack.registry_digest(stack.registry, f"byid-{unique}", "1") == job["targets"][0]["digest"]
    assert stack.docker().api.inspect_image(image_id)["Id"] == image_id  # never deleted by our cleanup


def test_pull_by_tag_and_by_digest(api, stack, image, unique):
    source, image_id = image
    repository = f"pulled-{unique}"
    pushed = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "secure", "repository": repository, "tags": ["v1"]}]})["id"])
    assert pushed["state"] == "succeeded", pushed
    digest = pushed["targets"][0]["digest"]
    reference = f"{stack.auth_registry}/{repository}"
    docker = stack.docker().api
    docker.remove_image(image_id, force=True)

    by_tag = api.wait(api.submit("/v1/pull", {"registry": "secure", "repository": repository, "tag": "v1"})["id"])
    assert by_tag["state"] == "succeeded", by_tag
    assert by_tag["result"]["digest"] == digest
    assert by_tag["result"]["image_id"] == image_id
    assert docker.inspect_image(f"{reference}:v1")["Id"] == image_id
    assert {layer["status"] for layer in by_tag["result"]["layers"]} == {"pulled"}

    by_digest = api.wait(api.submit("/v1/pull", {"registry": "secure", "repository": repository, "digest": digest})["id"])
    assert by_digest["state"] == "succeeded", by_digest
    assert by_digest["result"]["reference"] == f"{reference}@{digest}"
    assert by_digest["result"]["image_id"] == image_id


def test_pull_missing_tag_fails(api, stack, unique):
    """A tag (or digest) the registry does not have is image_not_found, said once, whether the
    repository is missing too or only the tag."""
    job = api.wait(api.submit("/v1/pull", {"registry": "local", "repository": f"ghost-{unique}", "tag": "nope"})["id"])
    assert job["state"] == "failed", job
    assert job["error"] == {"code": "image_not_found", "message": f"local has no image ghost-{unique}:nope"}, job
    assert job["attempts"] == 1
    source = f"there-{unique}:v1"
    stack.build_image(source, layers=1)
    assert api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "local", "repository": f"there-{unique}", "tags": ["v1"]}]})["id"])["state"] == "succeeded"
    for request, shown in (({"tag": "nope"}, ":nope"), ({"digest": "sha256:" + "0" * 64}, "@sha256:" + "0" * 64)):
        job = api.wait(api.submit("/v1/pull", {"registry": "local", "repository": f"there-{unique}", **request})["id"])
        assert job["error"] == {"code": "image_not_found", "message": f"local has no image there-{unique}{shown}"}, job

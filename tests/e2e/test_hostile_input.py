"""Hostile input against the real stack (issue 18, items 5, 8, 10, 12): the worker's own check
of a build context, Docker's name limit as the real daemon applies it, repository names that
collide with the images route in the emulated ECR, and the title of an error a real worker
answers. In-process variants: tests/service/test_input_bounds.py."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from urllib.parse import quote

import docker
import pytest

import tar_bombs as tb
from service import config, errors
from service.jobstore import JobStore, new_job_id


def test_the_workers_own_check_of_a_context_is_bounded(stack):
    """The worker checks a context again before the daemon unpacks it: the same streaming,
    bounded check, called as the build task calls it, on a context read back from Redis."""
    from workers.build import build

    settings = config.parse({}, {"IMAGEPUB_REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + "/3"})
    store = JobStore.from_config(settings)
    job = {"id": new_job_id(), "request": {"dockerfile": "Dockerfile"}, "build": {}}
    store.put_context(job["id"], tb.million_empty_directories())
    # the worker reads the context from the job store (or, where it has one, the artifact store
    # the API put it in): both serve these bytes from Redis
    deps = SimpleNamespace(store=store, artifacts=SimpleNamespace(read=store.get_context), settings=settings)
    try:
        started = time.monotonic()
        with pytest.raises(errors.JobFailed) as failed:
            build(job, deps, progress=None)
        assert time.monotonic() - started < 10
        assert failed.value.code == "invalid_context" and "limits.max_context_entries" in failed.value.message
    finally:
        store.drop_context(job["id"])


def test_the_api_refuses_the_finding_quickly(api):
    started = time.monotonic()
    resp = api.http.post(f"{api.base_url}/v1/build", files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": "x", "tags": ["t"]}]}), "application/json"),
        "context": ("context.tar.gz", tb.million_empty_directories(), "application/gzip"),
    }, timeout=60)
    assert time.monotonic() - started < 10
    assert resp.status_code == 422 and resp.headers["Content-Type"] == "application/problem+json", resp.text
    body = resp.json()
    assert body["code"] == "invalid_context" and body["errors"][0]["field"] == "context"
    assert "limits.max_context_entries" in body["errors"][0]["message"]
    assert api.get("/healthz").status_code == 200


# --- item 8: the longest name the real daemon takes is the longest imagepub takes -----------


@pytest.fixture(scope="module")
def image(stack):
    name = "hostile-names:v1"
    stack.build_image(name, layers=1)
    return name


def _long(room: int, unique: str) -> str:
    return f"long-{unique}/" + "a" * (room - len(f"long-{unique}/"))


@pytest.mark.parametrize("registry", ["local", "ecr"])
def test_a_target_at_dockers_limit_is_pushed_and_one_longer_refused_at_submit(api, stack, image, unique, registry):
    host = {"local": stack.registry, "ecr": stack.ecr_host}[registry]
    room = 255 - len(f"{host}/")
    repository = _long(room, unique)
    job = api.wait(api.submit("/v1/publish", {"source": image, "create_repository": True,
                                              "targets": [{"registry": registry, "repository": repository, "tags": ["1"]}]})["id"])
    assert job["state"] == "succeeded", job
    assert job["targets"][0]["references"] == [f"{host}/{repository}:1"] and len(f"{host}/{repository}") == 255

    resp = api.post("/v1/publish", json={"source": image, "targets": [{"registry": registry, "repository": repository + "a", "tags": ["1"]}]})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "targets.0.repository", resp.text
    assert f"at most {room}" in resp.json()["errors"][0]["message"]

    if registry == "local":  # and back: a pull of the longest name works, one longer is refused
        pulled = api.wait(api.submit("/v1/pull", {"registry": registry, "repository": repository, "tag": "1"})["id"])
        assert pulled["state"] == "succeeded", pulled
        resp = api.post("/v1/pull", json={"registry": registry, "repository": repository + "a", "tag": "1"})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "repository"


def test_a_source_at_dockers_limit_is_published_and_one_longer_refused(api, stack, image, unique):
    """The daemon counts docker.io/library/ into a short name: a name it could never hold is
    refused at submit instead of failing in the worker."""
    client = stack.docker()
    longest = "a" * (255 - len("docker.io/library/") - len(unique)) + unique
    client.api.tag(image, longest, "v1")
    with pytest.raises(docker.errors.APIError, match="255"):  # the daemon's own limit, one past ours
        client.api.tag(image, longest + "a", "v1")
    job = api.wait(api.submit("/v1/publish", {"source": f"{longest}:v1", "targets": [{"registry": "local", "repository": f"src-{unique}", "tags": ["1"]}]})["id"])
    assert job["state"] == "succeeded", job
    resp = api.post("/v1/publish", json={"source": f"{longest}a:v1", "targets": [{"registry": "local", "repository": f"src-{unique}", "tags": ["1"]}]})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "source", resp.text


# --- item 10: every repository name reachable, against the emulated ECR ----------------------


@pytest.mark.parametrize("shape", ["{u}/images", "images", "{u}/images/images", "{u}/images/app", "images/{u}"])
def test_every_created_repository_can_be_described_and_listed(api, unique, shape):
    name = shape.format(u=f"team-{unique}")
    created = api.post("/v1/registries/ecr/repositories", json={"name": name})
    assert created.status_code in (201, 409), created.text  # `images` may exist from a rerun
    location = created.headers.get("Location") or f"/v1/registries/ecr/repositories/{quote(name, safe='')}"
    slash = name.rfind("/")
    # fully encoded (the Location), and with only the last slash encoded
    for path in {location, "/v1/registries/ecr/repositories/" + (name if slash < 0 else name[:slash] + "%2F" + name[slash + 1:])}:
        described = api.get(path)
        assert described.status_code == 200, (path, described.text)
        assert described.json()["name"] == name
    if not name.endswith("images"):  # no ambiguity: raw slashes describe it too
        assert api.get(f"/v1/registries/ecr/repositories/{name}").json()["name"] == name
    for path in (f"{location}/images", f"/v1/registries/ecr/repositories/{name}/images"):
        listed = api.get(path)
        assert listed.status_code == 200 and listed.json()["images"] == [], (path, listed.text)


# --- item 12: a worker's error, rendered by the API with a title of its status ----------------


def test_a_workers_errors_carry_titles_of_their_status(api, unique):
    resp = api.get("/v1/registries/local/repositories")  # a plain registry has no repositories API
    assert resp.status_code == 422 and resp.headers["Content-Type"] == "application/problem+json"
    body = resp.json()
    assert (body["code"], body["title"]) == ("not_supported", errors.NotSupported.title)
    missing = api.get(f"/v1/registries/ecr/repositories/none-{unique}").json()
    assert (missing["status"], missing["code"], missing["title"]) == (404, "repository_not_found", errors.RepositoryNotFound.title)

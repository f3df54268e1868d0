"""Amazon ECR end to end: moto for the ECR API (behind a counting, fault-injecting proxy) and a
TLS registry under the real ECR host name for the daemon. Digests are read from the registry
itself; repository settings from moto directly, not through our code."""

from __future__ import annotations

import concurrent.futures

import boto3
import pytest

from ecr_api_proxy import ACCESS_DENIED, THROTTLING

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def moto(stack):
    return boto3.client("ecr", endpoint_url=stack.moto_url, region_name=stack.ecr_region,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def image(stack, unique):
    name = f"ecr-src-{unique}:v1"
    return name, stack.build_image(name, layers=2)


def test_repository_create_describe_list(api, stack, moto, unique):
    name = f"team/app-{unique}"
    resp = api.post("/v1/registries/ecr/repositories", json={"name": name, "image_tag_mutability": "IMMUTABLE", "scan_on_push": True, "tags": {"team": "a"}})
    assert resp.status_code == 201, resp.text
    repo = resp.json()
    assert repo["uri"] == f"{stack.ecr_host}/{name}"
    assert resp.headers["Location"] == f"/v1/registries/ecr/repositories/{name.replace('/', '%2F')}"
    # what ECR (moto) itself now holds
    held = moto.describe_repositories(repositoryNames=[name])["repositories"][0]
    assert held["imageTagMutability"] == "IMMUTABLE" and held["imageScanningConfiguration"]["scanOnPush"] is True

    again = api.post("/v1/registries/ecr/repositories", json={"name": name})
    assert again.status_code == 409 and again.json()["code"] == "repository_exists"

    for path in (name, name.replace("/", "%2F")):
        described = api.get(f"/v1/registries/ecr/repositories/{path}")
        assert described.status_code == 200, described.text
        assert described.json()["uri"] == repo["uri"] and described.json()["image_tag_mutability"] == "IMMUTABLE"

    missing = api.get(f"/v1/registries/ecr/repositories/team/nothing-{unique}")
    assert missing.status_code == 404 and missing.json()["code"] == "repository_not_found"

    names, cursor = [], None
    while True:
        page = api.get("/v1/registries/ecr/repositories", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        names += [r["name"] for r in page["repositories"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert name in names


def test_repository_api_errors(api):
    assert api.get("/v1/registries/nowhere/repositories").json()["code"] == "registry_not_configured"
    resp = api.get("/v1/registries/local/repositories")
    assert resp.status_code == 422 and resp.json()["code"] == "not_supported"
    resp = api.post("/v1/registries/ecr/repositories", json={"name": "Bad Name"})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "name"
    resp = api.get("/v1/registries/ecr/repositories/UPPER/case")
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "repository"


def test_publish_creates_repository_and_verifies_digest(api, stack, moto, image, unique, ecr_api):
    source, _ = image
    repository = f"team/svc-{unique}"
    job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                              "targets": [{"registry": "ecr", "repository": repository, "tags": ["latest", "1.0.0"]}]})["id"])
    assert job["state"] == "succeeded", job
    target = job["targets"][0]
    assert target["repository_created"] is True
    assert target["references"] == [f"{stack.ecr_host}/{repository}:latest", f"{stack.ecr_host}/{repository}:1.0.0"]
    assert stack.registry_digest(stack.ecr_host, repository, "latest") == target["digest"]
    assert stack.skopeo_digest(f"{stack.ecr_host}/{repository}:1.0.0") == target["digest"]
    assert moto.describe_repositories(repositoryNames=[repository])["repositories"][0]["repositoryName"] == repository
    assert ecr_api.calls["GetAuthorizationToken"] == 1

    # list-images: moto does not see the TLS registry, so put the very manifest the registry
    # serves through the ECR API, as a push to real ECR would; then read it back through ours.
    manifest = stack.registry_request("GET", stack.ecr_host, f"/v2/{repository}/manifests/latest", headers={"Accept": MANIFEST_V2}).data
    put = moto.put_image(repositoryName=repository, imageManifest=manifest.decode(), imageTag="latest", imageManifestMediaType=MANIFEST_V2)
    # (moto digests the manifest after re-serialising it, so its digest is its own)
    images = api.get(f"/v1/registries/ecr/repositories/{repository}/images").json()["images"]
    assert [(i["digest"], i["tags"]) for i in images] == [(put["image"]["imageId"]["imageDigest"], ["latest"])]
    assert images[0]["pushed_at"] and images[0]["size"]

    pulled = api.wait(api.submit("/v1/pull", {"registry": "ecr", "repository": repository, "tag": "1.0.0"})["id"])
    assert pulled["state"] == "succeeded", pulled
    assert pulled["result"]["digest"] == target["digest"]


def test_missing_repository_fails_before_pushing(api, stack, image, unique):
    source, _ = image
    for registry, create in (("ecr", False), ("ecr-no-create", True)):
        repository = f"absent/{registry}-{unique}"
        job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": create,
                                                  "targets": [{"registry": registry, "repository": repository, "tags": ["x"]}]})["id"])
        assert job["state"] == "failed", job
        assert job["error"]["code"] == "repository_not_found"
        assert job["targets"][0]["layers"] == []
        assert stack.registry_digest(stack.ecr_host, repository, "x") is None


def test_many_concurrent_publishes_fetch_one_token(api, stack, image, unique, ecr_api):
    ecr_api.expires_in = 12 * 3600  # as real ECR answers
    source, _ = image
    repository = f"burst-{unique}"
    api.post("/v1/registries/ecr/repositories", json={"name": repository})
    bodies = [{"source": source, "targets": [{"registry": "ecr", "repository": repository, "tags": [f"t{i}"]}]} for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda body: api.submit("/v1/publish", body), bodies))
    done = [api.wait(job["id"], timeout=300) for job in jobs]
    assert {job["state"] for job in done} == {"succeeded"}, [j["error"] for j in done if j["state"] != "succeeded"]
    assert len({job["targets"][0]["digest"] for job in done}) == 1
    assert ecr_api.calls["GetAuthorizationToken"] == 1
    assert stack.registry_digest(stack.ecr_host, repository, "t39") == done[0]["targets"][0]["digest"]


def test_expires_at_in_the_past_still_caches(api, image, unique, ecr_api):
    # moto's own answer: expiresAt in 2015
    source, _ = image
    for i in range(3):
        job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                                  "targets": [{"registry": "ecr", "repository": f"past-{unique}", "tags": [f"v{i}"]}]})["id"])
        assert job["state"] == "succeeded", job
    assert ecr_api.calls["GetAuthorizationToken"] == 1


def test_throttling_is_retried_then_succeeds(api, stack, image, unique, ecr_api):
    source, _ = image
    # botocore retries three times itself; the fourth throttle reaches the job, which retries.
    ecr_api.fail("GetAuthorizationToken", THROTTLING, times=4)
    job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                              "targets": [{"registry": "ecr", "repository": f"throttled-{unique}", "tags": ["v1"]}]})["id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["last_error"]["code"] == "throttled"
    assert ecr_api.calls["GetAuthorizationToken"] == 5
    assert stack.registry_digest(stack.ecr_host, f"throttled-{unique}", "v1") == job["targets"][0]["digest"]


def test_throttling_that_never_ends_fails_after_bounded_attempts(api, image, unique, ecr_api):
    source, _ = image
    ecr_api.fail("GetAuthorizationToken", THROTTLING, times=1000)
    job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                              "targets": [{"registry": "ecr", "repository": f"forever-{unique}", "tags": ["v1"]}]})["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "throttled"
    assert job["attempts"] == 3  # retry.max_attempts in the test config


def test_access_denied(api, image, unique, ecr_api):
    source, _ = image
    ecr_api.fail("DescribeRepositories", ACCESS_DENIED)
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "ecr", "repository": f"denied-{unique}", "tags": ["v1"]}]})["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "access_denied"
    assert "not authorized" in job["error"]["message"]
    assert job["attempts"] == 1


# --- what the emulators cannot produce, injected at the registry seam with ECR's own answers ---


@pytest.fixture
def ecr_registry(stack):
    stack.ecr_registry.reset()
    yield stack.ecr_registry
    stack.ecr_registry.reset()


def _manifest(stack, repository, tag):
    return stack.registry_request("GET", stack.ecr_host, f"/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_V2}).data.decode()


def test_immutable_tag_holding_the_same_image_succeeds(api, stack, moto, image, unique, ecr_registry):
    source, image_id = image
    repository = f"immutable/same-{unique}"
    first = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                                "targets": [{"registry": "ecr", "repository": repository, "tags": ["1.0"]}]})["id"])
    assert first["state"] == "succeeded", first
    # ECR knows the tag (a real push registers it; here the ECR API is told with put_image)
    put = moto.put_image(repositoryName=repository, imageManifest=_manifest(stack, repository, "1.0"), imageTag="1.0", imageManifestMediaType=MANIFEST_V2)
    ecr_registry.immutable_tag(repository, "1.0")

    again = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "ecr", "repository": repository, "tags": ["1.0"]}]})["id"])
    assert again["state"] == "succeeded", again
    assert again["targets"][0]["digest"] == put["image"]["imageId"]["imageDigest"]
    assert again["attempts"] == 1
    assert ("PUT", f"/v2/{repository}/manifests/1.0", 400) in ecr_registry.requests()  # the rejection did happen


def test_immutable_tag_holding_another_image_fails(api, stack, moto, unique, ecr_registry):
    repository = f"immutable/other-{unique}"
    old, new = f"imm-old-{unique}:1", f"imm-new-{unique}:1"
    stack.build_image(old, layers=1)
    stack.build_image(new, layers=1)
    first = api.wait(api.submit("/v1/publish", {"source": old, "create_repository": True,
                                                "targets": [{"registry": "ecr", "repository": repository, "tags": ["stable"]}]})["id"])
    assert first["state"] == "succeeded", first
    moto.put_image(repositoryName=repository, imageManifest=_manifest(stack, repository, "stable"), imageTag="stable", imageManifestMediaType=MANIFEST_V2)
    ecr_registry.immutable_tag(repository, "stable")

    job = api.wait(api.submit("/v1/publish", {"source": new, "targets": [{"registry": "ecr", "repository": repository, "tags": ["stable"]}]})["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "tag_immutable" and "immutable" in job["error"]["message"]
    assert job["attempts"] == 1
    assert stack.registry_digest(stack.ecr_host, repository, "stable") == first["targets"][0]["digest"]  # untouched


def test_expired_token_mid_push_is_dropped_and_fetched_again(api, stack, image, unique, ecr_api, ecr_registry):
    ecr_api.expires_in = 12 * 3600
    source, _ = image
    repository = f"expiring-{unique}"
    api.post("/v1/registries/ecr/repositories", json={"name": repository})
    ecr_registry.expired_token(times=1)
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "ecr", "repository": repository, "tags": ["v1"]}]})["id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    assert ecr_api.calls["GetAuthorizationToken"] == 2  # the cached token was dropped, one fresh fetch
    assert any(status == 403 for _, path, status in ecr_registry.requests() if repository in path)
    assert stack.registry_digest(stack.ecr_host, repository, "v1") == job["targets"][0]["digest"]


def test_token_refused_even_when_fresh_fails_auth(api, image, unique, ecr_api, ecr_registry):
    source, _ = image
    repository = f"refused-{unique}"
    api.post("/v1/registries/ecr/repositories", json={"name": repository})
    ecr_registry.expired_token(times=1000, path_regex=rf"^/v2/{repository}/")
    job = api.wait(api.submit("/v1/publish", {"source": source, "targets": [{"registry": "ecr", "repository": repository, "tags": ["v1"]}]})["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "auth_failed", job
    assert ecr_api.calls["GetAuthorizationToken"] == 2


def test_a_tag_the_registry_serves_with_another_digest_fails_the_push(api, image, unique, ecr_registry):
    """The push is verified by what the registry answers for the tag afterwards (a HEAD of its
    manifest, by the worker or through the daemon): an answer naming another digest than the
    push reported fails the job, whatever the push said."""
    source, _ = image
    repository = f"verified-{unique}"
    other = "sha256:" + "0" * 64
    ecr_registry.fail("HEAD", rf"^/v2/{repository}/manifests/v1$", 200, b"", times=10,
                      headers={"Docker-Content-Digest": other, "Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
    job = api.wait(api.submit("/v1/publish", {"source": source, "create_repository": True,
                                              "targets": [{"registry": "ecr", "repository": repository, "tags": ["v1"]}]})["id"])
    assert job["state"] == "failed", job
    # the worker compares the digests (push_failed, naming both); through the daemon, the daemon
    # looks the named manifest up first and finds none (manifest_not_found): failed either way
    assert (job["error"]["code"], other in job["error"]["message"]) in {("push_failed", True), ("manifest_not_found", False)}, job["error"]
    assert ("HEAD", f"/v2/{repository}/manifests/v1", 200) in ecr_registry.requests()

"""Tenants of one daemon, attacking each other through the live service (issue 18, items 3, 4).

Every client's jobs share the workers' Docker daemon: what one client pulls from a password-
protected registry, or builds, sits there beside the others' images. A client may publish only
images named in its own repositories — in every form the daemon accepts a name or an image id —
and sees only those images, and only their names in its repositories, in ``GET /v1/images``.

Clients: ``team-a`` (``team-a/*``), ``team-b`` (``team-b/*``), ``greedy`` (not admin, with
patterns that reach imagepub's build names and hexadecimal names) and an admin, on a service of
their own (Redis database 9).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid

import pytest
import redis

from helpers import assert_conforms
from service.auth import hash_token
from service_process import Api, Service, base_config

TOKENS = {name: f"imp_tenant-{name}-{uuid.uuid4().hex}" for name in ("team-a", "team-b", "greedy", "admin")}
CLIENTS = {
    "team-a": {"scopes": ["publish", "pull", "read", "build"], "repositories": ["team-a/*"]},
    "team-b": {"scopes": ["publish", "pull", "read", "build"], "repositories": ["team-b/*"]},
    "greedy": {"scopes": ["publish", "read"], "repositories": ["imagepub-*", "[0-9a-f]*", "greedy/*"]},
    "admin": {"scopes": ["admin"]},
}


class Tenant(Api):
    """The API as one client: every response checked against openapi.yaml."""

    def __init__(self, base_url: str, name: str):
        super().__init__(base_url)
        self.name = name
        self.http.headers["Authorization"] = f"Bearer {TOKENS[name]}"
        self.http.hooks["response"].append(self._conforms)

    @staticmethod
    def _conforms(resp, *args, **kwargs):
        if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            return
        path = resp.request.path_url.split("?", 1)[0]
        assert_conforms(resp.request.method, path, resp.status_code, dict(resp.headers), resp.content,
                        resp.headers.get("Content-Type", "").split(";", 1)[0])

    def publish(self, source: str, repository: str, tag: str = "1"):
        return self.post("/v1/publish", json={"source": source, "targets": [{"registry": "local", "repository": repository, "tags": [tag]}]})


@pytest.fixture(scope="module")
def tenants(stack):
    config = base_config(stack)
    del config["auth"]
    config["clients"] = [{"name": name, "token_sha256": hash_token(TOKENS[name]), **rules} for name, rules in CLIENTS.items()]
    svc = Service(stack, config, "tenants", redis_db=9)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker()
    yield {name: Tenant(svc.api.base_url, name) for name in CLIENTS}
    svc.stop_worker()


@pytest.fixture(scope="module")
def u() -> str:
    return uuid.uuid4().hex[:8]


def _succeeded(api: Tenant, resp) -> dict:
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def _forbidden_at_submit(resp) -> None:
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert body["code"] == "forbidden" and [e["field"] for e in body["errors"]] == ["source"], body


def _forbidden_on_the_worker(api: Tenant, resp) -> dict:
    """Accepted (an image id names no repository), then refused where the id is resolved."""
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "forbidden", job
    assert job["attempts"] == 1 and job.get("source_image_id") is None  # not even the full id is told
    assert all(t["references"] == [] for t in job["targets"])
    return job


def _unique_prefix(stack, image_id: str) -> str:
    """The shortest prefix of ``image_id``'s hex the daemon resolves to it alone (plus one
    character, so that an image created meanwhile does not make it ambiguous)."""
    others = [i["Id"].removeprefix("sha256:") for i in stack.docker().api.images(all=True) if i["Id"] != image_id]
    hexid = image_id.removeprefix("sha256:")
    n = next(n for n in range(1, 65) if not any(o.startswith(hexid[:n]) for o in others))
    return hexid[: n + 1]


def _id_forms(stack, image_id: str) -> list[str]:
    prefix = _unique_prefix(stack, image_id)
    hexid = image_id.removeprefix("sha256:")
    return [image_id, hexid, f"sha256:{hexid[:12]}", hexid[:12], f"sha256:{prefix}", prefix]


@pytest.fixture(scope="module")
def team_b_images(tenants, stack, u):
    """team-b's images in the daemon: one it built there itself, one it pulled through imagepub
    from the password-protected registry (its only copy in the daemon carries the registry's
    host), and one imagepub built for it from an uploaded context."""
    team_b = tenants["team-b"]
    built = f"team-b/secret-{u}"
    built_id = stack.build_image(f"{built}:1", layers=1)
    stack.docker().api.tag(built_id, built, "latest")

    scratch = f"team-b/scratch-{u}:1"
    stack.build_image(scratch, layers=1)
    _succeeded(team_b, team_b.post("/v1/publish", json={"source": scratch, "targets": [
        {"registry": "secure", "repository": f"team-b/private-{u}", "tags": ["1"]}]}))
    stack.docker().api.remove_image(scratch, force=True)  # gone from the daemon: only the pull brings it back
    pulled = _succeeded(team_b, team_b.post("/v1/pull", json={"registry": "secure", "repository": f"team-b/private-{u}", "tag": "1"}))

    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w:gz") as tar:
        for name, data in {"Dockerfile": b"FROM scratch\nCOPY payload /payload\nLABEL team=b\n", "payload": os.urandom(4096)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    resp = team_b.http.post(f"{team_b.base_url}/v1/build", timeout=60, files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": f"team-b/built-{u}", "tags": ["1"]}]}), "application/json"),
        "context": ("context.tar.gz", context.getvalue(), "application/gzip"),
    })
    build = _succeeded(team_b, resp)

    unnamed = io.BytesIO()  # an image the daemon knows by id alone (docker import, no name)
    with tarfile.open(fileobj=unnamed, mode="w") as tar:
        payload = os.urandom(4096)
        info = tarfile.TarInfo("payload.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    unnamed_id = json.loads(stack.docker().api.import_image_from_data(unnamed.getvalue()).strip().splitlines()[-1])["status"]
    return {
        "built": built, "built_id": built_id,
        "pulled": f"{stack.auth_registry}/team-b/private-{u}", "pulled_id": pulled["result"]["image_id"],
        "pulled_digest": pulled["result"]["digest"],
        "build_job": build["id"], "build_id": build["build"]["image_id"],
        "unnamed_id": unnamed_id,
    }


def _nothing_pushed(stack, repository: str) -> None:
    assert stack.registry_tags(stack.registry, repository) == []


def test_another_tenants_image_by_name_is_refused_at_submit_in_every_form(tenants, stack, team_b_images, u):
    team_a, b = tenants["team-a"], team_b_images
    digest = b["pulled_digest"]
    sources = [
        f"{b['built']}:1", b["built"], f"docker.io/{b['built']}:1", f"index.docker.io/{b['built']}",
        f"{b['pulled']}:1", f"{b['pulled']}@{digest}", f"{b['pulled']}:1@{digest}",
        f"team-b/built-{u}@{digest}", f"imagepub-build:{b['build_job']}", f"{stack.registry}/team-b/built-{u}:1",
    ]
    for source in sources:
        _forbidden_at_submit(team_a.publish(source, f"team-a/stolen-{u}"))
    _nothing_pushed(stack, f"team-a/stolen-{u}")
    # nor can team-a fetch team-b's repository itself
    resp = team_a.post("/v1/pull", json={"registry": "secure", "repository": f"team-b/private-{u}", "tag": "1"})
    assert resp.status_code == 403 and resp.json()["code"] == "forbidden"


def test_imagepubs_own_build_names_are_no_clients_but_the_admins(tenants, stack, team_b_images, u):
    # "imagepub-*" matches, but a build's output is named for its job, not for a tenant
    for source in (f"imagepub-build:{team_b_images['build_job']}", f"docker.io/library/imagepub-build:{team_b_images['build_job']}"):
        _forbidden_at_submit(tenants["greedy"].publish(source, f"greedy/b-{u}"))
    _nothing_pushed(stack, f"greedy/b-{u}")


@pytest.mark.parametrize("which", ["built_id", "pulled_id", "build_id", "unnamed_id"])
def test_another_tenants_image_by_id_fails_on_the_worker_in_every_form(tenants, stack, team_b_images, u, which):
    image_id = team_b_images[which]
    for i, source in enumerate(_id_forms(stack, image_id)):
        repository = f"team-a/stolen-{which.replace('_', '-')}-{u}-{i}"
        _forbidden_on_the_worker(tenants["team-a"], tenants["team-a"].publish(source, repository))
        _nothing_pushed(stack, repository)
        # the daemon does resolve that form: the admin publishes the very same image with it
        admin = _succeeded(tenants["admin"], tenants["admin"].publish(source, f"admin/copy-{u}-{i}", tag=which.replace("_", "-")))
        assert admin["source_image_id"] == image_id


def test_a_hexadecimal_name_is_judged_on_the_worker(tenants, stack, team_b_images, u):
    # An id prefix is a name to the grammar ("3fa2c1", a repository "[0-9a-f]*" matches), but
    # the daemon reads it as an id prefix when no image is called that
    for source in (_unique_prefix(stack, team_b_images["built_id"]), f"sha256:{_unique_prefix(stack, team_b_images['build_id'])}"):
        _forbidden_on_the_worker(tenants["greedy"], tenants["greedy"].publish(source, f"greedy/hex-{u}"))
    _nothing_pushed(stack, f"greedy/hex-{u}")


def test_own_images_are_publishable_in_every_form(tenants, stack, u):
    team_a = tenants["team-a"]
    own = f"team-a/own-{u}"
    own_id = stack.build_image(f"{own}:1", layers=1)
    stack.docker().api.tag(own_id, own, "latest")
    # a copy of it in the registry, pulled back: the daemon then knows it by host and digest
    pushed = _succeeded(team_a, team_a.publish(f"{own}:1", f"team-a/pulled-{u}"))
    pulled = _succeeded(team_a, team_a.post("/v1/pull", json={"registry": "local", "repository": f"team-a/pulled-{u}", "tag": "1"}))
    digest, remote = pushed["targets"][0]["digest"], f"{stack.registry}/team-a/pulled-{u}"
    assert pulled["result"]["image_id"] == own_id
    sources = [
        f"{own}:1", own, f"docker.io/{own}:1", f"index.docker.io/{own}", f"{remote}:1", f"{remote}@{digest}",
        f"{remote}:1@{digest}", *_id_forms(stack, own_id),
    ]
    for i, source in enumerate(sources):
        job = _succeeded(team_a, team_a.publish(source, f"team-a/again-{u}", tag=f"v{i}"))
        assert job["source_image_id"] == own_id and job["targets"][0]["digest"] == digest, (source, job)
    assert stack.registry_tags(stack.registry, f"team-a/again-{u}") == sorted(f"v{i}" for i in range(len(sources)))


def test_admin_publishes_anything(tenants, stack, team_b_images, u):
    admin = tenants["admin"]
    for i, source in enumerate([f"{team_b_images['pulled']}:1", f"imagepub-build:{team_b_images['build_job']}"]):
        _succeeded(admin, admin.publish(source, f"team-a/given-{u}", tag=f"t{i}"))


def _listing(api: Tenant, **params) -> dict:
    resp = api.get("/v1/images", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_each_tenant_sees_only_its_own_images_and_names(tenants, stack, team_b_images, u):
    b = team_b_images
    shared = f"team-a/shared-{u}:1"
    stack.docker().api.tag(b["built_id"], f"team-a/shared-{u}", "1")  # one image, a name of each tenant's
    team_a = _listing(tenants["team-a"])
    text = json.dumps(team_a)
    assert "worker" not in team_a
    for secret in (b["build_job"], "team-b/", "imagepub-build", b["pulled_id"], b["build_id"], "org.imagepub"):
        assert secret not in text, secret
    names = [n for image in team_a["images"] for n in image["tags"] + image["digests"]]
    assert names and all(re.fullmatch(r"(?:[^/]*[.:][^/]*/)?team-a/.+", n) for n in names), names
    listed = next(image for image in team_a["images"] if image["id"] == b["built_id"])
    assert listed["tags"] == [shared] and listed["digests"] == []

    # the reference filter still works, and never opens a door to the other names
    assert [image["tags"] for image in _listing(tenants["team-a"], reference=shared)["images"]] == [[shared]]
    assert _listing(tenants["team-a"], reference=f"{b['built']}:*")["images"] == []
    assert _listing(tenants["team-a"], reference="imagepub-build")["images"] == []

    team_b = _listing(tenants["team-b"])
    assert shared not in json.dumps(team_b) and f"team-a/own-{u}" not in json.dumps(team_b)
    # a build's output carries imagepub's name alone (its target tags are removed after the push)
    assert b["build_id"] not in json.dumps(team_b)
    # once it has a name of team-b's, team-b sees it: its Dockerfile's labels, not imagepub's bookkeeping
    stack.docker().api.tag(b["build_id"], f"team-b/built-{u}", "kept")
    built = next(image for image in _listing(tenants["team-b"])["images"] if image["id"] == b["build_id"])
    assert built["labels"] == {"team": "b"} and built["tags"] == [f"team-b/built-{u}:kept"] and built["digests"] == []

    greedy = _listing(tenants["greedy"])
    assert b["build_job"] not in json.dumps(greedy) and "imagepub-build" not in json.dumps(greedy) and "worker" not in greedy

    admin = _listing(tenants["admin"])
    assert admin["worker"]  # the worker's host name is for admins only
    everything = next(image for image in admin["images"] if image["id"] == b["build_id"])
    assert f"imagepub-build:{b['build_job']}" in everything["tags"] and everything["labels"]["org.imagepub.job"] == b["build_job"]
    assert set(next(image for image in admin["images"] if image["id"] == b["built_id"])["tags"]) >= {shared, f"{b['built']}:1"}


@pytest.mark.xfail(strict=True, reason="open: a build's FROM (and COPY --from) reads any image in the daemon; "
                   "the Dockerfile's base images are not authorised yet (reported with issue 18)")
def test_a_build_cannot_start_from_another_tenants_image(tenants, stack, team_b_images, u):
    team_a = tenants["team-a"]
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w:gz") as tar:
        data = f"FROM {team_b_images['pulled']}:1\nLABEL stolen=yes\n".encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    resp = team_a.http.post(f"{team_a.base_url}/v1/build", timeout=60, files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": f"team-a/from-{u}", "tags": ["1"]}]}), "application/json"),
        "context": ("context.tar.gz", context.getvalue(), "application/gzip"),
    })
    if resp.status_code == 202:
        job = team_a.wait(resp.json()["id"])
        assert job["state"] == "failed", job
    else:
        assert resp.status_code == 403, resp.text
    _nothing_pushed(stack, f"team-a/from-{u}")

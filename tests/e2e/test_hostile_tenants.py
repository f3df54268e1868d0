"""Tenants of one daemon, attacking each other through the live service (issue 18, items 3, 4).

Every client's jobs share the workers' Docker daemon: what one client pulls from a password-
protected registry, or builds, sits there beside the others' images. A client may publish only
images named in its own repositories — in every form the daemon accepts a name or an image id —
and sees only those images, and only their names in its repositories, in ``GET /v1/images``.

Clients: ``team-a`` (``team-a/*``), ``team-b`` (``team-b/*``), ``greedy`` (not admin, with
patterns that reach imagepub's build names and hexadecimal names) and an admin, on a service of
their own (Redis database 9), whose builds run on a network made for them (``builds.network``)
with 64 MiB for each RUN step (``builds.memory_bytes``).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import tarfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

import network_probe
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
def builds_network(stack):
    """A network made for builds (internal: no way out), as an operator would name in
    ``builds.network``."""
    docker = stack.docker().api
    name = f"imagepub-builds-{uuid.uuid4().hex[:8]}"
    docker.create_network(name, driver="bridge", internal=True)
    yield name
    docker.remove_network(name)


@pytest.fixture(scope="module")
def tenants(stack, builds_network):
    config = base_config(stack)
    config["builds"] = {"network": builds_network, "memory_bytes": 64 * 1024**2}
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


def _tag(stack, tenants, image_id: str, repository: str, tag: str) -> None:
    """Tag in the daemon, then wait for the daemon's image index (which the listing reads; the
    worker rewrites it on the daemon's image events) to have the name."""
    stack.docker().api.tag(image_id, repository, tag)
    deadline = time.monotonic() + 20
    while not any(f"{repository}:{tag}" in image["tags"] for image in _listing(tenants["admin"], reference=f"{repository}:{tag}")["images"]):
        assert time.monotonic() < deadline, f"{repository}:{tag} never reached the image index"
        time.sleep(0.1)


def test_each_tenant_sees_only_its_own_images_and_names(tenants, stack, team_b_images, u):
    b = team_b_images
    shared = f"team-a/shared-{u}:1"
    _tag(stack, tenants, b["built_id"], f"team-a/shared-{u}", "1")  # one image, a name of each tenant's
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
    _tag(stack, tenants, b["build_id"], f"team-b/built-{u}", "kept")
    built = next(image for image in _listing(tenants["team-b"])["images"] if image["id"] == b["build_id"])
    assert built["labels"] == {"team": "b"} and built["tags"] == [f"team-b/built-{u}:kept"] and built["digests"] == []

    greedy = _listing(tenants["greedy"])
    assert b["build_job"] not in json.dumps(greedy) and "imagepub-build" not in json.dumps(greedy) and "worker" not in greedy

    admin = _listing(tenants["admin"])
    assert all(image["daemon"] == "default" for image in admin["images"])  # each image says which daemon holds it
    everything = next(image for image in admin["images"] if image["id"] == b["build_id"])
    assert f"imagepub-build:{b['build_job']}" in everything["tags"] and everything["labels"]["org.imagepub.job"] == b["build_job"]
    assert set(next(image for image in admin["images"] if image["id"] == b["built_id"])["tags"]) >= {shared, f"{b['built']}:1"}


# --- a build's base images (issue 18, item 3: the build variant) ---------------------------------


def _context(dockerfile: str, path: str = "Dockerfile") -> bytes:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w:gz") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo(path)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return context.getvalue()


def _build(api: Tenant, dockerfile: str, repository: str, build_args: dict | None = None):
    request = {"targets": [{"registry": "local", "repository": repository, "tags": ["1"]}]}
    if build_args:
        request["build_args"] = build_args
    return api.http.post(f"{api.base_url}/v1/build", timeout=60, files={
        "request": (None, json.dumps(request), "application/json"),
        "context": ("context.tar.gz", _context(dockerfile), "application/gzip"),
    })


def _refused_at_submit(resp, status: int, code: str, fields: list[str]) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.json()
    assert body["code"] == code and [e["field"] for e in body["errors"]] == fields, body


def _daemon_build(stack, tag: str, dockerfile: str) -> str:
    """An image built straight in the daemon (no imagepub), e.g. one carrying ONBUILD triggers."""
    image_id = None
    for line in stack.docker().api.build(fileobj=io.BytesIO(_context(dockerfile)), custom_context=True, encoding="gzip",
                                         tag=tag, rm=True, decode=True):
        assert "error" not in line, line
        image_id = (line.get("aux") or {}).get("ID", image_id)
    return image_id


def test_a_build_cannot_start_from_another_tenants_image(tenants, stack, team_b_images, u):
    # the image team-b pulled from the password-protected registry: its name carries the host
    resp = _build(tenants["team-a"], f"FROM {team_b_images['pulled']}:1\nLABEL stolen=yes\n", f"team-a/from-{u}")
    _refused_at_submit(resp, 403, "forbidden", ["dockerfile"])
    _nothing_pushed(stack, f"team-a/from-{u}")


def test_no_dockerfile_form_reads_another_tenants_image(tenants, stack, team_b_images, u):
    """Every way a Dockerfile can name team-b's image: the build is refused at submission,
    naming the field that gave the name, and nothing is built or pushed."""
    b = team_b_images
    built, pulled = f"{b['built']}:1", f"{b['pulled']}:1"
    cases = [
        # ARG substitution: a build argument, a default, a default when the argument is unset
        ("ARG BASE=team-a/base\nFROM $BASE\n", {"BASE": pulled}, ["build_args.BASE"]),
        (f"ARG BASE={built}\nFROM ${{BASE}}\n", None, ["dockerfile"]),
        (f"ARG BASE\nFROM ${{BASE:-{built}}}\n", None, ["dockerfile"]),
        ("FROM ${HTTP_PROXY:-scratch}\n", {"HTTP_PROXY": built}, ["build_args.HTTP_PROXY"]),  # predefined
        # multi-stage, with aliases: the image a stage starts from, and an image copied from
        (f"FROM {built} AS Src\nFROM scratch\nCOPY --from=src /layer0.bin /stolen\n", None, ["dockerfile"]),
        (f"FROM scratch\nCOPY --from={built} /layer0.bin /stolen\n", None, ["dockerfile"]),
        (f"FROM scratch AS a\nCOPY Dockerfile /x\nFROM scratch\nCOPY --from=a /x /x\nCOPY --from={pulled} /layer0.bin /s\n", None, ["dockerfile"]),
        # lower-case instructions, continuation lines (with a comment and a blank line among them)
        (f"from scratch\ncopy --from={built} /layer0.bin /stolen\n", None, ["dockerfile"]),
        (f"FROM \\\n  # the base\n\n  {built}\n", None, ["dockerfile"]),
        (f"FROM scratch\nCOPY \\\n --from={pulled} \\\n /layer0.bin /stolen\n", None, ["dockerfile"]),
        # another escape token, flags, quotes
        (f"# escape=`\nFROM --platform=linux/amd64 `\n \"{built}\"\n", None, ["dockerfile"]),
        # an ONBUILD trigger of an earlier stage runs when a later stage starts from it
        (f"FROM scratch AS base\nONBUILD COPY --from={built} /layer0.bin /stolen\nFROM base\n", None, ["dockerfile"]),
        # imagepub's own build names, and an id prefix (the daemon resolves it when it builds)
        (f"FROM imagepub-build:{b['build_job']}\n", None, ["dockerfile"]),
        (f"FROM {_unique_prefix(stack, b['built_id'])}\n", None, ["dockerfile"]),
        (f"FROM scratch\nCOPY --from=sha256:{b['pulled_id'].removeprefix('sha256:')[:12]} /layer0.bin /s\n", None, ["dockerfile"]),
    ]
    for i, (dockerfile, build_args, fields) in enumerate(cases):
        repository = f"team-a/variant-{u}-{i}"
        _refused_at_submit(_build(tenants["team-a"], dockerfile, repository, build_args), 403, "forbidden", fields)
        _nothing_pushed(stack, repository)


def test_a_dockerfile_read_differently_by_docker_versions_is_refused(tenants, stack, team_b_images, u):
    # Docker 20.10 (this daemon) stops reading directives at `check` and keeps `\`: its COPY
    # reads team-b's image; newer versions read the backtick and join the COPY to the LABEL.
    dockerfile = f"# check=skip=all\n# escape=`\nFROM scratch\nLABEL a=b`\nCOPY --from={team_b_images['built']}:1 /layer0.bin /s\n"
    _refused_at_submit(_build(tenants["team-a"], dockerfile, f"team-a/versions-{u}"), 422, "unreadable_dockerfile", ["dockerfile"])
    _nothing_pushed(stack, f"team-a/versions-{u}")


@pytest.mark.parametrize("which, path", [("pulled_id", "/layer0.bin"), ("build_id", "/payload"), ("unnamed_id", "/payload.bin")])
def test_a_build_from_another_tenants_image_id_fails_on_the_worker(tenants, stack, team_b_images, u, which, path):
    image_id = team_b_images[which]  # (not built_id: another test gives that image a name of team-a's)
    for i, dockerfile in enumerate([f"FROM {image_id}\n", f"FROM scratch\nCOPY --from={image_id.removeprefix('sha256:')} {path} /s\n"]):
        repository = f"team-a/by-id-{which.replace('_', '-')}-{u}-{i}"
        resp = _build(tenants["team-a"], dockerfile, repository)
        assert resp.status_code == 202, resp.text  # a full id names no repository: judged where it is resolved
        job = tenants["team-a"].wait(resp.json()["id"])
        assert job["state"] == "failed" and job["error"]["code"] == "forbidden", job
        assert job["build"].get("image_id") is None  # refused before the build
        _nothing_pushed(stack, repository)


def test_a_base_images_onbuild_trigger_is_a_source_too(tenants, stack, team_b_images, u):
    # team-a's own image, made outside imagepub, whose trigger copies out of team-b's image
    base = f"team-a/onbuild-{u}"
    _daemon_build(stack, f"{base}:1", f"FROM scratch\nONBUILD COPY --from={team_b_images['built']}:1 /layer0.bin /stolen\n")
    resp = _build(tenants["team-a"], f"FROM {base}:1\nLABEL via=trigger\n", f"team-a/triggered-{u}")
    assert resp.status_code == 202, resp.text  # the API cannot see an image's triggers
    job = tenants["team-a"].wait(resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "forbidden", job
    assert "ONBUILD COPY --from" in job["error"]["message"]
    _nothing_pushed(stack, f"team-a/triggered-{u}")


def test_own_images_and_stages_build(tenants, stack, team_b_images, u):
    team_a = tenants["team-a"]
    own = f"team-a/base-{u}"
    own_id = stack.build_image(f"{own}:1", layers=1)
    dockerfile = (
        "ARG BASE\n"
        f"FROM ${{BASE:-{own}:1}} AS Build\n"
        "FROM scratch\n"
        "COPY --from=build /layer0.bin /from-stage\n"
        f"COPY --from={own}:1 /layer0.bin /from-name\n"
        f"copy \\\n  --from={own_id} /layer0.bin /from-id\n"
    )
    job = _succeeded(team_a, _build(team_a, dockerfile, f"team-a/own-build-{u}"))
    assert stack.registry_tags(stack.registry, f"team-a/own-build-{u}") == ["1"] and job["build"]["image_id"]
    # a build argument naming an image of its own is fine too, as is its trigger's own image
    _daemon_build(stack, f"team-a/onbuild-own-{u}:1", f"FROM scratch\nONBUILD COPY --from={own}:1 /layer0.bin /t\n")
    _succeeded(team_a, _build(team_a, "ARG BASE=scratch\nFROM $BASE\n", f"team-a/own-arg-{u}", {"BASE": f"team-a/onbuild-own-{u}:1"}))
    # an image the daemon does not have is not pulled from wherever its name points
    resp = _build(team_a, f"FROM localhost:1/team-a/absent-{u}:1\n", f"team-a/absent-{u}")
    assert resp.status_code == 202, resp.text
    job = team_a.wait(resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "image_not_found", job


def test_the_admin_builds_from_any_image(tenants, stack, team_b_images, u):
    admin = tenants["admin"]
    dockerfile = f"FROM {team_b_images['pulled']}:1\nCOPY --from={team_b_images['built']}:1 /layer0.bin /copied\n"
    _succeeded(admin, _build(admin, dockerfile, f"team-a/admin-build-{u}"))


def test_a_tenants_run_step_is_on_the_network_made_for_builds(tenants, stack, builds_network, u):
    """A RUN step is the tenant's own code on the workers' daemon: it runs on the network the
    operator named (its own interface, nothing of the host's listening), never on the host's,
    where the same probe sees the stack's Redis."""
    team_b = tenants["team-b"]
    resp = team_b.http.post(f"{team_b.base_url}/v1/build", timeout=60, files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": f"team-b/probe-{u}", "tags": ["1"]}]}), "application/json"),
        "context": ("context.tar", network_probe.context(u), "application/x-tar"),
    })
    job = _succeeded(team_b, resp)
    docker = stack.docker().api
    image = job["build"]["image_id"]
    redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    assert redis_port in network_probe.on_the_host(docker, image).listening_ports
    run = network_probe.seen(docker, image)
    # on a user-defined network the daemon's own DNS server listens in the step's namespace
    assert run.interfaces == {"lo", "eth0"} and {ip for ip, _ in run.listeners} <= {"127.0.0.11"}, run
    network = docker.inspect_network(builds_network)
    assert network["Internal"] and network["Containers"] == {}  # the step's container is gone with it


@pytest.fixture
def metadata_service():
    """An HTTP server on the daemon host's loopback that hands out a secret, as a cloud's
    metadata service hands out the node's credentials; it records every request."""
    requests_seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests_seen.append(self.path)
            body = b"node-credentials-canary"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests_seen
    server.shutdown()


def test_an_add_the_daemon_would_download_is_refused(tenants, stack, metadata_service, u):
    """``ADD <url>`` is fetched by the daemon itself, on the host's network whatever network
    the RUN steps get: a tenant's Dockerfile could bake the node's credentials into its image.
    Refused at submit (in the Dockerfile) and on the worker (in a base image's ONBUILD
    triggers); the admin's build, which no rule of the Dockerfile binds, shows the daemon would
    have fetched it."""
    url, seen = metadata_service
    team_a = tenants["team-a"]
    for dockerfile in (f"FROM scratch\nADD {url}/latest/meta-data/iam/security-credentials/node /creds\n",
                       f"FROM scratch\nARG U={url}/creds\nADD $U /creds\n"):
        resp = _build(team_a, dockerfile, f"team-a/creds-{u}")
        _refused_at_submit(resp, 403, "forbidden", ["dockerfile"])
        assert re.match(r"line [23]: ADD .*(would download it itself|may be a URL)", resp.json()["errors"][0]["message"]), resp.json()

    base = f"team-a/onbuild-add-{u}"
    _daemon_build(stack, f"{base}:1", f"FROM scratch\nONBUILD ADD {url}/onbuild /creds\n")
    resp = _build(team_a, f"FROM {base}:1\nLABEL via=trigger\n", f"team-a/creds-{u}")
    assert resp.status_code == 202, resp.text  # the API cannot see an image's triggers
    job = team_a.wait(resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "forbidden", job
    assert "ONBUILD ADD" in job["error"]["message"] and "would download it itself" in job["error"]["message"]
    _nothing_pushed(stack, f"team-a/creds-{u}")
    assert seen == []  # nothing was fetched

    admin = _succeeded(tenants["admin"], _build(tenants["admin"], f"FROM scratch\nADD {url}/admin /fetched\n", f"team-a/admin-add-{u}"))
    assert seen == ["/admin"] and admin["state"] == "succeeded"


def test_a_run_step_that_takes_the_hosts_memory_is_killed_at_the_bound(tenants, stack, u):
    """A step that doubles a string until it holds 256 MiB (without a bound it builds): killed
    at the build's 64 MiB. The network probe's build, on the same service, stays under it and
    builds."""
    team_b = tenants["team-b"]
    resp = team_b.http.post(f"{team_b.base_url}/v1/build", timeout=60, files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": f"team-b/hog-{u}", "tags": ["1"]}]}), "application/json"),
        "context": ("context.tar", network_probe.context(u, 'a=x; i=0; while [ $i -lt 28 ]; do a="$a$a"; i=$((i+1)); done'),
                    "application/x-tar"),
    })
    assert resp.status_code == 202, resp.text
    job = team_b.wait(resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "build_failed", job
    assert job["error"]["message"].startswith("Step 4/4 : RUN a=x;"), job["error"]
    assert "returned a non-zero code: 137 (killed: most likely the step passed the build's memory limit, 64 MiB" in job["error"]["message"]
    assert job["attempts"] == 1  # a build that fails is not retried
    _nothing_pushed(stack, f"team-b/hog-{u}")

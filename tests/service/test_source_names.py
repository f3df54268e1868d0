"""A publish's source is authorised by the repository it names, read the way the Docker daemon
reads it (service/sources.py, service/access.py); the daemon itself is attacked in
tests/e2e/test_hostile_tenants.py."""

from __future__ import annotations

import pytest

from helpers import problem, queued_job_ids
from service.access import ANONYMOUS, client_named, image_for, may_publish_image, may_use_image_name
from service.config import Client, parse
from service.sources import is_image_id
from service.sources import parse as parse_name

DIGEST = "sha256:" + "ab" * 32
IMAGE_ID = "sha256:" + "81fd" * 16
TEAM_A = Client(name="team-a", token_sha256="", scopes=frozenset({"publish", "read"}), repositories=("team-a/*",))
WIDE = Client(name="wide", token_sha256="", scopes=frozenset({"publish", "read"}), repositories=("*",))
ADMIN = Client(name="root", token_sha256="", scopes=frozenset({"admin"}), repositories=())


@pytest.mark.parametrize("reference, repository", [
    ("app", "app"),
    ("app:1", "app"),
    ("library/app:1", "app"),
    ("docker.io/app", "app"),
    ("docker.io/library/app:1", "app"),
    ("index.docker.io/library/app", "app"),
    ("library/app/x", "library/app/x"),
    ("team-a/app", "team-a/app"),
    ("team-a/app:1", "team-a/app"),
    ("docker.io/team-a/app:1", "team-a/app"),
    ("index.docker.io/team-a/app:1", "team-a/app"),
    ("localhost/team-a/app", "team-a/app"),
    ("localhost:5000/team-a/app:1", "team-a/app"),
    ("127.0.0.1:5001/team-a/app:1", "team-a/app"),
    ("registry.example.com/team-a/app", "team-a/app"),
    ("Registry.Example/team-a/app", "team-a/app"),
    ("myhost:443/team-a/app", "team-a/app"),
    ("[::1]:5000/team-a/app:1", "team-a/app"),
    # a first component without a dot or port is part of the path, as in Docker
    ("team-a.v2/app", "app"),
    ("team/team-a/app", "team/team-a/app"),
    (f"team-a/app@{DIGEST}", "team-a/app"),
    (f"team-a/app:1@{DIGEST}", "team-a/app"),
    (f"localhost:5000/team-a/app:1@{DIGEST}", "team-a/app"),
    (f"app@{DIGEST}", "app"),
    # hexadecimal with a tag is a name: the daemon's id lookup never matches it
    ("cafe:1", "cafe"),
    ("81fd/app", "81fd/app"),
])
def test_the_repository_a_name_stands_for(reference, repository):
    name = parse_name(reference)
    assert name is not None and name.repository == repository


def test_docker_hubs_official_images_have_two_spellings():
    official = Client(name="hub", token_sha256="", scopes=frozenset({"publish"}), repositories=("library/*",))
    short = Client(name="short", token_sha256="", scopes=frozenset({"publish"}), repositories=("python",))
    for reference in ("python:3", "library/python:3", "docker.io/library/python", "index.docker.io/python"):
        assert parse_name(reference).spellings == ("python", "library/python")
        assert may_use_image_name(official, reference) and may_use_image_name(short, reference)
    assert parse_name("localhost:5000/library/python").spellings == ("library/python",)
    assert not may_use_image_name(short, "localhost:5000/library/python")
    assert not may_use_image_name(official, "library/imagepub-build:x")


def test_tag_and_digest_are_split_from_the_name():
    name = parse_name(f"localhost:5000/team-a/app:1@{DIGEST}")
    assert (name.domain, name.path, name.tag, name.digest) == ("localhost:5000", "team-a/app", "1", DIGEST)
    assert parse_name("app").path == "library/app" and parse_name("app").tag is None


@pytest.mark.parametrize("reference", [
    IMAGE_ID, IMAGE_ID.removeprefix("sha256:"), "sha256:81fd", "81fd", "8", "sha256:8", "81fd81fd81fd", "sha256:81fd81fd81fd",
    # hexadecimal names: when no such name is in the daemon, it reads them as id prefixes
    "cafe", "deadbeef", "0123456789",
])
def test_what_the_daemon_may_read_as_an_image_id_names_no_repository(reference):
    assert is_image_id(reference) and parse_name(reference) is None
    assert not may_use_image_name(WIDE, reference)
    assert may_use_image_name(ADMIN, reference)


@pytest.mark.parametrize("client, reference, allowed", [
    (TEAM_A, "team-a/app:1", True),
    (TEAM_A, "localhost:5000/team-a/app@" + DIGEST, True),
    (TEAM_A, "team-b/app:1", False),
    (TEAM_A, "localhost:5000/team-b/app:1", False),
    (TEAM_A, "team-a:1", False),  # the repository team-a is not team-a/*
    (TEAM_A, "localhost:5000/accept/ovh:r0", False),
    (WIDE, "anything/at/all:1", True),
    # imagepub's own name for build outputs belongs to whoever built it: no pattern reaches it
    (WIDE, "imagepub-build:0190f2a4-0000-7000-8000-000000000000", False),
    (WIDE, "docker.io/library/imagepub-build:x", False),
    (ADMIN, "imagepub-build:0190f2a4-0000-7000-8000-000000000000", True),
    (ADMIN, "team-b/app:1", True),
])
def test_who_may_use_a_name(client, reference, allowed):
    assert may_use_image_name(client, reference) is allowed


def test_an_image_may_be_published_when_one_of_its_names_is_the_clients():
    assert may_publish_image(TEAM_A, ["team-b/app:1", "localhost:5000/team-a/app@" + DIGEST])
    assert not may_publish_image(TEAM_A, ["team-b/app:1", "localhost:5000/team-b/app@" + DIGEST])
    assert not may_publish_image(TEAM_A, [])  # an image known by id alone
    assert not may_publish_image(WIDE, ["imagepub-build:x"])
    assert may_publish_image(ADMIN, [])


def test_the_job_owner_is_found_by_name():
    settings = parse({"clients": [{"name": "team-a", "token_sha256": "0" * 64, "scopes": ["publish"], "repositories": ["team-a/*"]}]}, {})
    assert client_named(settings, "team-a").repositories == ("team-a/*",)
    assert client_named(settings, "anonymous") is None and client_named(settings, None) is None
    open_ = parse({"auth": {"anonymous": True}}, {})
    assert client_named(open_, "anonymous") is ANONYMOUS and client_named(open_, "team-a") is None


def test_an_image_listing_shows_a_client_its_own_names_only():
    image = {
        "id": IMAGE_ID, "size": 1, "created": "2024-01-01T00:00:00Z",
        "tags": ["team-a/app:1", "team-b/app:1", "localhost:5000/team-b/x:2", "imagepub-build:0190f2a4-0000-7000-8000-000000000000"],
        "digests": ["localhost:5000/team-a/app@" + DIGEST, "localhost:5000/team-b/x@" + DIGEST],
        "labels": {"org.imagepub.job": "0190f2a4-0000-7000-8000-000000000000", "org.opencontainers.image.source": "git"},
    }
    shown = image_for(TEAM_A, image)
    assert shown["tags"] == ["team-a/app:1"] and shown["digests"] == ["localhost:5000/team-a/app@" + DIGEST]
    assert shown["labels"] == {"org.opencontainers.image.source": "git"}
    assert image["tags"][1] == "team-b/app:1"  # the worker's answer itself is left alone
    wide = image_for(WIDE, image)
    assert "imagepub-build:0190f2a4-0000-7000-8000-000000000000" not in wide["tags"] and "org.imagepub.job" not in wide["labels"]
    assert image_for(TEAM_A, {**image, "tags": ["team-b/app:1"], "digests": []}) is None
    assert image_for(TEAM_A, {**image, "tags": [], "digests": []}) is None  # known by id alone
    assert image_for(ADMIN, image) == image


def _publish(source: str, repository: str = "team-b/app") -> dict:
    return {"source": source, "targets": [{"registry": "local", "repository": repository, "tags": ["1"]}]}


@pytest.mark.parametrize("source", [
    "app:1", "team/app", "team/app:1", "docker.io/team/app:1", "index.docker.io/team/app:1", "localhost:5000/team/app:1",
    f"localhost:5000/team/app@{DIGEST}", f"team/app:1@{DIGEST}", "docker.io/library/python-lab:latest", "imagepub-build:x",
])
def test_publishing_from_another_clients_repository_is_refused_before_anything_is_stored(as_client, redis_client, source):
    body = problem(as_client("team-b").post("/v1/publish", json=_publish(source)), 403, "forbidden")
    assert [e["field"] for e in body["errors"]] == ["source"]
    assert "team-b" in body["errors"][0]["message"]
    assert redis_client.keys("imagepub:job:*") == [] and queued_job_ids(redis_client) == []


@pytest.mark.parametrize("source", [
    "team-b/app", "team-b/app:1", "docker.io/team-b/app:1", "localhost:5000/team-b/app:1", f"team-b/app:1@{DIGEST}",
    # an image id names no repository: accepted here, judged by the worker on the image it resolves
    IMAGE_ID, "sha256:81fd81fd81fd", "81fd81fd81fd",
])
def test_publishing_from_ones_own_repository_or_by_id_is_accepted(as_client, source):
    assert as_client("team-b").post("/v1/publish", json=_publish(source)).status_code == 202


def test_admin_may_publish_any_source(as_client):
    for source in ("app:1", "localhost:5000/other/app:1", "imagepub-build:x", IMAGE_ID):
        assert as_client("admin").post("/v1/publish", json=_publish(source, "other/app")).status_code == 202

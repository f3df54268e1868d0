"""The fleet's image index in Redis (service/fleet.py): names read as the daemon reads them,
ids and id prefixes, the reference filter as users write repositories, placement."""

from __future__ import annotations

import time

import pytest

from helpers import GOOD
from service.errors import Conflict, ValidationFailed
from service.fleet import VIEW_SECONDS, Fleet, matches_reference

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
IMAGES_A = [
    {"id": A, "tags": ["app:1", "localhost:5000/team/app:1"], "digests": ["localhost:5000/team/app@sha256:" + "c" * 64],
     "created": "2026-12-01T10:00:00Z", "size": 1},
]
IMAGES_B = [{"id": B, "tags": ["app:1", "other:2"], "digests": [], "created": "2026-12-01T11:00:00Z", "size": 2}]


@pytest.fixture
def fleet(redis_client):
    fleet = Fleet(redis_client)
    for name, images in (("a", IMAGES_A), ("b", IMAGES_B)):
        fleet.register(f"worker-{name}", {"daemon": name, "hostname": f"host-{name}", "concurrency": 2})
        fleet.write_index(name, images, listed_at=0)
    return fleet


@pytest.mark.parametrize("reference, holders", [
    ("app:1", {"a": A, "b": B}),
    ("docker.io/library/app:1", {"a": A, "b": B}),   # the daemon's spelling of `app:1`
    ("index.docker.io/library/app:1", {"a": A, "b": B}),
    ("app", {}),                                     # `app` is app:latest
    ("localhost:5000/team/app:1", {"a": A}),
    ("localhost:5000/team/app@sha256:" + "c" * 64, {"a": A}),
    ("localhost:5000/team/app:9@sha256:" + "c" * 64, {"a": A}),  # a digest wins over the tag
    ("team/app:1", {}),                               # another repository: docker.io/team/app
    (A, {"a": A}), ("aaaaaaaaaaaa", {"a": A}), ("sha256:aaaa", {"a": A}), ("bbbb", {"b": B}),
    ("other:2", {"b": B}),
])
def test_holders_read_names_as_the_daemon_does(fleet, reference, holders):
    assert fleet.holders(reference, ["a", "b"]) == holders


@pytest.mark.parametrize("pattern, matches", [
    ("team/*", True), ("team/app", True), ("team/app:1", True), ("localhost:5000/team/*", True),
    ("app", True), ("app:1", True), ("*", True), ("t*/app", True),
    ("team/app:2", False), ("team", False), ("other/*", False), ("team/*/x", False), ("*/*/*", True), ("*/*/*/*", False),
])
def test_the_reference_filter_matches_repositories_as_users_write_them(pattern, matches):
    assert matches_reference(IMAGES_A[0], pattern) is matches


def test_placement(fleet):
    with pytest.raises(Conflict) as ambiguous:
        fleet.place("app:1", None)
    assert ambiguous.value.code == "ambiguous_source" and "on a" in ambiguous.value.message and "on b" in ambiguous.value.message
    assert fleet.place("app:1", "b").daemon == "b"
    assert fleet.place("localhost:5000/team/app:1", None).daemon == "a"
    assert fleet.place("other:2", None).daemon == "b"
    with pytest.raises(ValidationFailed) as missing:
        fleet.place("nowhere:1", None)
    assert missing.value.code == "image_not_found" and missing.value.errors[0]["field"] == "source"
    with pytest.raises(ValidationFailed) as unknown:
        fleet.place("app:1", "c")
    assert unknown.value.code == "daemon_not_found"


def test_a_single_daemon_takes_everything_and_none_means_default(redis_client):
    fleet = Fleet(redis_client)
    assert fleet.place("anything:1", None).daemon == "default"  # no worker has registered yet
    fleet.register("w", {"daemon": "solo"})
    assert fleet.place("anything:1", None, fresh=True).daemon == "solo"  # its worker says whether it holds it


def test_daemons_and_waiting(fleet, redis_client):
    daemons = {d.name: d for d in fleet.daemons()}
    assert set(daemons) == {"a", "b"} and all(d.up for d in daemons.values())
    assert fleet.why_waiting("a") is None
    fleet.unregister("worker-a")
    # the reason a queued job waits is read from a view at most VIEW_SECONDS old
    assert fleet.why_waiting("a") is None
    read_at, *view = fleet._seen
    fleet._seen = (read_at - VIEW_SECONDS, *view)  # as a second later
    assert fleet.why_waiting("a") == "daemon a has no worker"
    assert {d.name: d.up for d in fleet.daemons()} == {"a": False, "b": True}


def test_the_reference_filter_shows_only_the_names_that_match():
    """As Docker's filter: a filter never reveals an image's other names (another tenant's)."""
    from service.fleet import filter_reference

    shown = filter_reference(IMAGES_A[0], "team/*")
    assert shown["tags"] == ["localhost:5000/team/app:1"] and shown["digests"] == IMAGES_A[0]["digests"]
    assert filter_reference(IMAGES_A[0], "app:1")["tags"] == ["app:1"] and filter_reference(IMAGES_A[0], "app:1")["digests"] == []
    assert filter_reference(IMAGES_A[0], "other/*") is None


def test_a_submission_placed_on_a_stale_view_is_placed_again(client, app, redis_client):
    """A publish is placed from this process' view of the fleet (at most VIEW_SECONDS old, no
    round trip) and stored only if the fleet is still what the view saw: a daemon that joined
    meanwhile makes the API look again, so the job goes where its image is."""
    fleet = app.extensions["imagepub"]["fleet"]
    fleet.register("worker-a", {"daemon": "a"})
    fleet.write_index("a", IMAGES_A, listed_at=0)
    first = client.post("/v1/publish", json={**GOOD, "source": "other:2"})
    assert first.status_code == 202 and first.get_json()["daemon"] == "a"  # the only daemon: it takes everything

    other = Fleet(redis_client)  # another process: a second daemon joins, holding the image
    other.register("worker-b", {"daemon": "b"})
    other.write_index("b", IMAGES_B, listed_at=0)
    read_at, _, records = fleet._seen
    assert list(records) == ["a"] and time.monotonic() - read_at < VIEW_SECONDS  # this process still sees a alone

    again = client.post("/v1/publish", json={**GOOD, "source": "other:2"})
    assert again.status_code == 202 and again.get_json()["daemon"] == "b"
    jobs = {job["id"]: job["daemon"] for job in client.get("/v1/jobs").get_json()["jobs"]}
    assert jobs == {first.get_json()["id"]: "a", again.get_json()["id"]: "b"}  # nothing stored on the stale view

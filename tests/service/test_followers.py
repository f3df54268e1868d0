"""One Redis reader per API process for its live event streams (service/followers.py), against
the test stack's Redis: every follower gets every event after the one it had, in order, however
many follow one job and wherever each joined; the reader stops with its last follower; a Redis
that fails the read ends every stream with the error."""

from __future__ import annotations

import time

import pytest
import redis

from helpers import GOOD
from service.followers import Followers
from service.jobs import new_job
from service.jobstore import JobStore
from stack import free_port


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client)


def _job(store: JobStore) -> dict:
    job = new_job("publish", {**GOOD, "create_repository": False, "callback_url": None})
    job["client"] = "admin"
    store.create(job)
    return job


def _ids(store: JobStore, job_id: str) -> list[str]:
    return [event_id for event_id, _, _ in store.events(job_id)]


def _collect(sub, until: int, timeout: float = 10) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < until and time.monotonic() < deadline:
        got += [event_id for event_id, _, _ in sub.wait(0.5)]
    return got


def test_every_follower_gets_every_event_after_its_own(store):
    followers = Followers(store)
    first, second = _job(store), _job(store)
    start = _ids(store, first["id"])[-1]  # the `queued` snapshot a new follower starts from
    a = [followers.subscribe(first["id"], start) for _ in range(20)]
    for i in range(5):
        first["progress"] = {"step": i}
        store.save(first)
    late = followers.subscribe(first["id"], start)  # joins after the reader has moved on: misses nothing
    other = followers.subscribe(second["id"], _ids(store, second["id"])[-1])
    second["state"] = "running"
    store.save(second, event="state")
    first["state"] = "succeeded"
    store.save(first, event="state")

    expected = _ids(store, first["id"])[1:]
    assert len(expected) == 6
    for sub in [*a, late]:
        assert _collect(sub, len(expected)) == expected
    assert _collect(other, 1) == _ids(store, second["id"])[1:]
    assert followers.following() == 22

    for sub in [*a, late, other]:
        followers.unsubscribe(sub)
    assert followers.following() == 0
    deadline = time.monotonic() + 5
    while followers._reader is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert followers._reader is None  # stopped with its last follower; the next one starts it again
    again = followers.subscribe(second["id"], _ids(store, second["id"])[-1])
    second["state"] = "succeeded"
    store.save(second, event="state")
    assert _collect(again, 1) == _ids(store, second["id"])[-1:]


def test_a_new_follower_wakes_the_read_in_progress(store):
    followers = Followers(store, block_ms=10_000)  # a read that would wait 10 s for the first job's events
    first, second = _job(store), _job(store)
    followers.subscribe(first["id"], _ids(store, first["id"])[-1])
    time.sleep(0.3)  # the reader is blocked on the first job's stream alone

    joined = followers.subscribe(second["id"], _ids(store, second["id"])[-1])
    second["state"] = "succeeded"
    store.save(second, event="state")
    assert _collect(joined, 1, timeout=3) == _ids(store, second["id"])[-1:]

    time.sleep(0.3)  # blocked again, now past the second job's last event
    behind = followers.subscribe(second["id"], _ids(store, second["id"])[0])  # resumes from its first event
    assert _collect(behind, 1, timeout=3) == _ids(store, second["id"])[1:]


def test_a_redis_that_fails_the_read_ends_every_stream(store):
    dead = JobStore(redis.Redis(port=free_port(), decode_responses=True, socket_connect_timeout=1))
    followers = Followers(dead)
    subs = [followers.subscribe("01a23285-69a0-70f9-a530-2d2aea3ae5ef", "0-0") for _ in range(3)]
    for sub in subs:
        with pytest.raises(redis.ConnectionError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                sub.wait(0.5)
    assert followers.following() == 0

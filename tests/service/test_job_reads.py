"""``GET /v1/jobs/{id}`` below Flask (service/job_reads.py): for every request it answers, the
bytes Flask would have answered, and every other request left to Flask; with the process'
cache of records (service/jobcache.py), a job read through the API shows a worker's write at
once."""

from __future__ import annotations

import dataclasses

import pytest

from clients import bearer
from helpers import GOOD
from service.app import create_app
from service.fleet import Fleet
from service.jobs import new_job
from service.jobstore import JobStore

REQUEST_ID = {"X-Request-Id": "pipeline-42.build-7"}


@pytest.fixture
def plain_settings(settings):
    """The test deployment without its rate-limited client: with a rate limit anywhere, every
    request goes through Flask (flask-limiter counts there)."""
    return dataclasses.replace(settings, clients=tuple(c for c in settings.clients if not c.rate_limit))


@pytest.fixture
def apps(plain_settings, redis_client):
    """The API as served, and the same API with Flask alone, on one Redis."""
    served = create_app(plain_settings)
    flask_alone = create_app(plain_settings)
    flask_alone.wsgi_app = flask_alone.wsgi_app.flask
    calls = []
    flask = served.wsgi_app.flask
    served.wsgi_app.flask = lambda environ, start_response: calls.append(environ["PATH_INFO"]) or flask(environ, start_response)
    return served, flask_alone, calls


@pytest.fixture
def worker_store(redis_client):
    """The job store as a worker holds it: writes, and no cache."""
    return JobStore(redis_client)


def _job(store: JobStore, owner: str, **fields) -> dict:
    job = new_job("publish", {**GOOD, "create_repository": False, "callback_url": None})
    job.update(client=owner, **fields)
    store.create(job)
    return job


def _answer(app, path: str, headers: dict) -> tuple:
    resp = app.test_client().get(path, headers=headers)
    return resp.status_code, resp.headers.get("Content-Type"), resp.headers.get("X-Request-Id"), sorted(resp.headers.keys()), resp.get_data()


def test_a_caller_reading_a_job_it_may_see_gets_flasks_answer_without_flask(apps, worker_store):
    served, flask_alone, calls = apps
    queued = _job(worker_store, "ci")
    waiting = _job(worker_store, "ci", daemon="a")  # no worker serves daemon a: waiting_for says so
    finished = _job(worker_store, "ci")
    finished.update(state="succeeded", finished_at="2026-12-01T12:00:00.000000Z")
    worker_store.save(finished, event="state")  # a finished record is stored compressed

    for job in (queued, waiting, finished):
        for caller in ("ci", "admin"):
            path = f"/v1/jobs/{job['id']}"
            expected = _answer(flask_alone, path, {**bearer(caller), **REQUEST_ID})
            assert _answer(served, path, {**bearer(caller), **REQUEST_ID}) == expected
            assert expected[0] == 200
    assert calls == []
    assert b'"waiting_for":"daemon a has no worker"' in _answer(served, f"/v1/jobs/{waiting['id']}", bearer("ci"))[4]


def test_a_request_id_is_chosen_as_flask_chooses_it(apps, worker_store):
    served, _, calls = apps
    job = _job(worker_store, "ci")
    fresh = _answer(served, f"/v1/jobs/{job['id']}", {**bearer("ci"), "X-Request-Id": "imp_looks-like-a-token"})
    assert fresh[0] == 200 and fresh[2] != "imp_looks-like-a-token" and len(fresh[2]) == 24
    assert _answer(served, f"/v1/jobs/{job['id']}", {**bearer("ci"), "X-Request-Id": "a b"})[2] != "a b"
    assert calls == []


@pytest.mark.parametrize("caller, which, status", [
    ("team-b", "ci's job", 404),        # another client's job is one that does not exist
    (None, "ci's job", 401),
    ("bad token", "ci's job", 401),
    ("ci", "missing", 404),
    ("ci", "not an id", 404),
    ("ci", "upper-case id", 404),
])
def test_everything_else_is_flasks_to_answer(apps, worker_store, caller, which, status):
    served, flask_alone, calls = apps
    job = _job(worker_store, "ci")
    job_id = {"ci's job": job["id"], "missing": "01a23310-0000-7000-8000-000000000000", "not an id": "nope",
              "upper-case id": job["id"].upper()}[which]
    headers = {"bad token": {"Authorization": "Bearer imp_nope"}, None: {}}[caller] if caller in ("bad token", None) else bearer(caller)
    path = f"/v1/jobs/{job_id}"
    answer = _answer(served, path, {**headers, **REQUEST_ID})
    assert answer == _answer(flask_alone, path, {**headers, **REQUEST_ID})
    assert answer[0] == status and answer[1] == "application/problem+json"
    assert calls == [path]


def test_with_a_rate_limit_every_read_goes_through_flask(settings, redis_client, worker_store):
    app = create_app(settings)  # the test deployment has a rate-limited client
    assert app.wsgi_app.enabled is False
    job = _job(worker_store, "ci")
    assert app.test_client().get(f"/v1/jobs/{job['id']}", headers=bearer("ci")).status_code == 200


def test_a_read_shows_a_workers_write_at_once(apps, worker_store, redis_client):
    served, _, _ = apps
    job = _job(worker_store, "ci")
    client = served.test_client()
    path = f"/v1/jobs/{job['id']}"
    for _ in range(3):
        assert client.get(path, headers=bearer("ci")).get_json()["state"] == "queued"
    assert served.extensions["imagepub"]["store"].cache.size == 1, "polls come from the cache"

    for state in ("running", "succeeded"):
        job["state"] = state
        worker_store.save(job, event="state")
        assert client.get(path, headers=bearer("ci")).get_json()["state"] == state

    Fleet(redis_client).register("worker-a", {"daemon": "a", "hostname": "h", "concurrency": 1})
    redis_client.delete(f"imagepub:job:{job['id']}")  # retention's end
    assert client.get(path, headers=bearer("ci")).status_code == 404

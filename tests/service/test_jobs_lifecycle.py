"""Idempotency, cancellation, callback URL checks, live events and retention, through the API
against real Redis (no worker: the jobs stay queued unless a test moves them)."""

from __future__ import annotations

import json
import time

import pytest

from service.callbacks import CallbackRefused, check_callback_url
from service.jobstore import JobStore

from clients import bearer
from helpers import GOOD, CheckedClient, parse_sse, problem, queued_job_ids


def test_idempotency_key_same_body_gives_the_original_job(client, redis_client):
    first = client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "build-42"})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    # the same request, written differently (key order, a duplicate tag merged away)
    again_body = {"targets": [{"tags": ["latest", "1.4.2", "latest"], "repository": "team/app", "registry": "local"}], "source": "python-lab:latest"}
    again = client.post("/v1/publish", json=again_body, headers={"Idempotency-Key": "build-42"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert queued_job_ids(redis_client) == [first.get_json()["id"]]
    assert len(client.get("/v1/jobs").get_json()["jobs"]) == 1

    changed = client.post("/v1/publish", json={**GOOD, "source": "other:1"}, headers={"Idempotency-Key": "build-42"})
    problem(changed, 409, "idempotency_conflict")
    # a pull with the same key is a different request too
    problem(client.post("/v1/pull", json={"registry": "local", "repository": "a"}, headers={"Idempotency-Key": "build-42"}), 409, "idempotency_conflict")
    # other keys are independent
    assert client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "build-43"}).get_json()["id"] != first.get_json()["id"]


class ProcessDied(BaseException):
    """What the rest of a request sees of its process being killed: nothing runs any more."""


def test_an_idempotency_key_claimed_by_a_request_that_died_lapses(app, client, redis_client, monkeypatch):
    """An API process that died between claiming a key and storing its job leaves the claim
    behind: a retry with that key is told to retry while the claim lasts
    (recovery.lock_ttl_seconds), then gets a new job — not "in progress" for days."""
    store: JobStore = app.extensions["imagepub"]["store"]
    ttl = app.extensions["imagepub"]["settings"].recovery.lock_ttl_seconds

    def dies(*_, **__):
        raise ProcessDied()

    monkeypatch.setattr(store, "create_call", dies)  # what storing the job (and its audit entry) starts with
    with pytest.raises(ProcessDied):
        client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "died-1"})
    monkeypatch.undo()
    assert 0 < redis_client.pttl(store.idempotency_key("admin", "died-1")) <= ttl * 1000
    problem(client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "died-1"}), 409, "idempotency_in_progress")
    redis_client.pexpire(store.idempotency_key("admin", "died-1"), 1)  # the claim's TTL runs out
    time.sleep(0.01)
    job = client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "died-1"})
    assert job.status_code == 202 and "Idempotent-Replayed" not in job.headers
    assert queued_job_ids(redis_client) == [job.get_json()["id"]]
    # stored with its job, the key is bound for the retention period, and replays
    assert redis_client.ttl(store.idempotency_key("admin", "died-1")) > 7 * 86400
    again = client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "died-1"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json()["id"] == job.get_json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "ünïcode"])
def test_bad_idempotency_keys(client, key):
    resp = client.client.post("/v1/publish", json=GOOD, headers={**client.headers, "Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    body = problem(resp, 422, "validation_failed")
    assert body["errors"][0]["field"] == "Idempotency-Key"


def test_cancel_a_queued_job(client, app, redis_client):
    job = client.post("/v1/publish", json=GOOD).get_json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200
    cancelled = resp.get_json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"] and cancelled["error"]["code"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["state"] == "cancelled"
    assert [j["id"] for j in client.get("/v1/jobs?state=cancelled").get_json()["jobs"]] == [job["id"]]
    assert client.get("/v1/jobs?state=queued").get_json()["jobs"] == []
    problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
    problem(client.post("/v1/jobs/0190f2a4-0000-7000-8000-000000000000/cancel"), 404, "job_not_found")
    # a worker that picks the message up later can no longer write a state over it
    store = app.extensions["imagepub"]["store"]
    stale = {**job, "state": "running"}
    assert store.save(stale) is False
    assert store.get(job["id"])["state"] == "cancelled"


def test_cancel_a_running_job_asks_its_worker(client, app):
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    job["state"] = "running"
    store.save(job)
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202 and resp.get_json()["state"] == "running"
    assert store.cancel_requested(job["id"])


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://169.254.169.254/latest/meta-data",
    "http://10.1.2.3/x", "http://[::1]/x", "http://0.0.0.0/x", "http://user:pw@example.com/x",
])
def test_internal_callback_urls_are_refused(client, url, redis_client):
    body = problem(client.post("/v1/publish", json={**GOOD, "callback_url": url}), 422, "callback_url_forbidden")
    assert body["errors"][0]["field"] == "callback_url"
    assert redis_client.keys("imagepub:job:*") == []


@pytest.mark.parametrize("url", ["http://[::ffff:127.0.0.1]/x", "http://[fe80::1]/x", "http://100.64.0.1/x", "http://[::ffff:10.0.0.1]/x", "http://2130706433/x"])
def test_internal_addresses_in_every_spelling(url):
    with pytest.raises(CallbackRefused, match="internal address"):
        check_callback_url(url, ())


def test_unresolvable_callback_hosts_are_accepted_and_checked_at_delivery(client):
    # DNS may fail for a while; delivery resolves and checks the host again
    assert client.post("/v1/publish", json={**GOOD, "callback_url": "https://hooks.no-such-host.invalid/x"}).status_code == 202


def test_allowed_hosts_may_be_internal(settings, redis_client):
    from dataclasses import replace

    from service.app import create_app

    allowed = replace(settings, webhooks=replace(settings.webhooks, allowed_hosts=("127.0.0.1",)))
    client = CheckedClient(create_app(allowed).test_client(), headers=bearer("admin"))
    assert client.post("/v1/publish", json={**GOOD, "callback_url": "http://127.0.0.1:9/hook"}).status_code == 202


def test_events_of_a_finished_job_replay_its_end_and_close(client, app):
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    for state in ("running", "succeeded"):
        job["state"] = state
        store.save(job, event="state")
    resp = client.get(f"/v1/jobs/{job['id']}/events")
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = parse_sse(resp.get_data(as_text=True))
    assert [(e["event"], e["data"]["state"]) for e in events] == [("state", "succeeded")]

    # resuming from the first event replays what followed it, and closes after the end
    first_id = store.events(job["id"], "0-0")[0][0]
    resumed = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": first_id}).get_data(as_text=True))
    assert [e["data"]["state"] for e in resumed] == ["running", "succeeded"]
    problem(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "nope"}), 422, "validation_failed")

    # the history outlives the job's end by an hour, the record by the whole retention...
    redis_client = store.redis
    assert 3500 < redis_client.ttl(f"imagepub:job:{job['id']}:events") <= 3600
    assert redis_client.ttl(f"imagepub:job:{job['id']}") > 86400
    # ...and once the history is gone the endpoint replays the record itself
    redis_client.delete(f"imagepub:job:{job['id']}:events")
    replay = parse_sse(client.get(f"/v1/jobs/{job['id']}/events").get_data(as_text=True))
    assert [(e["event"], e["data"]["state"]) for e in replay] == [("state", "succeeded")]
    problem(client.get("/v1/jobs/0190f2a4-0000-7000-8000-000000000000/events"), 404, "job_not_found")


@pytest.mark.parametrize("last_event_id", ["nope", "1-2-3", "-1", "0-18446744073709551616", "18446744073709551616", "99999999999999999999-0"])
def test_events_refuse_a_last_event_id_redis_could_not_read(client, last_event_id):
    """Ids above 2**64-1 used to reach XREAD after the headers were sent and broke the stream;
    the contract's pattern (19 digits a part) admits only ids Redis can read."""
    job = client.post("/v1/publish", json=GOOD).get_json()
    body = problem(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_event_id}), 422, "validation_failed")
    assert body["errors"][0]["field"] == "Last-Event-ID"


@pytest.mark.parametrize("last_event_id", ["terminal", "9999999999999999999-9999999999999999999", "9999999999999999999"])
def test_events_resumed_at_or_past_the_end_of_a_finished_job_close_at_once(client, app, last_event_id):
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    job["state"] = "failed"
    store.save(job, event="state")
    terminal_id = store.latest_event(job["id"])[0]
    if last_event_id == "terminal":
        last_event_id = terminal_id
    started = time.monotonic()
    events = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_event_id}).get_data(as_text=True))
    assert [(e["id"], e["data"]["state"]) for e in events] == [(terminal_id, "failed")]
    assert time.monotonic() - started < 5  # no 15 s wait on a stream that can never grow


@pytest.mark.parametrize("last_event_id", [None, "0", "0-0", "1700000000000-5"])
def test_events_of_a_job_whose_history_expired_keep_their_id_form_and_resume(client, app, redis_client, last_event_id):
    """An hour after a job ended its event history expires; the stream then replays the record
    alone, with an id of the same form as every other (it was `id: 0`, which the contract's
    own pattern refuses) that a follower can resume from."""
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    job.update(state="succeeded", finished_at="2026-12-01T10:00:00.250000Z")
    store.save(job, event="state")
    redis_client.delete(f"imagepub:job:{job['id']}:events")  # what EVENTS_AFTER_END_SECONDS does
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers=headers).get_data(as_text=True))
    end_id = "1796119200250-0"  # finished_at in milliseconds
    assert [(e["id"], e["data"]["state"]) for e in events] == [(end_id, "succeeded")]
    again = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": end_id}).get_data(as_text=True))
    assert [(e["id"], e["data"]["state"]) for e in again] == [(end_id, "succeeded")]


def test_live_event_streams_per_process_are_bounded(settings, redis_client):
    """A crowd of followers cannot take every thread of an API process: beyond the limit they
    get 503 too_many_streams (and poll); a finished job's replay needs no slot; a slot comes
    back when its stream is closed, however it ended."""
    from dataclasses import replace

    from service.app import create_app

    app = create_app(replace(settings, limits=replace(settings.limits, event_streams_per_process=1)))
    raw = app.test_client()
    client = CheckedClient(app.test_client(), headers=bearer("admin"))
    running = client.post("/v1/publish", json=GOOD).get_json()
    running["state"] = "running"
    app.extensions["imagepub"]["store"].save(running, event="state")
    done = client.post("/v1/publish", json=GOOD).get_json()
    done["state"] = "succeeded"
    app.extensions["imagepub"]["store"].save(done, event="state")

    first = raw.get(f"/v1/jobs/{running['id']}/events", headers=bearer("admin"), buffered=False)
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    crowded = client.get(f"/v1/jobs/{running['id']}/events")
    body = problem(crowded, 503, "too_many_streams")
    assert crowded.headers["Retry-After"] == "5" and f"GET /v1/jobs/{running['id']}" in body["detail"]
    # the job itself stays readable, and a finished job's replay does not wait for a slot
    assert client.get(f"/v1/jobs/{running['id']}").status_code == 200
    assert [e["data"]["state"] for e in parse_sse(client.get(f"/v1/jobs/{done['id']}/events").get_data(as_text=True))] == ["succeeded"]

    first.close()  # the follower goes away: its slot is free again
    again = raw.get(f"/v1/jobs/{running['id']}/events", headers=bearer("admin"), buffered=False)
    assert again.status_code == 200
    again.close()


def test_finished_records_are_stored_compact_and_read_back_whole(client, app, redis_client):
    store = app.extensions["imagepub"]["store"]
    job = client.post("/v1/publish", json=GOOD).get_json()
    key = f"imagepub:job:{job['id']}"
    job["state"] = "running"
    store.save(job, event="state")
    assert redis_client.get(key).startswith("{")  # a live record stays plain JSON
    job["targets"][0].update(
        state="succeeded", references=["localhost:5000/team/app:latest", "localhost:5000/team/app:1.4.2"],
        digest="sha256:" + "ab" * 32, size=3_145_728,
        layers=[{"id": f"{n:012x}", "status": "pushed", "current": None, "total": 1_048_576} for n in range(3)],
    )
    job.update(state="succeeded", finished_at=job["updated_at"])
    assert store.save(job, event="state")

    stored = redis_client.get(key)
    assert stored.startswith("~1:") and len(stored) < len(json.dumps(job)) / 2
    # every reader sees the whole record
    assert client.get(f"/v1/jobs/{job['id']}").get_json() == job
    assert client.get("/v1/jobs").get_json()["jobs"] == [job]
    assert parse_sse(client.get(f"/v1/jobs/{job['id']}/events").get_data(as_text=True))[-1]["data"] == job
    problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
    # and a late write (a worker that lost the race) still cannot change it
    assert store.save({**job, "state": "running"}, event="state") is False
    assert client.get(f"/v1/jobs/{job['id']}").get_json() == job

    # a job cancelled before it ran is finished too
    queued = client.post("/v1/pull", json={"registry": "local", "repository": "team/app"}).get_json()
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel").get_json()
    assert cancelled["state"] == "cancelled"
    assert redis_client.get(f"imagepub:job:{queued['id']}").startswith("~1:")
    assert client.get(f"/v1/jobs/{queued['id']}").get_json() == cancelled


def test_finished_jobs_expire_after_retention(app, client, redis_client):
    store: JobStore = app.extensions["imagepub"]["store"]
    short = JobStore(store.redis, retention_seconds=1)
    keep = client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "k1"}).get_json()
    done = client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "k2"}).get_json()
    done["state"] = "succeeded"
    assert short.save(done, event="state")
    assert 0 < redis_client.ttl(f"imagepub:job:{done['id']}") <= 1
    assert 0 < redis_client.ttl(short.idempotency_key("admin", "k2")) <= 1
    assert redis_client.ttl(f"imagepub:job:{keep['id']}") == -1  # unfinished jobs never expire
    time.sleep(1.2)
    problem(client.get(f"/v1/jobs/{done['id']}"), 404, "job_not_found")
    assert [j["id"] for j in client.get("/v1/jobs").get_json()["jobs"]] == [keep["id"]]
    assert redis_client.zscore("imagepub:jobs", done["id"]) is None  # the listing forgot it
    # the key expired with its job: it may be used again, for a new job
    assert client.post("/v1/publish", json=GOOD, headers={"Idempotency-Key": "k2"}).get_json()["id"] != done["id"]
